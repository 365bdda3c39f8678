"""The optimised MUST step must train like the plain one (the performance issue's correctness guard).

Optimised paths that exist on a CPU and are checked here:
- `config.compile=True` in `adapt` (torch.compile/inductor of the student's forward_masked), against eager;
- the benchmark's step (benchmarks/perf_common.MustStep) with bf16 autocast + fused AdamW, against fp32 +
  for-loop AdamW: the same losses and the same update direction within bf16 noise;
- the EMA teacher's foreach lerp, against a plain per-parameter loop.
The CUDA kernels themselves (fused AdamW, flash attention, bf16 matmuls) need a GPU and are not run here.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

from must_engine import adapt, resolve_job_config
from must_engine.artifact import WEIGHTS_FILE
from must_engine.ema import EmaTeacher
from must_engine.train import Progress

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
CLASSES = ["banded", "blotchy", "braided"]
# 24 images, batch 12: two optimizer steps. A large lr so that two steps move every weight measurably
# (with the default lr a wrong gradient would still leave the weights within 1e-5 of the right ones).
TWO_STEPS = {"epochs": 1, "batch_size": 12, "num_workers": 0, "log_every": 1, "export": "student", "base_lr": 0.02}


def _comparable(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Drop the attention key bias: its gradient is exactly zero in theory (softmax ignores a per-row
    shift), so AdamW turns float round-off into full-lr steps of arbitrary sign; it never affects outputs."""
    if name.endswith("attn.in_proj_bias"):
        width = tensor.shape[0] // 3
        return torch.cat([tensor[:width], tensor[2 * width:]])
    return tensor


def _train(base_model: str, images: Path, out: Path, events: list[Progress], **overrides: object) -> dict:
    config = resolve_job_config("auto", {**TWO_STEPS, **overrides}, num_images=24, num_classes=len(CLASSES),
                                base_model=base_model)
    result = adapt(images, CLASSES, out, base_model=base_model, config=config, device="cpu",
                   on_progress=events.append)
    assert result.steps == 2
    return load_file(str(out / WEIGHTS_FILE))


def test_compiled_adapt_matches_eager(tiny_base_model: str, dtd_subset: Path, tmp_path: Path) -> None:
    start = _train(tiny_base_model, dtd_subset, tmp_path / "start", [], base_lr=0.0, min_lr=0.0)
    eager_events: list[Progress] = []
    eager = _train(tiny_base_model, dtd_subset, tmp_path / "eager", eager_events)
    compiled_events: list[Progress] = []
    compiled = _train(tiny_base_model, dtd_subset, tmp_path / "compiled", compiled_events, compile=True)

    eager_losses = [e.metrics["loss"] for e in eager_events if e.metrics and not e.message]
    compiled_losses = [e.metrics["loss"] for e in compiled_events if e.metrics and not e.message]
    assert len(eager_losses) == 2
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for name in eager:
        if name == "logit_scale":  # a fixed buffer: nothing to compare
            assert torch.equal(eager[name], start[name]) and torch.equal(compiled[name], start[name])
            continue
        update = (_comparable(name, eager[name]) - _comparable(name, start[name])).norm()
        assert update > 0, f"{name} did not move: the comparison would prove nothing"
        difference = (_comparable(name, compiled[name]) - _comparable(name, eager[name])).norm()
        # Measured on this CPU: below 1e-4 of the update for every tensor (round-off, not different maths).
        assert difference <= 1e-2 * update, f"{name}: compiled differs by {difference / update:.2e} of the update"


def _perf_common() -> ModuleType:
    """benchmarks/perf_common.py, loaded by path (benchmarks/ is a folder of scripts, not a package)."""
    if "perf_common" not in sys.modules:
        spec = importlib.util.spec_from_file_location("perf_common", BENCHMARKS / "perf_common.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["perf_common"] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules["perf_common"]


def _flat_update(step: object, start: dict[str, torch.Tensor]) -> torch.Tensor:
    state = step.student.state_dict()  # type: ignore[attr-defined]
    return torch.cat([(_comparable(k, state[k]) - _comparable(k, start[k])).flatten() for k in start])


def test_bf16_fused_step_matches_fp32_step(tiny_base_model: str) -> None:
    """The benchmark's step: bf16 autocast + fused AdamW vs fp32 + for-loop AdamW, two steps, same start."""
    perf = _perf_common()

    config_file = Path(tiny_base_model.removeprefix("local-dir:")) / "open_clip_config.json"
    classifier = perf.build_classifier(str(config_file), num_classes=len(CLASSES))
    config = perf.step_config(classifier, batch=8, base_lr=0.02)
    device = torch.device("cpu")
    weak, strong, mask = perf.random_batch(config, int(classifier.visual.patch_size[0]), device)

    runs = {}
    for name, fused in (("fp32-eager", False), ("bf16-eager", True)):
        step = perf.MustStep(classifier, config, device, perf.VARIANTS[name], fused=fused)
        start = {k: v.clone() for k, v in step.student.state_dict().items()}
        losses = [float(step(weak, strong, mask)) for _ in range(2)]
        runs[name] = losses, _flat_update(step, start)

    (plain_losses, plain_update), (fast_losses, fast_update) = runs["fp32-eager"], runs["bf16-eager"]
    assert fast_losses == pytest.approx(plain_losses, rel=1e-2)
    # AdamW normalises each gradient, so bf16 round-off flips the sign of some tiny steps; the update as a
    # whole must still point the same way (measured: cosine 0.995).
    cosine = torch.nn.functional.cosine_similarity(plain_update, fast_update, dim=0)
    assert cosine > 0.98, f"bf16 + fused update diverges from fp32: cosine {cosine:.4f}"


def test_ema_foreach_update_matches_a_plain_loop() -> None:
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    teacher = EmaTeacher(student)
    reference = copy.deepcopy(teacher.module)
    for decay in (0.99, 0.9, 0.5):
        with torch.no_grad():
            for parameter in student.parameters():
                parameter.add_(torch.randn_like(parameter))
            for t, s in zip(reference.state_dict().values(), student.state_dict().values(), strict=True):
                t.copy_(decay * t + (1 - decay) * s)
        teacher.update(decay)
    for (name, t), r in zip(teacher.module.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.allclose(t, r, rtol=1e-6, atol=1e-6), name
