"""Engine fixtures: a tiny random-weight open_clip model in local-dir layout, and real DTD images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
DTD = DATASETS / "dtd10"

TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_model(directory: Path, seed: int = 0, model_cfg: dict | None = None) -> str:
    """A real open_clip CLIP with random weights, saved so open_clip loads it as `local-dir:`."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model_cfg = model_cfg or TINY_MODEL_CFG
    model = open_clip.CLIP(**model_cfg)
    (directory / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_cfg,
        "preprocess_cfg": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "open_clip_model.safetensors"))
    return f"local-dir:{directory}"


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def patch_dropout_base_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model as if it had been trained with patch dropout (open_clip's `patch_dropout`)."""
    cfg = {**TINY_MODEL_CFG, "vision_cfg": {**TINY_MODEL_CFG["vision_cfg"], "patch_dropout": 0.5}}
    return write_tiny_model(tmp_path_factory.mktemp("tiny-clip-patch-dropout"), model_cfg=cfg)


@pytest.fixture(scope="session")
def dtd_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled copy of 8 images from each of 3 DTD classes (labels used only by eval)."""
    root = tmp_path_factory.mktemp("dtd-subset")
    for class_dir in sorted(DTD.iterdir())[:3]:
        (root / class_dir.name).mkdir()
        for image in sorted(class_dir.glob("*.jpg"))[:8]:
            shutil.copy(image, root / class_dir.name / image.name)
    return root
