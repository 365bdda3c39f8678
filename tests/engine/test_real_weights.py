"""Real-CLIP code paths, offline: `ViT-B-16:openai` with random weights of the real shapes.

The weights sit in a private Hugging Face cache exactly where open_clip's download looks for them, so
parsing, the offline check, open_clip's download and checkpoint loading all run as they would with the
real file. OpenAI's weights were trained with QuickGELU; a model built with nn.GELU for them loses
accuracy silently (open_clip only warns), so every place that builds the network is checked here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file
from torch import nn

from must_engine import Predictor
from must_engine.artifact import load_artifact, read_metadata
from must_engine.base_models import load_base_model, parse_base_model
from must_engine.config import resolve_config
from must_engine.train import adapt

ARCH, TAG = "ViT-B-16", "openai"
SNAPSHOT = "0" * 40


@pytest.fixture(scope="module")
def openai_weights(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, torch.Tensor]]:
    """Random ViT-B-16 weights in a hub cache of their own; yields the state dict that was written."""
    cache = tmp_path_factory.mktemp("hf-hub")
    repo = open_clip.get_pretrained_cfg(ARCH, TAG)["hf_hub"].strip("/")
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(SNAPSHOT)
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in open_clip.create_model(ARCH, pretrained=None).state_dict().items()}
    save_file(state, str(snapshot / "open_clip_model.safetensors"))
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield state


def activations(module: nn.Module) -> set[type]:
    """The activation classes inside the transformer MLPs (the only place CLIP uses one)."""
    return {type(block.mlp.gelu) for block in module.modules() if hasattr(block, "mlp")}


def test_openai_tag_is_parsed_as_quick_gelu() -> None:
    assert parse_base_model(f"{ARCH}:{TAG}").quick_gelu
    assert not parse_base_model(f"{ARCH}:laion2b_s34b_b88k").quick_gelu  # trained with nn.GELU


def test_base_model_is_built_with_quick_gelu_and_the_cached_weights(openai_weights: dict) -> None:
    base = load_base_model(f"{ARCH}:{TAG}")
    assert activations(base.model.visual) == {QuickGELU}
    assert activations(base.model.transformer) == {QuickGELU}
    assert base.model_cfg["quick_gelu"] is True
    loaded = base.model.state_dict()
    assert torch.equal(loaded["visual.proj"], openai_weights["visual.proj"])


def test_zero_shot_predictor_uses_quick_gelu(openai_weights: dict) -> None:
    predictor = Predictor.zero_shot(f"{ARCH}:{TAG}", ["cat", "dog"], device="cpu")
    assert activations(predictor.classifier.visual) == {QuickGELU}


def test_adapted_artifact_records_and_rebuilds_quick_gelu(
    openai_weights: dict, dtd_subset: Path, tmp_path: Path
) -> None:
    images = sorted(dtd_subset.rglob("*.jpg"))[:4]
    config = resolve_config(
        overrides={"epochs": 1, "batch_size": 2, "num_workers": 0, "templates": "sun397"},
        num_images=len(images), num_classes=2,
    )
    result = adapt(images, ["banded", "blotchy"], tmp_path / "model", base_model=f"{ARCH}:{TAG}",
                   config=config, device="cpu")
    assert read_metadata(result.artifact_dir)["model_cfg"]["quick_gelu"] is True
    classifier, _ = load_artifact(result.artifact_dir)
    assert activations(classifier.visual) == {QuickGELU}
    served = Predictor.load(result.artifact_dir, device="cpu")
    assert activations(served.classifier.visual) == {QuickGELU}
