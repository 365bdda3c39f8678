"""The ONNX export classifies as the engine does: ONNX Runtime's probabilities match PyTorch's on real
photos within fp32 round-off, and the file carries the class names and preprocessing a deployment needs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from must_engine import DEFAULT_BASE_MODEL, open_image
from must_engine.artifact import save_artifact
from must_engine.cli import main as must_main
from must_engine.onnx_export import INPUT_NAME, export_onnx, pixels_for_onnx
from must_engine.predictor import Predictor

ort = pytest.importorskip("onnxruntime")

DTD = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "dtd10"
CLASSES = ["banded", "blotchy", "braided", "bubbly", "bumpy"]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    """The shipped proxy's zero-shot classifier: real weights, a real head, offline."""
    return Predictor.zero_shot(DEFAULT_BASE_MODEL, CLASSES, device="cpu")


@pytest.fixture(scope="module")
def photos() -> list:
    paths = [sorted((DTD / name).glob("*.jpg"))[index] for name in CLASSES for index in (0, 7)]
    return [open_image(path) for path in paths]


def _session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def test_onnx_runtime_matches_pytorch_on_real_photos(predictor: Predictor, photos: list) -> None:
    model = export_onnx(predictor.classifier, predictor.class_names, predictor.preprocess_config, predictor.metadata)
    session = _session(model)
    reference = predictor.probabilities(predictor.preprocess(photos)).numpy()
    pixels = pixels_for_onnx(photos, predictor.size)
    assert pixels.dtype == np.uint8 and pixels.shape == (len(photos), predictor.size, predictor.size, 3)
    (onnx_probs,) = session.run(None, {INPUT_NAME: pixels})
    assert onnx_probs.shape == reference.shape
    np.testing.assert_allclose(onnx_probs, reference, rtol=0, atol=2e-6)
    assert (onnx_probs.argmax(1) == reference.argmax(1)).all()
    # The batch dimension is dynamic: one image alone gives the same row.
    (single,) = session.run(None, {INPUT_NAME: pixels[3:4]})
    np.testing.assert_allclose(single[0], reference[3], rtol=0, atol=2e-6)
    # Not a constant: different photos get different probabilities.
    assert np.abs(onnx_probs[0] - onnx_probs[-1]).max() > 1e-3


def test_the_file_carries_what_a_deployment_needs(predictor: Predictor) -> None:
    model = export_onnx(predictor.classifier, predictor.class_names, predictor.preprocess_config, predictor.metadata)
    session = _session(model)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["must.class_names"]) == predictor.class_names
    preprocess = json.loads(meta["must.preprocess"])
    assert preprocess["size"] == predictor.size and len(preprocess["mean"]) == 3 and "uint8" in preprocess["input"]
    assert meta["must.base_model"] == DEFAULT_BASE_MODEL
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    assert session.get_outputs()[0].shape[1] == len(CLASSES)


def test_must_export_writes_an_artifact_as_onnx(predictor: Predictor, photos: list, tmp_path: Path, capsys) -> None:
    artifact = tmp_path / "model"
    save_artifact(
        artifact, predictor.classifier, class_names=predictor.class_names, base_model=DEFAULT_BASE_MODEL,
        model_cfg=_model_cfg(), preprocess=predictor.preprocess_config, config={}, metrics={}, exported="teacher",
    )  # fmt: skip
    out = tmp_path / "out" / "model.onnx"
    assert must_main(["export", "--model", str(artifact), "--format", "onnx", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    (probs,) = _session(out.read_bytes()).run(None, {INPUT_NAME: pixels_for_onnx(photos[:2], predictor.size)})
    expected = predictor.probabilities(predictor.preprocess(photos[:2])).numpy()
    np.testing.assert_allclose(probs, expected, rtol=0, atol=2e-6)
    assert must_main(["export", "--model", str(tmp_path), "--out", str(out)]) == 2  # not an artifact


def _model_cfg() -> dict:
    from must_engine.base_models import load_base_model

    return load_base_model(DEFAULT_BASE_MODEL).model_cfg
