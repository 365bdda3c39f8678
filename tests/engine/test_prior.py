"""The job's class prior: parsed by class name or in class order, and the marginal both balancings move to."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from must_engine import ConfigError, Predictor, adapt
from must_engine.artifact import load_artifact
from must_engine.balance import sinkhorn_class_bias
from must_engine.config import MustConfig, resolve_config
from must_engine.images import find_images, open_image
from must_engine.presets import ModelGeometry
from must_engine.prior import ClassPriorError, parse_class_prior, target_marginal

CLASSES = ["banded", "blotchy", "braided"]
GEOMETRY = ModelGeometry(image_size=32, patch_size=8)


def test_a_prior_by_class_name_becomes_shares_in_class_order() -> None:
    # counts on any scale; names matched ignoring case and spacing; order of the object does not matter
    assert parse_class_prior({"Braided": 1, " blotchy ": 3, "banded": 6}, CLASSES, 3) == pytest.approx((0.6, 0.3, 0.1))
    assert parse_class_prior([2, 1.0, 1], CLASSES, 3) == pytest.approx((0.5, 0.25, 0.25))
    assert parse_class_prior([2, 1, 1], None, 3) == pytest.approx((0.5, 0.25, 0.25))  # a list needs no names
    for nothing in (None, {}, []):
        assert parse_class_prior(nothing, CLASSES, 3) == ()


@pytest.mark.parametrize(("value", "says"), [
    ({"banded": 1, "blotchy": 1, "striped": 1}, "'striped', which is not one of the class names"),
    ({"banded": 1, "blotchy": 1}, "missing: braided"),
    ({"banded": 1, "Banded": 2, "blotchy": 1, "braided": 1}, "names 'banded' twice"),
    ({"banded": 0, "blotchy": 1, "braided": 1}, "'banded' must be a positive number, got 0"),
    ({"banded": -1, "blotchy": 1, "braided": 1}, "must be a positive number"),
    ({"banded": True, "blotchy": 1, "braided": 1}, "must be a positive number, got True"),
    ({"banded": "3", "blotchy": 1, "braided": 1}, "must be a positive number, got '3'"),
    ([1, 1, math.inf], "'braided' must be a positive number, got inf"),
    ([1, 1, math.nan], "must be a positive number"),
    ([1, 1], "needs 3 weights, one per class, got 2"),
    ([1e308, 1e308, 1], "too large to add up"),
    ("banded", "must be an object"),
    (0.5, "must be an object"),
])
def test_a_prior_that_does_not_describe_these_classes_is_refused(value: Any, says: str) -> None:
    with pytest.raises(ClassPriorError, match=None) as caught:
        parse_class_prior(value, CLASSES, 3)
    assert says in str(caught.value)


def test_a_prior_by_name_without_the_class_names_is_refused() -> None:
    with pytest.raises(ClassPriorError, match="needs the job's class names"):
        parse_class_prior({"banded": 1}, None, 3)


def test_the_resolved_config_stores_the_prior_as_a_list_and_round_trips() -> None:
    config = resolve_config(overrides={"class_prior": {"banded": 2, "blotchy": 1, "braided": 1}}, num_images=24,
                            num_classes=3, geometry=GEOMETRY, class_names=CLASSES)
    assert config.class_prior == pytest.approx((0.5, 0.25, 0.25))
    stored = config.to_dict()
    assert stored["class_prior"] == pytest.approx([0.5, 0.25, 0.25])
    assert MustConfig.from_dict(stored) == config
    # the stored list is accepted back as an override (a job's resolved config re-resolved)
    again = resolve_config(overrides={"class_prior": stored["class_prior"]}, num_images=24, num_classes=3,
                           geometry=GEOMETRY)
    assert again.class_prior == pytest.approx(config.class_prior)
    assert resolve_config(num_images=24, num_classes=3, geometry=GEOMETRY).class_prior == ()


def test_a_bad_prior_is_a_config_error_on_its_field() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_config(overrides={"class_prior": {"banded": 1}}, num_images=24, num_classes=3, geometry=GEOMETRY,
                       class_names=CLASSES)
    assert caught.value.code == "invalid_class_prior" and caught.value.field == "class_prior"
    assert "missing: blotchy, braided" in str(caught.value)


def test_the_offsets_move_the_class_marginal_to_the_prior() -> None:
    generator = torch.Generator().manual_seed(0)
    probs = (torch.randn(900, 3, generator=generator) * 2).softmax(dim=-1)
    prior = (0.7, 0.2, 0.1)
    balanced = (probs.log() + sinkhorn_class_bias(probs, prior)).softmax(dim=-1)
    assert torch.allclose(balanced.sum(dim=0).double(), 900 * torch.tensor(prior, dtype=torch.float64), atol=0.5)
    # no prior: uniform, as before the prior existed
    assert torch.allclose(sinkhorn_class_bias(probs), sinkhorn_class_bias(probs, (1 / 3, 1 / 3, 1 / 3)), atol=1e-5)
    assert torch.equal(target_marginal((), 4), torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ClassPriorError):
        target_marginal((0.5, 0.5), 3)


def test_a_run_with_a_prior_serves_the_bucket_with_that_marginal(
    tiny_base_model: str, dtd_subset: Path, tmp_path: Path
) -> None:
    """Both balancings (before training and at export) use the job's prior: served over the bucket, the
    exported model's mean prediction is the prior, not uniform."""
    prior = {"banded": 6, "blotchy": 3, "braided": 1}
    config = resolve_config(overrides={"epochs": 1, "batch_size": 8, "num_workers": 0, "mim": False,
                                       "class_prior": prior}, num_images=24, num_classes=3, geometry=GEOMETRY,
                            class_names=CLASSES)
    assert config.balance_init and config.balance_classes  # auto's
    result = adapt(dtd_subset, CLASSES, tmp_path / "model", base_model=tiny_base_model, config=config, device="cpu")
    assert result.metrics["init_balance_class_share_max"] > 0.5  # the start was balanced to the prior too
    served = Predictor.load(result.artifact_dir, device="cpu")
    images = [open_image(path, draft_size=2 * served.size) for path in find_images(dtd_subset)]
    marginal = served.probabilities(served.preprocess(images)).mean(dim=0)
    assert torch.allclose(marginal, torch.tensor([0.6, 0.3, 0.1]), atol=1e-3), marginal
    _, metadata = load_artifact(result.artifact_dir)
    assert metadata["config"]["class_prior"] == pytest.approx([0.6, 0.3, 0.1])
