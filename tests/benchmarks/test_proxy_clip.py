"""The proxy pretraining tool: it learns, and what it writes is an open_clip base model that loads offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before open_clip imports huggingface_hub: nothing here may reach a hub

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from benchmarks import proxy_clip
from benchmarks.proxy_clip import LabelledImages, Recipe

CLASSES = ["cat", "dog", "ship", "truck"]


def synthetic_set(n: int, size: int = 32, seed: int = 0) -> LabelledImages:
    """Each class a distinct base colour plus noise: learnable in a few steps, like a trivial CIFAR."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    palette = rng.integers(0, 256, (len(CLASSES), 1, 1, 3))
    images = np.clip(palette[labels] + rng.normal(0, 20, (n, size, size, 3)), 0, 255).astype(np.uint8)
    return LabelledImages(images, labels.astype(np.int64), list(CLASSES))


def write_npz(path: Path, data: LabelledImages) -> Path:
    np.savez(path, images=data.images, labels=data.labels.astype(np.int16), classes=np.array(data.classes))
    return path


def test_run_writes_a_local_dir_that_open_clip_loads_and_classifies_with(tmp_path: Path) -> None:
    data = write_npz(tmp_path / "train.npz", synthetic_set(32))
    out = tmp_path / "proxy"
    meta = proxy_clip.main(
        [
            "--preset",
            "tiny",
            "--out",
            str(out),
            "--data",
            str(data),
            "--eval-data",
            str(data),
            "--max-steps",
            "3",
            "--batch-size",
            "16",
        ]
    )

    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"] == proxy_clip.load_model_config("proxy-tiny")
    assert config["preprocess_cfg"]["size"] == 32
    assert config["proxy"]["classes"] == CLASSES and config["proxy"]["steps"] == 3
    assert config["proxy"]["clean_zero_shot_top1"] == meta["clean_zero_shot_top1"]
    assert 0.0 <= meta["clean_zero_shot_top1"] <= 1.0
    saved = load_file(str(out / "open_clip_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float16}

    model = open_clip.create_model(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    assert tokenizer.context_length == 16
    loaded = model.state_dict()
    assert loaded["visual.conv1.weight"].dtype == torch.float32
    assert all(torch.equal(loaded[k], v.float()) for k, v in saved.items())

    head = open_clip.build_zero_shot_classifier(model, tokenizer, CLASSES, config["proxy"]["templates"])
    x = proxy_clip.model_input(model, torch.rand(5, 3, 32, 32))
    with torch.no_grad():
        logits = model.encode_image(x, normalize=True) @ head
    assert logits.shape == (5, len(CLASSES)) and torch.isfinite(logits).all()


def test_loss_decreases_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = proxy_clip.build_model(proxy_clip.load_model_config("proxy-tiny"))
    recipe = Recipe("proxy-tiny", epochs=1, batch_size=16, lr=5e-4, weight_decay=0.0, warmup_steps=0)
    stats = proxy_clip.fit(model, synthetic_set(16), recipe, max_steps=20)  # 16 images: every step one batch
    assert len(stats.epoch_losses) == 20
    assert np.mean(stats.epoch_losses[-3:]) < stats.epoch_losses[0] - 0.5


def test_small_preset_builds_and_takes_two_steps(tmp_path: Path) -> None:
    data = write_npz(tmp_path / "train.npz", synthetic_set(8))
    out = tmp_path / "small"
    proxy_clip.main(
        [
            "--preset",
            "small",
            "--out",
            str(out),
            "--data",
            str(data),
            "--no-eval",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
        ]
    )
    model = open_clip.create_model(f"local-dir:{out}")
    assert model.visual.image_size == (64, 64)
    assert 10e6 < sum(p.numel() for p in model.parameters()) < 60e6
    with torch.no_grad():  # 32 px training images were upsampled to the model's 64 px
        assert model.encode_image(proxy_clip.model_input(model, torch.rand(2, 3, 32, 32))).shape == (2, 256)


def test_augment_crops_and_flips_each_sample_independently() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8).repeat(16, 1, 1, 1)
    unpadded = proxy_clip.augment(x, pad=0, gen=torch.Generator().manual_seed(0))
    flipped = [torch.equal(a, b.flip(-1)) for a, b in zip(unpadded, x, strict=True)]
    assert all(f or torch.equal(a, b) for f, a, b in zip(flipped, unpadded, x, strict=True))
    assert 0 < sum(flipped) < len(x)

    shifted = proxy_clip.augment(x, pad=2, gen=torch.Generator().manual_seed(1))
    assert shifted.shape == x.shape
    assert torch.equal(shifted, proxy_clip.augment(x, pad=2, gen=torch.Generator().manual_seed(1)))
    assert not torch.equal(shifted, proxy_clip.augment(x, pad=2, gen=torch.Generator().manual_seed(2)))


def test_captions_that_would_be_truncated_are_refused() -> None:
    tokenizer = open_clip.SimpleTokenizer(context_length=16)
    assert proxy_clip.tokenize_captions(tokenizer, CLASSES).shape == (len(proxy_clip.TEMPLATES), len(CLASSES), 16)
    with pytest.raises(ValueError, match="context length"):
        proxy_clip.tokenize_captions(tokenizer, ["a very long class name with many many words in it"])


def test_folder_sets_are_read_per_class_and_resized(tmp_path: Path) -> None:
    for name, size in [("dog", (40, 60)), ("cat", (50, 50)), ("cat", (64, 33))]:
        (tmp_path / name).mkdir(exist_ok=True)
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / name / f"{size[0]}x{size[1]}.png")
    data = proxy_clip.load_labelled(tmp_path, size=32)
    assert data.classes == ["cat", "dog"]
    assert data.images.shape == (3, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.labels.tolist() == [0, 0, 1]
    assert np.abs(data.images.astype(int) - [200, 10, 10]).max() <= 1
