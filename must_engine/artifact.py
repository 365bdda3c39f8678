"""The adapted-model artifact: `model.safetensors` (image tower + head) and `metadata.json`.

Rebuilding needs only open_clip's vision-tower constructor and the model config stored in the
metadata: no text tower, no base-model weights, no training code.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from open_clip.model import _build_vision_tower
from safetensors.torch import load_file, save_file

from must_engine.models import ImageClassifier
from must_engine.version import ENGINE_VERSION

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"
FORMAT = "must-artifact/1"


def build_classifier(model_cfg: dict[str, Any], num_classes: int) -> ImageClassifier:
    """An ImageClassifier with this architecture and an uninitialised head, ready for load_state_dict."""
    visual = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg.get("quick_gelu", False))
    return ImageClassifier(visual, torch.zeros(model_cfg["embed_dim"], num_classes))


def preprocess_metadata(preprocess_cfg: dict[str, Any], input_size: int) -> dict[str, Any]:
    return {
        "size": input_size,
        "mean": list(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        "std": list(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        "interpolation": "bicubic",
        "resize": "shorter_side",
        "crop": "center",
    }


def save_artifact(
    directory: Path, classifier: ImageClassifier, *, class_names: list[str], base_model: str,
    model_cfg: dict[str, Any], preprocess: dict[str, Any], config: dict[str, Any], metrics: dict[str, Any],
    exported: str, unknown: dict[str, Any] | None = None,
) -> Path:
    """Write weights then metadata (metadata last: its presence marks a complete artifact).

    `unknown`: the score and threshold for images of no known class, fitted on the bucket (must_engine/unknown.py).
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in classifier.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    metadata = {
        "format": FORMAT,
        "engine_version": ENGINE_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "class_names": list(class_names),
        "base_model": base_model,
        "model_cfg": model_cfg,
        "preprocess": preprocess,
        "config": config,
        "metrics": metrics,
        "exported": exported,
    }
    if unknown is not None:
        metadata["unknown"] = unknown
    temporary = directory / (METADATA_FILE + ".tmp")
    temporary.write_text(json.dumps(metadata, indent=2))
    os.replace(temporary, directory / METADATA_FILE)
    return directory


def read_metadata(directory: Path) -> dict[str, Any]:
    path = Path(directory) / METADATA_FILE
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{directory} is not a MUST model artifact: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{directory}: unsupported artifact format {metadata.get('format')!r}")
    return dict(metadata)


def load_artifact(directory: Path) -> tuple[ImageClassifier, dict[str, Any]]:
    metadata = read_metadata(directory)
    classifier = build_classifier(metadata["model_cfg"], len(metadata["class_names"]))
    state = load_file(str(Path(directory) / WEIGHTS_FILE))
    state.setdefault("class_bias", torch.zeros(classifier.num_classes))  # artifacts from before balancing
    classifier.load_state_dict(state)
    return classifier.eval(), metadata


def is_artifact(path: Path) -> bool:
    return (Path(path) / METADATA_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()
