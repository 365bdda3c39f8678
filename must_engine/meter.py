"""Label-free training signals, what `adapt` reports every `log_every` steps and the dashboard charts."""

from __future__ import annotations

import math

import torch


class TrainingMeter:
    """Label-free training signals averaged over the micro-batches since the last report.

    Sums stay on the device; the one host sync per report happens in summary().
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.steps = 0
        self.images = 0
        self.grad_norm = torch.zeros(())
        self.histogram: torch.Tensor | None = None

    def add_micro_batch(
        self, parts: dict[str, torch.Tensor], loss: torch.Tensor, teacher_probs: torch.Tensor,
        student_probs: torch.Tensor, confident: torch.Tensor,
    ) -> None:
        confidence, pseudo = teacher_probs.max(dim=-1)
        values = {name: value.detach().float() for name, value in parts.items()}
        values["loss"] = loss.detach().float()
        values["teacher_confidence"] = confidence.mean()
        values["above_tau"] = confident.float().mean()
        values["agreement"] = (student_probs.argmax(dim=-1) == pseudo).float().mean()
        for name, value in values.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        counts = torch.zeros(teacher_probs.shape[-1], device=pseudo.device).scatter_add_(0, pseudo, confident.float())
        self.histogram = counts if self.histogram is None else self.histogram + counts
        self.count += 1

    def add_step(self, grad_norm: torch.Tensor, images: int) -> None:
        """One optimizer step over `images` images, with the gradient norm it was taken with (on the device)."""
        self.grad_norm = self.grad_norm + grad_norm
        self.steps += 1
        self.images += images

    def pseudo_label_shares(self) -> list[float] | None:
        if self.histogram is None or float(self.histogram.sum()) <= 0:
            return None
        return (self.histogram / self.histogram.sum()).cpu().tolist()

    def summary(self, elapsed: float, **extra: float) -> dict[str, float]:
        metrics = {name: float(total) / max(1, self.count) for name, total in self.sums.items()}
        if self.histogram is not None and float(self.histogram.sum()) > 0:
            p = (self.histogram / self.histogram.sum()).cpu()
            entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
            metrics["pseudo_label_entropy"] = entropy / math.log(len(p))  # 1.0 = perfectly balanced
        metrics["grad_norm"] = float(self.grad_norm) / max(1, self.steps)
        metrics["images_per_s"] = self.images / elapsed if elapsed > 0 else 0.0
        metrics.update(extra)
        return metrics
