"""ONNX export of a classifier: images in, class probabilities out, with the model's metadata inside.

Why: teams run the classifier outside the service (edge boxes, batch jobs on their cluster), where ONNX
Runtime is the common denominator. The graph takes what any image library produces after resizing:
uint8 RGB pixels, (batch, size, size, 3), already resized (shorter side, bicubic) and center-cropped to
`size`; scaling to [0, 1], normalisation, the image tower, the head and the softmax are inside the graph,
so a caller cannot get the mean/std or the channel order wrong. `pixels_for_onnx` is that resize + crop.

The metadata (class names in output order, preprocessing, base model, the artifact's metadata) is in the
model's `metadata_props`: ONNX Runtime reads it with `session.get_modelmeta().custom_metadata_map`.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

from must_engine.models import ImageClassifier

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
OPSET = 17
INPUT_LAYOUT = "uint8 RGB, (batch, size, size, 3): shorter side resized to size (bicubic), center-cropped"


class ProbabilityGraph(nn.Module):
    """uint8 NHWC pixels -> (batch, classes) probabilities: the Predictor's normalise + forward + softmax."""

    def __init__(self, classifier: ImageClassifier, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.classifier = classifier
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The same operations, in the same order, as torchvision's ToTensor + Normalize.
        pixels = images.permute(0, 3, 1, 2).float().div(255.0)
        pixels = (pixels - self.mean) / self.std
        return self.classifier(pixels).float().softmax(dim=-1)


def pixels_for_onnx(images: Sequence[Image.Image], size: int) -> np.ndarray:
    """The graph's input for PIL images: the Predictor's resize + center crop, as uint8 NHWC."""
    resize = T.Compose([T.Resize(size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(size)])
    return np.stack([np.asarray(resize(image.convert("RGB")), dtype=np.uint8) for image in images])


def onnx_metadata(class_names: Sequence[str], preprocess: dict[str, Any], metadata: dict[str, Any]) -> dict[str, str]:
    """String key/values for `metadata_props` (ONNX allows only strings)."""
    return {
        "must.class_names": json.dumps(list(class_names)),
        "must.preprocess": json.dumps({**preprocess, "input": INPUT_LAYOUT}),
        "must.base_model": str(metadata.get("base_model", "")),
        "must.metadata": json.dumps(metadata, default=str),
        "must.input_name": INPUT_NAME,
        "must.output_name": OUTPUT_NAME,
    }


def export_onnx(
    classifier: ImageClassifier,
    class_names: Sequence[str],
    preprocess: dict[str, Any],
    metadata: dict[str, Any],
) -> bytes:
    """The ONNX model as bytes, fp32, with a dynamic batch dimension (moves `classifier` to the CPU)."""
    import onnx

    size = int(preprocess["size"])
    graph = ProbabilityGraph(classifier, preprocess["mean"], preprocess["std"]).to("cpu", torch.float32).eval()
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    # Gradients on while tracing: under no_grad nn.MultiheadAttention takes its fused fast path, which has
    # no ONNX operator; the traced math is the same attention.
    # The TorchScript exporter is deprecated upstream but present in the pinned torch, and, unlike the
    # torch.export one, needs nothing beyond `onnx`.
    with tempfile.TemporaryDirectory(prefix="onnx-export-") as directory, torch.enable_grad():
        path = Path(directory) / "model.onnx"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            torch.onnx.export(
                graph, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=OPSET,
                dynamo=False,
            )  # fmt: skip
        model = onnx.load(str(path))
    for key, value in onnx_metadata(class_names, preprocess, metadata).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def export_artifact_onnx(artifact_dir: Path, out: Path) -> Path:
    """`must export`: an artifact directory -> an ONNX file."""
    from must_engine.artifact import load_artifact

    classifier, metadata = load_artifact(Path(artifact_dir))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(export_onnx(classifier, metadata["class_names"], metadata["preprocess"], metadata))
    return out
