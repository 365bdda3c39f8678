"""MUST training, readable top to bottom: set up, loop over optimizer steps, export.

One optimizer step = `batch_size` images, reached through `accumulation_steps` micro-batches. For each
micro-batch the EMA teacher pseudo-labels the weak view, the student sees the masked strong view, and
the four losses are summed. After the step the teacher moves towards the student.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from must_engine.artifact import build_classifier, preprocess_metadata, save_artifact
from must_engine.balance import balance_classes, bucket_logits
from must_engine.base_models import DEFAULT_BASE_MODEL, FetchWeights, geometry, load_base_model, parse_base_model
from must_engine.checkpoint import (
    check_resume,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from must_engine.config import (
    MustConfig,
    fairness_uses_moving_average,
    normalize_class_names,
    pick_device,
    resolve_config,
    validate_config,
)
from must_engine.data import TwoViewDataset, collect_images
from must_engine.distributed import SINGLE_PROCESS, Ranks, current
from must_engine.ema import EmaTeacher, ema_decay
from must_engine.losses import align_distribution, align_loss, fairness_loss, mim_loss, self_training_loss
from must_engine.masking import MaskGenerator
from must_engine.meter import TrainingMeter
from must_engine.models import MustModel
from must_engine.optim import build_optimizer, build_scheduler
from must_engine.unknown import UnknownWeighting, finish_head, weighted_mean_prediction
from must_engine.zeroshot import zero_shot_classifier


class AdaptCancelled(RuntimeError):
    """should_stop() asked the run to end; the last checkpoint stays in work_dir."""


class TrainingDiverged(FloatingPointError):
    """A loss or gradient became non-finite; the run stopped before that optimizer step touched the weights."""

    code = "training_diverged"


@dataclass
class Progress:
    step: int
    total_steps: int
    epoch: int
    epochs: int
    metrics: dict[str, float] = field(default_factory=dict)
    message: str | None = None
    # Per class, its share of the confident pseudo-labels since the last report (the dashboard's histogram).
    pseudo_labels: list[float] | None = None

    @property
    def fraction(self) -> float:
        return self.step / self.total_steps if self.total_steps else 1.0


@dataclass
class AdaptResult:
    artifact_dir: Path
    metrics: dict[str, float]
    steps: int
    resumed_from_step: int | None


def adapt(
    images: Path | Sequence[Path],
    class_names: Sequence[str],
    out_dir: Path,
    *,
    base_model: str = DEFAULT_BASE_MODEL,
    pretrained: str | None = None,
    config: MustConfig | None = None,
    device: str = "auto",
    work_dir: Path | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    fetch_weights: FetchWeights | None = None,
) -> AdaptResult:
    """Adapt a CLIP zero-shot classifier to unlabeled images with MUST; write the artifact to out_dir.

    Under torchrun (must_engine/distributed.py) every rank calls this; only rank 0 reports, checkpoints
    and writes the artifact (the other ranks return a result naming the artifact rank 0 writes).
    """
    ranks = current()
    report = ranks.main_only(on_progress)
    stop_requested = should_stop or (lambda: False)
    target = ranks.place(pick_device(device))
    class_names = normalize_class_names(class_names)
    spec = parse_base_model(base_model, pretrained)
    shape = geometry(spec)

    with tempfile.TemporaryDirectory(prefix="must-images-") as scratch:
        paths = collect_images(images if isinstance(images, Path | str) else list(images), Path(scratch))
        config = config or resolve_config(
            num_images=len(paths), num_classes=len(class_names), geometry=shape
        )
        validate_config(config, num_images=len(paths), geometry=shape)  # a hand-built config too
        torch.manual_seed(config.seed)
        checkpoint = load_checkpoint(work_dir)

        # ---- model: zero-shot head from the text tower, or the checkpoint's weights ----------------
        if checkpoint is not None:
            check_resume(checkpoint, class_names=class_names, base_model=spec.spec, num_images=len(paths),
                         config=config.to_dict())
            model_cfg, preprocess_cfg = checkpoint["model_cfg"], checkpoint["preprocess_cfg"]
            classifier = build_classifier(model_cfg, len(class_names))
        else:
            base = load_base_model(spec.spec, device="cpu", fetch_weights=fetch_weights)
            classifier = zero_shot_classifier(base, class_names, config.templates)
            model_cfg, preprocess_cfg = base.model_cfg, base.preprocess_cfg
            del base  # the text tower is not needed any more
        preprocess = preprocess_metadata(preprocess_cfg, config.input_size)
        init_metrics: dict[str, float] = {}
        if checkpoint is None and config.balance_init:  # a resumed head already holds its offsets
            # each rank classifies its slice of the bucket; every rank balances over all of it
            shard = bucket_logits(classifier.to(target), paths[ranks.rank :: ranks.world_size], preprocess, target)
            balanced = balance_classes(classifier, ranks.gather_rows(shard), prior=config.class_prior)
            init_metrics = {f"init_{name}": value for name, value in balanced.items()}
        student = MustModel(classifier, seed=config.seed).to(target)

        # ---- schedule ------------------------------------------------------------------------------
        micro_batch, accumulation = ranks.split_batch(config.batch_size, config.micro_batch_size,
                                                      lambda images: _default_micro_batch(images, target))
        # An epoch is every image once: batches run on across epoch boundaries (the remainder of one
        # epoch starts the next batch), so no image is skipped however the batch divides the bucket.
        total_steps = math.ceil(config.epochs * len(paths) / config.batch_size)

        def epoch_at(step: int) -> int:
            return min(config.epochs, step * config.batch_size // len(paths))

        use_bf16 = target.type == "cuda" and config.precision in ("auto", "bf16")
        must_step = MustStep(
            student, config, total_steps=total_steps, device=target,
            autocast_dtype=torch.bfloat16 if use_bf16 else None, ranks=ranks,
        )
        step = 0
        resumed_from: int | None = None
        if checkpoint is not None:
            must_step.load_state_dict(checkpoint)
            restore_rng_state(checkpoint["rng"])
            step = resumed_from = int(checkpoint["step"])
            report(Progress(step, total_steps, epoch_at(step), config.epochs,
                            message=f"resumed from checkpoint at step {step}"))
        else:
            report(Progress(0, total_steps, 0, config.epochs, message=(
                f"adapting {spec.spec} to {len(paths)} images, {len(class_names)} classes, "
                f"{total_steps} steps of {config.batch_size} images on {ranks.describe(target)}"
            )))

        # ---- data ----------------------------------------------------------------------------------
        grid = shape.image_size // shape.patch_size
        dataset = TwoViewDataset(
            paths,
            size=config.input_size,
            mean=preprocess["mean"],
            std=preprocess["std"],
            scale_min=config.crop_scale_min,
            randaugment=config.randaugment,
            mask_generator=(
                MaskGenerator(config.input_size, config.mask_patch, shape.patch_size, config.mask_ratio)
                if config.mim else None
            ),
            grid_size=grid,
            seed=config.seed,
        )
        workers = config.num_workers if config.num_workers >= 0 else min(8, os.cpu_count() or 1)

        def micro_batches() -> Iterator[list[torch.Tensor]]:
            sampler = ranks.sampler(len(paths), seed=config.seed, total=total_steps * config.batch_size,
                                    start=step * config.batch_size, micro_batch=micro_batch)
            loader = DataLoader(dataset, batch_size=micro_batch, sampler=sampler, num_workers=workers,
                                pin_memory=target.type == "cuda", prefetch_factor=4 if workers else None)
            for batch in loader:
                yield [tensor.to(target, non_blocking=True) for tensor in batch]

        # ---- training loop -------------------------------------------------------------------------
        student.train()
        last_metrics: dict[str, float] = {}
        tick = time.perf_counter()
        batches = micro_batches()
        while step < total_steps:
            if ranks.should_stop(stop_requested):
                raise AdaptCancelled(f"cancelled at step {step}")
            must_step(step, batches, accumulation)
            step += 1

            if step % config.log_every == 0 or step == total_steps:
                last_metrics = must_step.report_metrics(time.perf_counter() - tick)
                report(Progress(step, total_steps, epoch_at(step), config.epochs, last_metrics,
                                pseudo_labels=must_step.pseudo_labels))
                tick = time.perf_counter()
            if work_dir is not None and ranks.is_main and (step % config.checkpoint_every == 0 or step == total_steps):
                path = save_checkpoint(work_dir, {
                    "step": step, "config": config.to_dict(), "class_names": class_names,
                    "base_model": spec.spec, "num_images": len(paths), "model_cfg": model_cfg,
                    "preprocess_cfg": preprocess_cfg, "rng": rng_state(), **must_step.state_dict(),
                })
                if on_checkpoint is not None:
                    on_checkpoint(path)

        if not ranks.is_main:
            return AdaptResult(Path(out_dir), last_metrics, step, resumed_from)
        # ---- export: the teacher (or student), balanced over the bucket if the config says so ------
        exported = must_step.teacher.module if config.export == "teacher" else student
        # balances the classes if the config says so, and fits the unknown-image threshold on the bucket
        head_metrics, unknown = finish_head(exported.classifier, paths, preprocess, target, config)
        last_metrics = {**last_metrics, **head_metrics}

    last_metrics = {**init_metrics, **last_metrics}
    artifact = save_artifact(
        Path(out_dir), exported.classifier, class_names=class_names, base_model=spec.spec,
        model_cfg=model_cfg, preprocess=preprocess,
        config=config.to_dict(), metrics={**last_metrics, "steps": step}, exported=config.export,
        unknown=unknown,
    )
    report(Progress(step, total_steps, config.epochs, config.epochs, last_metrics, message="artifact written"))
    return AdaptResult(artifact, last_metrics, step, resumed_from)


class MustStep:
    """One MUST optimizer step over `accumulation` micro-batches; what the loop repeats and benchmarks time.

    Per micro-batch: the EMA teacher pseudo-labels the weak view; the student sees the masked strong view;
    self-training + fairness + MIM + alignment losses; backward. Then AdamW, the lr schedule, and the EMA
    update with the ramped decay. Owns everything a checkpoint must hold to continue exactly.
    A non-finite loss or gradient stops the step before the optimizer touches the weights (one host sync
    per optimizer step, none per micro-batch), so no checkpoint or artifact ever holds NaN weights.
    """

    def __init__(
        self, student: MustModel, config: MustConfig, *, total_steps: int, device: torch.device,
        autocast_dtype: torch.dtype | None, fused: bool | None = None, ranks: Ranks = SINGLE_PROCESS,
    ) -> None:
        self.student = student
        self.config = config
        self.teacher = EmaTeacher(student)
        num_layers = len(student.classifier.visual.transformer.resblocks)
        self.optimizer = build_optimizer(student, config, num_layers, fused=device.type == "cuda" if fused is None
                                         else fused)
        self.scheduler = build_scheduler(self.optimizer, config, total_steps)
        self.device_type = device.type
        self.autocast_dtype = autocast_dtype
        self.fair_moving = fairness_uses_moving_average(config, student.classifier.num_classes)
        self.fair_running: torch.Tensor | None = None
        self.teacher_marginal: torch.Tensor | None = None
        self.ranks, self.batch = ranks, ranks.batch()
        self.replica = ranks.replicate(student, every_parameter_used=config.mim)
        self.forward_masked = torch.compile(self.replica.masked) if config.compile else self.replica.masked
        self.teacher_forward = torch.compile(self.teacher.module) if config.compile else self.teacher.module
        self.meter = TrainingMeter()
        self.pseudo_labels: list[float] | None = None
        self.decay = config.ema_init
        self.unknown_weights = UnknownWeighting(student.classifier, config.unknown_weighting)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def losses(
        self, weak: torch.Tensor, strong: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward passes and the weighted total loss of one micro-batch (no backward)."""
        config = self.config
        with torch.no_grad(), self.autocast():
            teacher_probs = F.softmax(self.teacher_forward(weak).float(), dim=-1)
            if config.align_pseudo_labels > 0:
                teacher_probs, self.teacher_marginal = align_distribution(
                    teacher_probs, self.teacher_marginal, config.align_pseudo_labels, self.batch
                )
            weights = self.unknown_weights(weak, teacher_probs)  # None: the paper's MUST
        with self.autocast():
            if config.mim:
                out = self.forward_masked(strong, mask)
                logits = out.logits
            else:
                logits = self.replica.plain(strong)
            loss_st, confident = self_training_loss(logits, teacher_probs, config.tau, self.batch, weights)
            probs = F.softmax(logits.float(), dim=-1)
            loss_fair, self.fair_running = fairness_loss(
                weighted_mean_prediction(self.batch.rows(probs), None if weights is None else self.batch.rows(weights)),
                self.fair_running if self.fair_moving else None,
                config.fair_momentum if self.fair_moving else 0.0,
            )
            loss = loss_st + config.w_fair * loss_fair
            parts = {"loss_st": loss_st, "loss_fair": loss_fair}
            if config.mim:
                parts["loss_mim"] = mim_loss(out.reconstruction, strong, mask, self.student.patch_size, self.batch)
                loss = loss + config.w_mim * parts["loss_mim"]
                if config.w_align > 0:
                    parts["loss_align"] = align_loss(
                        out.cls_embedding, out.patch_embeddings, mask, target=config.align_target, k=config.align_k,
                        batch=self.batch,
                    )
                    loss = loss + config.w_align * parts["loss_align"]
        self.meter.add_micro_batch(parts, loss, teacher_probs, probs, confident)
        return loss, parts

    def __call__(
        self, step: int, micro_batches: Iterator[Sequence[torch.Tensor]], accumulation: int
    ) -> torch.Tensor:
        """One optimizer step; returns the step's mean total loss (detached, still on the device)."""
        self.decay = ema_decay(step, self.config.ema_init, self.config.ema_final, self.config.ema_warmup)
        total = torch.zeros(())
        for index in range(accumulation):
            weak, strong, mask = next(micro_batches)
            with self.replica.accumulate(sync=index == accumulation - 1):
                loss, parts = self.losses(weak, strong, mask)
                (loss / accumulation).backward()
            total = total.to(loss.device) + loss.detach() / accumulation
        gradients = [p.grad for p in self.student.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(gradients) if gradients else torch.zeros((), device=total.device)
        if not bool(torch.isfinite(total) & torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            values = ", ".join(f"{name}={float(value.detach()):.4g}" for name, value in parts.items())
            raise TrainingDiverged(
                f"non-finite loss or gradient at optimizer step {step + 1} (loss={float(total):.4g}, "
                f"grad_norm={float(grad_norm):.4g}; last micro-batch: {values}); the weights were not updated "
                "and the last checkpoint is intact. Lower base_lr, or check the images."
            )
        self.meter.add_step(grad_norm, self.config.batch_size)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.teacher.update(self.decay)
        return total

    def report_metrics(self, elapsed: float) -> dict[str, float]:
        """Label-free signals since the last report (one host sync), then start a fresh window."""
        self.ranks.merge_meter(self.meter.sums, self.meter.histogram)
        metrics = self.meter.summary(elapsed, lr=self.optimizer.param_groups[-1]["lr"], ema_decay=self.decay)
        self.pseudo_labels = self.meter.pseudo_label_shares()
        self.meter = TrainingMeter()
        return metrics

    def state_dict(self) -> dict[str, object]:
        return {
            "student": self.student.state_dict(), "teacher": self.teacher.module.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": None,  # bf16 autocast needs no loss scaling
            "fair_running": self.fair_running,
            "teacher_marginal": self.teacher_marginal,
            "unknown_anchor": self.unknown_weights.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.module.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        device = next(self.student.parameters()).device
        running, marginal = state["fair_running"], state.get("teacher_marginal")
        self.fair_running = running.to(device) if running is not None else None
        self.teacher_marginal = marginal.to(device) if marginal is not None else None
        self.unknown_weights.load_state_dict(state.get("unknown_anchor"))


def _default_micro_batch(batch_size: int, device: torch.device) -> int:
    """Largest divisor of batch_size up to a device-sized cap (memory, not the method, sets it)."""
    cap = 256 if device.type == "cuda" else 64
    return max(d for d in range(1, min(batch_size, cap) + 1) if batch_size % d == 0)


def clear_work_dir(work_dir: Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)
