"""The training data stream: augmentations never crash, and resuming continues the exact sequence."""

import random

from PIL import Image

from must_engine.augment import _posterize, strong_transform
from must_engine.data import ResumableSampler


def test_posterize_at_zero_bits_gives_black_like_older_pillow() -> None:
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert _posterize(image, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert _posterize(image, 4).getpixel((0, 0)) == (192, 96, 48)


def test_reference_randaugment_policy_survives_its_whole_magnitude_range() -> None:
    transform = strong_transform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), scale_min=0.3,
                                 randaugment="rand-m10-n4-mstd0.5-inc1")
    image = Image.effect_noise((40, 40), 50).convert("RGB")
    for seed in range(300):
        random.seed(seed)
        assert transform(image).shape == (3, 32, 32)


def test_sampler_resumes_mid_epoch_with_the_same_keys() -> None:
    full = list(ResumableSampler(10, seed=3, total=24))  # 2.4 epochs: the remainder runs into epoch 2
    assert len(full) == 24 and [epoch for epoch, _ in full] == [0] * 10 + [1] * 10 + [2] * 4
    for epoch in (0, 1):
        assert sorted(index for e, index in full if e == epoch) == list(range(10))  # every image once
    for start in (0, 5, 8, 13, 23):
        resumed = ResumableSampler(10, seed=3, total=24, start=start)
        assert list(resumed) == full[start:] and len(resumed) == 24 - start
    assert list(ResumableSampler(10, seed=4, total=24)) != full
