"""End-to-end MUST training throughput from JPEG files: decode, weak + strong augmentation, mask, step.

Why: a fast step is worth nothing if the loader cannot feed it. This measures the engine's own input
path (TwoViewDataset: PIL decode, timm RandAugment, MaskGenerator; a DataLoader configured as in
`must_engine.train.adapt`) alone, then feeding the MUST step, then the step alone on one cached batch, so
the slower of the two is visible. Also reports the loader's start-up time, which `adapt` pays once per
run (one DataLoader over all epochs).

    python benchmarks/perf_input_pipeline.py --arch ViT-B-16 --batch 256 --num-workers 16 --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import numpy as np
import torch
from perf_common import (
    CLIP_MEAN,
    CLIP_STD,
    DTD,
    VARIANTS,
    MustStep,
    build_classifier,
    describe_device,
    fmt,
    image_size,
    median,
    peak_memory_gib,
    print_table,
    rate,
    reset_peak_memory,
    step_config,
    time_calls,
)
from torch.utils.data import DataLoader

from must_engine.config import MustConfig
from must_engine.data import ResumableSampler, TwoViewDataset
from must_engine.images import find_images, open_image
from must_engine.masking import MaskGenerator


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DTD, help="folder of images (read-only, never copied)")
    parser.add_argument("--arch", default="ViT-B-16",
                        help="open_clip architecture, tiny, tiny-224, or a model-config JSON file")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="loader processes (the engine's default: min(8, cpu count))")
    parser.add_argument("--input-size", type=int, default=0, help="pixels; 0 = the model's input size")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per phase")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (compilation happens here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", default="", help=f"step variant among {', '.join(VARIANTS)}; "
                        "default bf16-compile on CUDA, fp32-eager on CPU")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--loader-only", action="store_true", help="skip the phases with a training step")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of the main process (0 = torch default)")
    parser.add_argument("--breakdown", type=int, default=0, metavar="N",
                        help="also time each per-image stage (decode, weak, strong, mask) over N images, in-process")
    return parser.parse_args()


def make_loader(args: argparse.Namespace, size: int, patch: int, mask_patch: int,
                device: torch.device) -> DataLoader:
    """TwoViewDataset + DataLoader configured as in adapt: one loader, the engine's sampler over many epochs."""
    config = MustConfig()  # the engine's augmentation and mask defaults
    paths = find_images(args.root)
    if not paths:
        raise SystemExit(f"no images under {args.root}")
    dataset = TwoViewDataset(
        paths, size=size, mean=CLIP_MEAN, std=CLIP_STD, scale_min=config.crop_scale_min,
        randaugment=config.randaugment, mask_generator=MaskGenerator(size, mask_patch, patch, config.mask_ratio),
        grid_size=size // patch, seed=config.seed,
    )
    if args.batch > len(paths):
        raise SystemExit(f"--batch {args.batch} exceeds the {len(paths)} images under {args.root}")
    sampler = ResumableSampler(len(paths), seed=config.seed, total=10_000 * len(paths))
    return DataLoader(dataset, batch_size=args.batch, sampler=sampler, drop_last=True,
                      num_workers=args.num_workers, pin_memory=device.type == "cuda")


def stage_breakdown(dataset: TwoViewDataset, count: int) -> list[list[str]]:
    """Milliseconds per image of each stage of TwoViewDataset.__getitem__, in this process, one thread."""
    names = ("decode (open_image)", "weak view", "strong view (RandAugment)", "mask")
    totals = dict.fromkeys(names, 0.0)
    rng = np.random.default_rng(0)
    for index in range(count):
        ticks = [time.perf_counter()]
        image = open_image(dataset.paths[index % len(dataset.paths)], draft_size=2 * dataset.size)
        ticks.append(time.perf_counter())
        dataset.weak(image)
        ticks.append(time.perf_counter())
        dataset.strong(image)
        ticks.append(time.perf_counter())
        if dataset.mask_generator is not None:
            dataset.mask_generator(rng)
        ticks.append(time.perf_counter())
        for name, (before, after) in zip(names, itertools.pairwise(ticks), strict=True):
            totals[name] += after - before
    return [[name, f"{seconds / count * 1e3:.2f}"] for name, seconds in totals.items()]


def timed_batches(batches: Iterator[list[torch.Tensor]], count: int,
                  consume: Callable[[list[torch.Tensor]], None] | None = None) -> float:
    """Seconds for `count` batches pulled from the iterator (and passed to `consume`), synchronised."""
    tick = time.perf_counter()
    for _ in range(count):
        batch = next(batches)
        if consume is not None:
            consume(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - tick


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variant = args.variant or ("bf16-compile" if device.type == "cuda" else "fp32-eager")
    classifier = build_classifier(args.arch, args.classes)
    size = args.input_size or image_size(classifier)
    if not args.loader_only and size != image_size(classifier):
        raise SystemExit(f"--input-size {size} differs from the model's {image_size(classifier)}: use --loader-only")
    config = step_config(classifier, args.batch)
    patch = int(classifier.visual.patch_size[0])
    mask_patch = config.mask_patch if size % config.mask_patch == 0 else patch
    print(f"# input pipeline: {args.root} ({len(find_images(args.root))} images), {size}px, batch {args.batch}, "
          f"{args.num_workers} workers, {describe_device(device)}, step {args.arch} {variant}")

    rows = []
    loader = make_loader(args, size, patch, mask_patch, device)
    if args.breakdown:
        stages = stage_breakdown(cast(TwoViewDataset, loader.dataset), args.breakdown)
        print_table(["stage (per image, main process)", "ms"], stages)
    tick = time.perf_counter()
    batches = iter(loader)
    next(batches)
    startup = time.perf_counter() - tick
    rows.append(["loader start (workers + first batch)", "-", f"{startup * 1e3:.0f}", "paid once per run by adapt"])
    timed_batches(batches, args.warmup)
    seconds = timed_batches(batches, args.batches)
    rows.append(["loader alone", rate(args.batch * args.batches / seconds),
                 f"{seconds / args.batches * 1e3:.1f}", "decode + weak + strong views + mask"])
    del batches

    if not args.loader_only:
        reset_peak_memory(device)
        step = MustStep(classifier, config, device, VARIANTS[variant])

        def train_on(batch: list[torch.Tensor]) -> None:
            step(*(tensor.to(device, non_blocking=True) for tensor in batch))

        batches = iter(loader)
        timed_batches(batches, args.warmup, train_on)
        seconds = timed_batches(batches, args.batches, train_on)
        rows.append(["loader + MUST step", rate(args.batch * args.batches / seconds),
                     f"{seconds / args.batches * 1e3:.1f}", f"peak GPU GiB {fmt(peak_memory_gib(device), '.2f')}"])
        cached = [tensor.to(device) for tensor in next(batches)]
        del batches
        times = time_calls(lambda: step(*cached), device, warmup=1, repeats=args.batches)
        rows.append(["MUST step alone (one cached batch)", rate(args.batch / median(times)),
                     f"{median(times) * 1e3:.1f}", "median"])
    print_table(["phase", "images/s", "ms/batch", "note"], rows)


if __name__ == "__main__":
    main()
