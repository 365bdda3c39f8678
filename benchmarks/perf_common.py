"""Shared pieces of the perf_* benchmarks: random-weight models, the MUST step, precision variants, timing.

The step is the engine's own `must_engine.train.MustStep`, the object `adapt` repeats, so a figure
measured here is the engine's cost and a change to the engine shows up here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # import the working tree's engine, also when run as benchmarks/perf_*.py
    sys.path.insert(0, str(REPO))

from benchmarks import SHARED_DATASETS  # noqa: E402
from must_engine.config import MustConfig  # noqa: E402
from must_engine.masking import MaskGenerator  # noqa: E402
from must_engine.models import ImageClassifier, MustModel  # noqa: E402
from must_engine.train import MustStep as EngineMustStep  # noqa: E402

# Tiny random-weight ViTs for proving the scripts on a CPU: `--arch tiny` is the engine tests' model
# (tests/engine/conftest.py), `--arch tiny-224` the same at 224 px with 32 px patches, so that image
# decoding and preprocessing run at full size while the model costs almost nothing.
_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY_CONFIGS: dict[str, dict] = {
    "tiny": {"embed_dim": 32, "text_cfg": _TEXT,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}},
    "tiny-224": {"embed_dim": 32, "text_cfg": _TEXT,
                 "vision_cfg": {"image_size": 224, "patch_size": 32, "width": 32, "layers": 2, "head_width": 16}},
}

DTD = SHARED_DATASETS / "dtd10"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Variant:
    """How a step runs: autocast dtype (None = fp32), TF32 matmuls/convs (None = process default), compile."""

    name: str
    dtype: torch.dtype | None
    tf32: bool | None
    compile: bool


VARIANTS: dict[str, Variant] = {
    # The reference code's default: fp32, TF32 off for matmuls and convolutions.
    "fp32-eager": Variant("fp32-eager", None, False, False),
    "tf32-eager": Variant("tf32-eager", None, True, False),
    # bf16 variants keep the process's TF32 defaults, as must_engine.train does.
    "bf16-eager": Variant("bf16-eager", torch.bfloat16, None, False),
    "bf16-compile": Variant("bf16-compile", torch.bfloat16, None, True),
}


def build_classifier(arch: str, num_classes: int, seed: int = 0) -> ImageClassifier:
    """An ImageClassifier with random weights: cost equals the real model's, no download needed.

    `arch` is an open_clip architecture name, a name in TINY_CONFIGS, or a JSON file holding a model config
    (open_clip's `open_clip_config.json` layout with a `model_cfg` key, or a bare model config).
    """
    torch.manual_seed(seed)
    path = Path(arch)
    if arch in TINY_CONFIGS:
        model = open_clip.CLIP(**TINY_CONFIGS[arch])
    elif path.suffix == ".json" and path.is_file():
        cfg = json.loads(path.read_text())
        cfg = cfg.get("model_cfg", cfg)
        model = open_clip.CLIP(**cfg)
    else:
        model = open_clip.create_model(arch)
    visual = model.visual
    head = F.normalize(torch.randn(visual.output_dim, num_classes), dim=0)
    return ImageClassifier(visual, head)


def image_size(classifier: ImageClassifier) -> int:
    size = classifier.visual.image_size
    return int(size if isinstance(size, int) else size[0])


def forward_flops_per_image(classifier: ImageClassifier, device: torch.device) -> float:
    """FLOPs of one classifier forward on one image (matmuls, convolutions, attention), fp32.

    Attention runs on SDPA's math backend here because FlopCounterMode counts no FLOPs for the CPU flash
    kernel (checked with torch 2.14): the count must not depend on the device or the attention kernel.
    """
    size = image_size(classifier)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        classifier(torch.zeros(1, 3, size, size, device=device))
    return float(counter.get_total_flops())


@contextlib.contextmanager
def precision(variant: Variant) -> Iterator[None]:
    """Set TF32 for matmuls and cuDNN convolutions (new fp32_precision API) for the duration."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv  # type: ignore[attr-defined]
    saved = (matmul.fp32_precision, conv.fp32_precision)
    if variant.tf32 is not None:
        mode = "tf32" if variant.tf32 else "ieee"
        matmul.fp32_precision = conv.fp32_precision = mode
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def step_config(classifier: ImageClassifier, batch: int, **overrides: object) -> MustConfig:
    """The engine's default MUST config for one micro-batch = one optimizer step, masks fitted to the model."""
    patch = int(classifier.visual.patch_size[0])
    size = image_size(classifier)
    mask_patch = 2 * patch if size % (2 * patch) == 0 else patch  # the paper's 2x2 patches where they fit
    values: dict[str, object] = {"batch_size": batch, "micro_batch_size": batch, "mask_patch": mask_patch,
                                 "input_size": size, **overrides}
    return MustConfig(**values)  # type: ignore[arg-type]


def random_batch(
    config: MustConfig, patch: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weak, strong, mask) like TwoViewDataset's collated output, with random pixels and engine masks."""
    generator = torch.Generator().manual_seed(seed)
    shape = (config.batch_size, 3, config.input_size, config.input_size)
    weak, strong = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    masks = MaskGenerator(config.input_size, config.mask_patch, patch, config.mask_ratio)
    rng = np.random.default_rng(seed)
    mask = torch.stack([masks(rng) for _ in range(config.batch_size)])
    return weak.to(device), strong.to(device), mask.to(device)


class MustStep:
    """The engine's own MUST step (`must_engine.train.MustStep`, accumulation 1) under a precision variant.

    `compile` turns on the engine's torch.compile of the student's forward_masked and the teacher's
    forward; `fused` picks fused AdamW (default: on CUDA only, as the engine does).
    """

    def __init__(self, classifier: ImageClassifier, config: MustConfig, device: torch.device,
                 variant: Variant, *, fused: bool | None = None, seed: int = 0) -> None:
        self.student = MustModel(copy.deepcopy(classifier), seed=seed).to(device)  # same start for every variant
        self.variant = variant
        self.engine_step = EngineMustStep(
            self.student, dataclasses.replace(config, compile=variant.compile), total_steps=1_000_000,
            device=device, autocast_dtype=variant.dtype, fused=fused,
        )
        self.step_index = 0
        self.student.train()

    def __call__(self, weak: torch.Tensor, strong: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run one optimizer step; returns the (detached) total loss."""
        with precision(self.variant):
            loss = self.engine_step(self.step_index, iter([(weak, strong, mask)]), accumulation=1)
        self.step_index += 1
        return loss


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int,
               wall_clock: bool = False) -> list[float]:
    """Seconds per call, warm-up excluded: CUDA events on a GPU, perf_counter on a CPU.

    `wall_clock` uses perf_counter + synchronize on a GPU too, for calls whose host work (JPEG decoding,
    result copies) is part of what is measured.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    for _ in range(repeats):
        if device.type == "cuda" and not wall_clock:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            tick = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - tick)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset; None on a CPU (not tracked per phase)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def rate(value: float | None) -> str:
    """Images/s: one decimal from 10 up, three significant digits below (CPU runs of big models)."""
    if value is None:
        return "n/a"
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, so output pastes straight into docs/PERFORMANCE.md."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"
