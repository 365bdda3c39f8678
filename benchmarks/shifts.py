"""Shifted target domains built from CIFAR-10 test images, in the spirit of CIFAR-10-C / ImageNet-C.

Each shift maps uint8 (N, H, W, 3) images to uint8 images of the same shape with numpy and PIL only,
deterministically given a seed, at a severity from 1 (mild) to 5 (harsh). The folder writer produces
``DIR/<shift>/<class name>/<index>.png``: ``must eval`` reads labels from the folder names and ``must adapt``
reads the same folder recursively, ignoring them.

    python -m benchmarks.shifts --out runs/shifts                      # every shift at the default severity
    python -m benchmarks.shifts --model must_engine/base_models/proxy-cifar10-tiny   # zero-shot per shift
    python -m benchmarks.shifts --out runs/longtail --shifts fog,pixelate --long-tail 10 --max-per-class 300
    python -m benchmarks.shifts --out runs/lt_clean --shifts none --long-tail 10   # the test images unshifted
"""

from __future__ import annotations

import argparse
import io
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.proxy_clip import CIFAR10_DIR, LabelledImages, load_labelled, load_proxy, zero_shot_accuracy

# Chosen so that the tiny proxy's zero-shot accuracy drops well below its clean accuracy (docs/PROXY.md).
DEFAULT_SEVERITY = 5

Corruption = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def gaussian_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(scale=sigma, size=x.shape).astype(np.float32)


