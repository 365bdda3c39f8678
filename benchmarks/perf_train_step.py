"""Throughput of one MUST training step in isolation (random tensors already on the device).

Why: the issue's targets are about the step itself (teacher forward, student forward+backward on the
masked view, decoder, four losses, EMA, AdamW), compared in the same run against the fp32 eager step
the reference code runs by default. The step is built from the engine's own modules (perf_common.MustStep).

    python benchmarks/perf_train_step.py --arch ViT-B-16 --batch 256 --device cuda \
        --variants fp32-eager,tf32-eager,bf16-eager,bf16-compile
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from perf_common import (
    VARIANTS,
    MustStep,
    build_classifier,
    describe_device,
    fmt,
    forward_flops_per_image,
    median,
    peak_memory_gib,
    print_table,
    random_batch,
    rate,
    reset_peak_memory,
    step_config,
    synchronize,
    time_calls,
)
from torch.profiler import ProfilerActivity, profile

FORWARDS_PER_IMAGE = 4  # teacher forward + student forward + student backward (2 forwards' worth)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-16",
                        help="open_clip architecture, tiny, tiny-224, or a model-config JSON file")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="fp32-eager,tf32-eager,bf16-eager,bf16-compile",
                        help=f"comma-separated, among {', '.join(VARIANTS)}")
    parser.add_argument("--classes", type=int, default=1000, help="head size (ImageNet: 1000)")
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="MFU denominator: dense bf16 peak (H100/H200 SXM: ~790 TFLOP/s)")
    parser.add_argument("--find-max-batch", action="store_true",
                        help="GPU only: per variant, double the batch from --batch until out of memory")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile one step of the first variant and print the top N ops")
    return parser.parse_args()


def run_variant(args: argparse.Namespace, name: str, batch: int, device: torch.device,
                steps: int, warmup: int) -> tuple[list[float], float | None, float]:
    """(seconds per step, peak GiB, seconds of warm-up incl. compilation) for one variant at one batch."""
    try:
        return _measure(args, name, batch, device, steps, warmup)
    finally:
        free(device)  # the step's tensors are gone once _measure has returned


def _measure(args: argparse.Namespace, name: str, batch: int, device: torch.device,
             steps: int, warmup: int) -> tuple[list[float], float | None, float]:
    classifier = build_classifier(args.arch, args.classes)
    config = step_config(classifier, batch)
    reset_peak_memory(device)
    step = MustStep(classifier, config, device, VARIANTS[name])
    weak, strong, mask = random_batch(config, step.student.patch_size, device)

    def run() -> None:
        step(weak, strong, mask)

    tick = time.perf_counter()
    time_calls(run, device, warmup=warmup, repeats=0)
    warm_s = time.perf_counter() - tick
    times = time_calls(run, device, warmup=0, repeats=steps)
    return times, peak_memory_gib(device), warm_s


def profile_step(args: argparse.Namespace, name: str, device: torch.device, top: int) -> None:
    """torch.profiler table of one warm step: where the time goes (self time, so the rows add up)."""
    classifier = build_classifier(args.arch, args.classes)
    config = step_config(classifier, args.batch)
    step = MustStep(classifier, config, device, VARIANTS[name])
    weak, strong, mask = random_batch(config, step.student.patch_size, device)
    time_calls(lambda: step(weak, strong, mask), device, warmup=max(1, args.warmup), repeats=0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(weak, strong, mask)
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"# profile of one {name} step (batch {args.batch}), top {top} ops by {sort_by}")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=48))


def free(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def find_max_batch(args: argparse.Namespace, name: str, device: torch.device) -> int:
    """Largest batch (doubling from --batch) that runs two steps without running out of GPU memory."""
    fits, batch = 0, args.batch
    while True:
        try:
            run_variant(args, name, batch, device, steps=1, warmup=1)
        except torch.OutOfMemoryError:
            out_of_memory = True
        else:
            out_of_memory = False
        free(device)  # after the handler, when the failed step's frames and tensors are released
        if out_of_memory:
            return fits
        fits, batch = batch, batch * 2


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.find_max_batch and device.type != "cuda":
        raise SystemExit("--find-max-batch needs a CUDA device")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose among {list(VARIANTS)}")

    classifier = build_classifier(args.arch, args.classes).to(device)
    flops_fwd = forward_flops_per_image(classifier, device)
    del classifier
    step_flops = FORWARDS_PER_IMAGE * flops_fwd
    print(f"# MUST step: {args.arch}, batch {args.batch}, {describe_device(device)}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"# forward {flops_fwd / 1e9:.4g} GFLOP/image (FlopCounterMode), step counted as "
          f"{FORWARDS_PER_IMAGE} forwards = {step_flops / 1e9:.4g} GFLOP/image; MFU vs {args.peak_tflops:g} TFLOP/s")

    results: dict[str, tuple[list[float], float | None, float] | None] = {}
    for name in names:
        try:
            results[name] = run_variant(args, name, args.batch, device, args.steps, args.warmup)
        except torch.OutOfMemoryError:
            results[name] = None
        free(device)  # after the handler, so a failed variant's memory is released before the next one
    fp32 = results.get("fp32-eager")
    baseline = args.batch / median(fp32[0]) if fp32 else None
    rows = []
    for name, result in results.items():
        if result is None:
            rows.append([name, str(args.batch), "out of memory", *["-"] * 6])
            continue
        times, peak, warm_s = result
        seconds = median(times)
        images_per_s = args.batch / seconds
        achieved = images_per_s * step_flops / 1e12
        rows.append([
            name, str(args.batch), rate(images_per_s), f"{seconds * 1e3:.1f}", fmt(peak, ".2f"),
            f"{achieved:.4g}", f"{100 * achieved / args.peak_tflops:.3g}%",
            f"{images_per_s / baseline:.2f}x" if baseline else "n/a", f"{warm_s:.1f}",
        ])
    print_table(["variant", "batch", "images/s", "ms/step (median)", "peak GiB", "TFLOP/s", "MFU",
                 "vs fp32-eager", "warm-up s"], rows)

    if args.profile:
        profile_step(args, names[0], device, args.profile)
        free(device)

    if args.find_max_batch:
        print_table(["variant", "largest batch that fits"],
                    [[name, str(find_max_batch(args, name, device))] for name in names])


if __name__ == "__main__":
    main()
