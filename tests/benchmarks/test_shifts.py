"""Shifted target domains: deterministic, shape-preserving, really shifted, and written in the labelled layout."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before open_clip imports huggingface_hub: nothing here may reach a hub

import colorsys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import shifts
from benchmarks.proxy_clip import load_labelled

CLASSES = ["airplane", "bird", "ship"]


def smooth_images(n: int = 12, seed: int = 0) -> np.ndarray:
    """Photo-like test images: bicubic-upsampled random 4x4 colour grids plus one sharp bar each."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        grid = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        image = np.array(grid.resize((32, 32), Image.Resampling.BICUBIC))
        row = rng.integers(4, 28)
        image[row : row + 3] = rng.integers(0, 256, 3)
        images.append(image)
    return np.stack(images)


@pytest.mark.parametrize("shift", list(shifts.SHIFTS))
def test_each_shift_is_deterministic_shape_preserving_and_grows_with_severity(shift: str) -> None:
    x = smooth_images()
    out = shifts.apply_shift(x, shift, severity=3, seed=7)
    assert out.shape == x.shape and out.dtype == np.uint8
    assert np.array_equal(out, shifts.apply_shift(x, shift, severity=3, seed=7))
    change = [np.abs(shifts.apply_shift(x, shift, s).astype(int) - x).mean() for s in (1, 3, 5)]
    assert 0.5 < change[0] < change[1] < change[2], change


@pytest.mark.parametrize("shift", ["gaussian_noise", "impulse_noise", "fog"])
def test_random_shifts_depend_on_the_seed(shift: str) -> None:
    x = smooth_images()
    assert not np.array_equal(shifts.apply_shift(x, shift, seed=0), shifts.apply_shift(x, shift, seed=1))


def test_severity_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="severity"):
        shifts.apply_shift(smooth_images(2), "contrast", severity=6)


def test_brightness_adds_to_the_hsv_value() -> None:
    x = smooth_images(2)
    out = shifts.apply_shift(x, "brightness", severity=2)
    delta = shifts.SHIFTS["brightness"][1][1]
    for pixel, shifted in zip(x.reshape(-1, 3)[::37], out.reshape(-1, 3)[::37], strict=True):
        h, s, v = colorsys.rgb_to_hsv(*(pixel / 255))
        expected = np.array(colorsys.hsv_to_rgb(h, s, min(v + delta, 1.0))) * 255
        assert np.abs(shifted - expected).max() <= 1


def test_defocus_kernel_is_a_normalised_symmetric_disk() -> None:
    kernel = shifts.disk_kernel(1.5)
    assert kernel.shape == (5, 5) and kernel.sum() == pytest.approx(1.0)
    assert np.allclose(kernel, kernel.T) and np.allclose(kernel, kernel[::-1])
    assert kernel[2, 2] == kernel.max() and kernel[0, 0] == 0


def test_cli_writes_the_labelled_layout_that_loads_back(tmp_path: Path) -> None:
    labels = np.repeat(np.arange(len(CLASSES)), 4)  # sorted by class, like the CIFAR-10 test split
    source = tmp_path / "test.npz"
    np.savez(source, images=smooth_images(len(labels)), labels=labels.astype(np.int16), classes=np.array(CLASSES))
    out = tmp_path / "shifts"
    shifts.main(["--out", str(out), "--shifts", "contrast,pixelate", "--limit", "6", "--source", str(source)])

    assert sorted(p.name for p in out.iterdir()) == ["contrast", "pixelate"]
    data, index = shifts.shifted_test_set("contrast", limit=6, source=source)
    written = load_labelled(out / "contrast")
    assert written.classes == [c for c in CLASSES if c in {CLASSES[label] for label in labels[index]}]
    assert len(written.labels) == 6 == len(set(index.tolist()))
    for image, label, i in zip(data.images, data.labels, index, strict=True):
        path = out / "contrast" / CLASSES[label] / f"{i:05d}.png"
        assert np.array_equal(np.array(Image.open(path)), image)


def test_no_shift_writes_the_source_images_unchanged(tmp_path: Path) -> None:
    labels = np.repeat(np.arange(len(CLASSES)), 4)
    source = tmp_path / "test.npz"
    images = smooth_images(len(labels))
    np.savez(source, images=images, labels=labels.astype(np.int16), classes=np.array(CLASSES))
    shifts.main(["--out", str(tmp_path / "out"), "--shifts", "none", "--source", str(source)])

    out = tmp_path / "out" / "none"
    assert len(load_labelled(out).labels) == len(labels)
    for i, label in enumerate(labels):
        assert np.array_equal(np.array(Image.open(out / CLASSES[label] / f"{i:05d}.png")), images[i])
    with pytest.raises(SystemExit):
        shifts.main(["--out", str(tmp_path / "x"), "--shifts", "blur", "--source", str(source)])


def test_long_tailed_subset_falls_tenfold_and_varies_the_head_with_the_seed() -> None:
    labels = np.repeat(np.arange(10), 1000)
    index = shifts.long_tailed_subset(labels, ratio=10, max_per_class=300, seed=0)
    counts = np.bincount(labels[index], minlength=10)
    assert sorted(counts.tolist(), reverse=True) == [300, 232, 180, 139, 108, 83, 65, 50, 39, 30]
    assert len(set(index.tolist())) == len(index) == counts.sum()
    other = np.bincount(labels[shifts.long_tailed_subset(labels, ratio=10, max_per_class=300, seed=1)], minlength=10)
    assert counts.argmax() != other.argmax() or counts.tolist() != other.tolist()
    with pytest.raises(ValueError, match="asked"):
        shifts.long_tailed_subset(labels, ratio=10, max_per_class=1001, seed=0)
