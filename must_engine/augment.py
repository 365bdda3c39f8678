"""The two views MUST trains on: a weak one for the teacher and a strong one for the student."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageOps
from timm.data.auto_augment import RandAugment, rand_augment_transform
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode


def _posterize(image: Image.Image, bits: int, **_: Any) -> Image.Image:
    """timm's posterize, but defined at 0 bits (a black image, as Pillow < 13 gave) instead of raising.

    The reference policy (rand-m9-mstd0.5-inc1) reaches 0 bits whenever the sampled magnitude hits 10.
    """
    if bits <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, min(bits, 8))


def rand_augment(policy: str, size: int, fill: tuple[int, ...]) -> RandAugment:
    transform = rand_augment_transform(policy, {"translate_const": int(size * 0.45), "img_mean": fill})
    for op in transform.ops:
        if op.aug_fn.__name__ == "posterize":
            op.aug_fn = _posterize
    return transform


def _normalize(mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    return T.Compose([T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))])


def weak_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Resize the shorter side, random crop: the teacher's view (reference code)."""
    return T.Compose([
        T.Resize(size, interpolation=InterpolationMode.BICUBIC),
        T.RandomCrop(size),
        _normalize(mean, std),
    ])


def strong_transform(
    size: int, mean: Sequence[float], std: Sequence[float], *, scale_min: float, randaugment: str
) -> T.Compose:
    """RandomResizedCrop + flip + timm RandAugment (m9, mstd0.5): the student's view."""
    fill = tuple(round(255 * m) for m in mean)
    return T.Compose([
        T.RandomResizedCrop(size, scale=(scale_min, 1.0), interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        rand_augment(randaugment, size, fill),
        _normalize(mean, std),
    ])


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Resize the shorter side, center crop: CLIP's inference preprocessing."""
    return T.Compose([
        T.Resize(size, interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        _normalize(mean, std),
    ])


def to_batch(images: Sequence[Image.Image], transform: T.Compose) -> torch.Tensor:
    return torch.stack([transform(image) for image in images])