def impulse_noise(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper on a fraction of the values, each channel independently."""
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    return np.where(hit, salt.astype(np.float32), x)


def defocus_blur(x: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Convolution with an anti-aliased disk, the optical model of an out-of-focus lens."""
    return convolve(x, disk_kernel(radius))


def contrast(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    mean = x.mean(axis=(1, 2), keepdims=True)
    return (x - mean) * factor + mean


def fog(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency haze: a plasma fractal added to every image, then rescaled like CIFAR-10-C's fog."""
    haze = plasma_fractal(len(x), max(x.shape[1:3]), rng)[:, : x.shape[1], : x.shape[2], None]
    x = x + strength * haze
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    return x * peak / (peak + strength)


def brightness(x: np.ndarray, delta: float, rng: np.random.Generator) -> np.ndarray:
    """Adds delta to HSV value; with hue and saturation fixed that scales RGB by the value's change."""
    value = x.max(axis=3, keepdims=True)
    new_value = np.minimum(value + delta, 1.0)
    return np.where(value > 0, x * new_value / np.maximum(value, 1e-6), new_value)


def pixelate(x: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Box-downsample to scale x size and back, like a low-resolution sensor."""
    h, w = x.shape[1:3]
    small = (max(1, round(w * scale)), max(1, round(h * scale)))

    def down_up(img: Image.Image) -> Image.Image:
        return img.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX)

    return np.stack([_via_pil(img, down_up) for img in x])


def jpeg_compression(x: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    def roundtrip(img: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=int(quality))
        return Image.open(buffer).convert("RGB")

    return np.stack([_via_pil(img, roundtrip) for img in x])


# name -> (corruption, its parameter at severity 1..5); CIFAR-10-C's values where it has the shift.
SHIFTS: dict[str, tuple[Corruption, tuple[float, ...]]] = {
    "gaussian_noise": (gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10)),
    "impulse_noise": (impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07)),
    "defocus_blur": (defocus_blur, (0.75, 1.0, 1.25, 1.5, 2.0)),
    "contrast": (contrast, (0.75, 0.5, 0.4, 0.3, 0.15)),
    "fog": (fog, (0.2, 0.5, 0.75, 1.0, 1.5)),
    "brightness": (brightness, (0.1, 0.2, 0.3, 0.4, 0.5)),
    "pixelate": (pixelate, (0.6, 0.5, 0.4, 0.33, 0.25)),
    "jpeg_compression": (jpeg_compression, (30, 20, 15, 10, 7)),
}
# Not a shift: the source images as they are, so a long-tailed or subsampled clean target is built the same way.
NO_SHIFT = "none"


def apply_shift(images: np.ndarray, shift: str, severity: int = DEFAULT_SEVERITY, seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the same images under `shift`; the same seed gives the same pixels."""
    if shift == NO_SHIFT:
        return images.copy()
    corruption, params = SHIFTS[shift]
    if not 1 <= severity <= len(params):
        raise ValueError(f"severity must be in 1..{len(params)}, got {severity}")
    rng = np.random.default_rng([seed, zlib.crc32(shift.encode())])
    out = corruption(images.astype(np.float32) / 255, params[severity - 1], rng)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def shifted_test_set(
    shift: str, severity: int = DEFAULT_SEVERITY, seed: int = 0, limit: int | None = None,
    source: Path = CIFAR10_DIR / "test.npz", long_tail: float | None = None, max_per_class: int = 300,
) -> tuple[LabelledImages, np.ndarray]:
    """The shifted test images in memory, plus each one's index in the source set (stable file names).

    With `long_tail` the subset is long-tailed instead of a uniform `limit`: see long_tailed_subset.
    """
    data = load_labelled(source)
    if long_tail is None:
        index = subset(len(data.labels), limit, seed)
    else:
        index = long_tailed_subset(data.labels, long_tail, max_per_class, seed)
    images = apply_shift(data.images[index], shift, severity, seed)
    return LabelledImages(images, data.labels[index], data.classes), index


def subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """A seeded random subset, sorted; the source may be ordered by class, so a prefix would not do."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def long_tailed_subset(labels: np.ndarray, ratio: float, max_per_class: int, seed: int) -> np.ndarray:
    """Class counts falling geometrically from `max_per_class` to `max_per_class / ratio`, in a seeded order.

    Real buckets are not class-balanced; this flatters neither the fairness term nor a balancing peer.
    Which class is frequent is drawn from the seed too, so no class is always the head.
    """
    rng = np.random.default_rng([seed, 1])
    classes = np.unique(labels)
    ranks = rng.permutation(len(classes))
    picked = []
    for rank, label in zip(ranks, classes, strict=True):
        count = round(max_per_class * ratio ** (-rank / (len(classes) - 1)))
        members = np.flatnonzero(labels == label)
        if count > len(members):
            raise ValueError(f"class {label} has {len(members)} images, {count} asked")
        picked.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(picked))


def write_folder(data: LabelledImages, index: np.ndarray, out_dir: Path) -> None:
    """out_dir/<class name>/<index>.png, lossless so the shift is exactly what was computed."""
    for image, label, i in zip(data.images, data.labels, index, strict=True):
        folder = out_dir / data.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")


def convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Same-size 2-D convolution of every image and channel with a small kernel, reflect-padded."""
    k = kernel.shape[0] // 2
    padded = np.pad(x, ((0, 0), (k, k), (k, k), (0, 0)), mode="reflect")
    h, w = x.shape[1:3]
    out = np.zeros_like(x)
    for dy, dx in zip(*np.nonzero(kernel), strict=True):
        out += kernel[dy, dx] * padded[:, dy : dy + h, dx : dx + w]
    return out


def disk_kernel(radius: float, supersample: int = 8) -> np.ndarray:
    """Fraction of each pixel covered by a disk of the given radius, normalised to sum to one."""
    k = int(np.ceil(radius))
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    grid = (np.arange(-k, k + 1)[:, None] + offsets[None, :]).ravel()
    inside = (grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2
    coverage = inside.reshape(2 * k + 1, supersample, 2 * k + 1, supersample).mean(axis=(1, 3))
    return (coverage / coverage.sum()).astype(np.float32)


def plasma_fractal(n: int, size: int, rng: np.random.Generator, decay: float = 3.0) -> np.ndarray:
    """n diamond-square height maps in [0, 1], (n, size, size) with size a power of two; detail decays by `decay`."""
    side = 1 << max(0, size - 1).bit_length()
    maps = np.zeros((n, side, side), dtype=np.float32)
    step, wibble = side, 100.0

    def wibbled_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = maps[:, ::step, ::step]
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        maps[:, half::step, half::step] = wibbled_mean(square)
        centres = maps[:, half::step, half::step]
        corners = maps[:, ::step, ::step]
        top = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        maps[:, ::step, half::step] = wibbled_mean(top)
        left = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        maps[:, half::step, ::step] = wibbled_mean(left)
        step, wibble = half, wibble / decay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


def _via_pil(image: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    pil = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.asarray(fn(pil), dtype=np.float32) / 255


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write DIR/<shift>/<class>/<index>.png")
    parser.add_argument("--model", type=Path, help="print this proxy's zero-shot top-1, clean and per shift")
    parser.add_argument("--shifts", default=",".join(SHIFTS),
                        help=f"comma-separated, from: {', '.join(SHIFTS)}, or {NO_SHIFT} (unshifted)")
    parser.add_argument("--severity", type=int, default=DEFAULT_SEVERITY, help="1 (mild) .. 5 (harsh)")
    parser.add_argument("--limit", type=int, help="a seeded random subset of this many test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long-tail", type=float, metavar="RATIO",
                        help="long-tailed subset: the most frequent class has RATIO times the least frequent's images")
    parser.add_argument("--max-per-class", type=int, default=300, help="with --long-tail: the head class's count")
    parser.add_argument("--source", type=Path, default=CIFAR10_DIR / "test.npz", help="labelled .npz")
    args = parser.parse_args(argv)
    if args.out is None and args.model is None:
        parser.error("give --out, --model or both")
    args.shifts = args.shifts.split(",")
    unknown = sorted(set(args.shifts) - set(SHIFTS) - {NO_SHIFT})
    if unknown:
        parser.error(f"unknown shifts {unknown}; known: {', '.join(SHIFTS)}, {NO_SHIFT}")
    return args


def proxy_scorer(model_dir: Path) -> Callable[[LabelledImages], float]:
    """Zero-shot top-1 of a saved proxy, with the class names and templates it was trained with."""
    model, tokenizer, meta = load_proxy(model_dir)
    return lambda data: zero_shot_accuracy(model, tokenizer, data, meta["classes"], meta["templates"])


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    score = proxy_scorer(args.model) if args.model else None
    results: dict[str, float] = {}
    if score:
        clean = load_labelled(args.source)
        index = subset(len(clean.labels), args.limit, args.seed)
        results["clean"] = score(LabelledImages(clean.images[index], clean.labels[index], clean.classes))
        print(f"{'clean':<18} {results['clean']:.4f}", flush=True)
    for shift in args.shifts:
        data, index = shifted_test_set(shift, args.severity, args.seed, args.limit, args.source,
                                       long_tail=args.long_tail, max_per_class=args.max_per_class)
        if args.out:
            write_folder(data, index, args.out / shift)
        if score:
            results[shift] = score(data)
            print(f"{shift:<18} {results[shift]:.4f}", flush=True)
    if score:
        mean = np.mean([results[shift] for shift in args.shifts])
        print(f"{'mean over shifts':<18} {mean:.4f}  (severity {args.severity})", flush=True)
    if args.out:
        print(f"wrote {len(args.shifts)} shifts to {args.out}", flush=True)
    return results


if __name__ == "__main__":
    main()
