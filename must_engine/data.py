"""Unlabeled training data: image discovery, the two-view dataset, and a resumable sampler.

Every sample's randomness (crops, RandAugment, mask) is seeded from (seed, epoch, index), so the data
stream is a pure function of the position in training: a resumed run sees exactly the batches an
uninterrupted run would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from must_engine.augment import strong_transform, weak_transform
from must_engine.images import ImageError, extract_zip, find_images, open_image
from must_engine.masking import MaskGenerator


class NoImagesError(ValueError):
    code = "too_few_images"


def collect_images(source: Path | Sequence[Path], scratch: Path | None = None) -> list[Path]:
    """A folder (recursive), a .zip (extracted into scratch), or an explicit list. Labels are never read."""
    if isinstance(source, Path | str):
        source = Path(source)
        if source.is_dir():
            paths = find_images(source)
        elif source.suffix.lower() == ".zip":
            paths = extract_zip(source, Path(scratch or tempfile.mkdtemp(prefix="must-images-")))
        elif source.is_file():
            paths = [source]
        else:
            raise FileNotFoundError(f"{source}: no such file or folder")
    else:
        paths = [Path(p) for p in source]
    if not paths:
        raise NoImagesError(f"no images found in {source}")
    return paths


class TwoViewDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """(weak view, strong view, patch mask) per image; indexed by (epoch, index) for reproducibility."""

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale_min: float,
        randaugment: str,
        mask_generator: MaskGenerator | None,
        grid_size: int,
        seed: int,
    ) -> None:
        self.paths = list(paths)
        self.size = size
        self.weak = weak_transform(size, mean, std)
        self.strong = strong_transform(size, mean, std, scale_min=scale_min, randaugment=randaugment)
        self.mask_generator = mask_generator
        self.grid_size = grid_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, index = key
        sample_seed = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]
        random.seed(int(sample_seed))
        np.random.seed(int(sample_seed))
        torch.manual_seed(int(sample_seed))
        try:
            image = open_image(self.paths[index], draft_size=2 * self.size)
        except ImageError:
            # A file that turned unreadable after validation must not kill a long run; a blank image
            # carries no signal (the teacher is unconfident on it, so it adds no pseudo-label).
            image = Image.new("RGB", (self.size, self.size))
        weak, strong = self.weak(image), self.strong(image)
        if self.mask_generator is None:
            mask = torch.zeros(self.grid_size, self.grid_size)
        else:
            mask = self.mask_generator(np.random.default_rng(sample_seed))
        return weak, strong, mask


class ResumableSampler(Sampler[tuple[int, int]]):
    """(epoch, index) keys for the rest of a run of `total` images, starting `start` images into it.

    The run is a stream of seeded permutations of every image, one per epoch, cut into batches without
    regard to epoch boundaries: an epoch's remainder starts the next batch, so every image is seen once
    per epoch however the batch divides the bucket, and one DataLoader serves the whole run.
    """

    def __init__(self, num_items: int, *, seed: int, total: int, start: int = 0) -> None:
        self.num_items = num_items
        self.seed = seed
        self.total = total
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.num_items)
        remaining = len(self)
        while remaining > 0:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()[offset : offset + remaining]
            for index in order:
                yield epoch, index
            remaining -= len(order)
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:
        return max(0, self.total - self.start)
