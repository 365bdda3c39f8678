"""The serving predictor: preprocessing on a thread pool must give exactly the serial result."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from must_engine import Predictor


def test_threaded_preprocessing_equals_serial(tiny_base_model: str, dtd_subset: Path) -> None:
    images = [Image.open(p).convert("RGB") for p in sorted(dtd_subset.rglob("*.jpg"))[:20]]  # varying sizes
    zero_shot = Predictor.zero_shot(tiny_base_model, ["braided", "dotted"], device="cpu")
    preprocess = {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    serial, threaded = (
        Predictor(zero_shot.classifier, zero_shot.class_names, preprocess, zero_shot.metadata, device="cpu",
                  preprocess_threads=threads)
        for threads in (1, 4)
    )
    pixels = threaded.preprocess(images)
    assert pixels.shape == (20, 3, 32, 32)
    assert torch.equal(pixels, serial.preprocess(images))
    assert threaded.classify(images) == serial.classify(images)
