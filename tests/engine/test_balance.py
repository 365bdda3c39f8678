"""Class balancing: the Sinkhorn offsets equal the balanced assignment and travel with the artifact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from must_engine import Predictor, adapt
from must_engine.artifact import WEIGHTS_FILE, load_artifact
from must_engine.balance import sinkhorn_class_bias
from must_engine.config import resolve_config
from must_engine.images import find_images, open_image
from must_engine.presets import ModelGeometry

CLASSES = ["banded", "blotchy", "braided"]


def skewed_probabilities(n: int = 600, k: int = 5, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=generator) * 2 + torch.linspace(0, 3, k)  # the last class is favoured
    return logits.softmax(dim=-1)


def test_offsets_give_the_balanced_assignment_and_even_out_the_classes() -> None:
    probs = skewed_probabilities()
    bias = sinkhorn_class_bias(probs)
    balanced = (probs.log() + bias).softmax(dim=-1)  # diag(u) P diag(exp(bias)): rows sum to 1 by construction
    assert torch.allclose(balanced.sum(dim=0), torch.full((5,), 600 / 5), atol=1e-3)  # columns to N/K
    adjusted = balanced.argmax(dim=-1)
    counts = torch.bincount(adjusted, minlength=5)
    raw = torch.bincount(probs.argmax(dim=-1), minlength=5)
    assert raw.max() > 250 and counts.max() - counts.min() <= 30  # 600 images, 5 classes: about 120 each
    assert abs(float(bias.sum())) < 1e-4 and bias[-1] < 0 < bias[0]


def test_already_balanced_probabilities_get_no_offset() -> None:
    probs = torch.eye(4).repeat(25, 1) * 0.6 + 0.1
    assert torch.allclose(sinkhorn_class_bias(probs), torch.zeros(4), atol=1e-5)


def test_a_balanced_run_exports_its_offsets_and_serves_with_them(
    tiny_base_model: str, dtd_subset: Path, tmp_path: Path
) -> None:
    # balance at export only; unknown_weighting off: balance over the whole bucket (with it on, images flagged
    # unknown are left out)
    overrides = {"epochs": 1, "batch_size": 8, "num_workers": 0, "mim": False, "unknown_weighting": "off",
                 "balance_init": False}
    runs = {}
    for balance in (False, True):
        config = resolve_config(overrides={**overrides, "balance_classes": balance}, num_images=24, num_classes=3,
                                geometry=ModelGeometry(image_size=32, patch_size=8))
        runs[balance] = adapt(dtd_subset, CLASSES, tmp_path / str(balance), base_model=tiny_base_model,
                              config=config, device="cpu")
    plain, balanced = (load_artifact(runs[b].artifact_dir)[0] for b in (False, True))
    assert torch.equal(plain.class_bias, torch.zeros(3))
    assert balanced.class_bias.abs().max() > 0 and "balance_changed" in runs[True].metrics
    for key, value in plain.state_dict().items():  # the same training; only the offsets differ
        if key != "class_bias":
            assert torch.equal(value, balanced.state_dict()[key]), key
    # Served over the bucket, the probabilities are the balanced assignment: a uniform class marginal.
    served = Predictor.load(runs[True].artifact_dir, device="cpu")
    images = [open_image(path, draft_size=2 * served.size) for path in find_images(dtd_subset)]
    marginal = served.probabilities(served.preprocess(images)).mean(dim=0)
    assert torch.allclose(marginal, torch.full((3,), 1 / 3), atol=1e-3), marginal
    unbalanced = Predictor.load(runs[False].artifact_dir, device="cpu")
    assert (unbalanced.probabilities(unbalanced.preprocess(images)).mean(dim=0) - 1 / 3).abs().max() > 0.01


def test_artifacts_written_before_balancing_still_load(tiny_base_model: str, dtd_subset: Path,
                                                       tmp_path: Path) -> None:
    config = resolve_config(overrides={"epochs": 1, "batch_size": 8, "num_workers": 0}, num_images=24,
                            num_classes=3, geometry=ModelGeometry(image_size=32, patch_size=8))
    result = adapt(dtd_subset, CLASSES, tmp_path / "model", base_model=tiny_base_model, config=config, device="cpu")
    weights = result.artifact_dir / WEIGHTS_FILE
    state = load_file(str(weights))
    del state["class_bias"]
    save_file(state, str(weights))
    classifier, _ = load_artifact(result.artifact_dir)
    assert torch.equal(classifier.class_bias, torch.zeros(3))


@pytest.mark.parametrize("at_export", [False, True])
def test_balance_init_starts_training_from_the_balanced_zero_shot_head(
    tiny_base_model: str, dtd_subset: Path, tmp_path: Path, at_export: bool
) -> None:
    # No learning (lr 0): the exported head is the zero-shot head, so it must carry the start's offsets once,
    # whether or not the export balances again (a second balancing must not add them twice).
    overrides = {"epochs": 1, "batch_size": 8, "num_workers": 0, "mim": False, "base_lr": 0.0, "min_lr": 0.0,
                 "balance_init": True, "balance_classes": at_export}
    config = resolve_config(overrides=overrides, num_images=24, num_classes=3,
                            geometry=ModelGeometry(image_size=32, patch_size=8))
    result = adapt(dtd_subset, CLASSES, tmp_path / "model", base_model=tiny_base_model, config=config, device="cpu")
    assert result.metrics["init_balance_changed"] > 0  # the zero-shot head is skewed on these textures

    zero_shot = Predictor.zero_shot(tiny_base_model, CLASSES, device="cpu")
    images = [open_image(path, draft_size=2 * zero_shot.size) for path in find_images(dtd_subset)]
    expected = sinkhorn_class_bias(zero_shot.probabilities(zero_shot.preprocess(images)))
    exported, _ = load_artifact(result.artifact_dir)
    assert torch.allclose(exported.class_bias, expected, atol=1e-4), (exported.class_bias, expected)
