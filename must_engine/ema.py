"""The EMA teacher: a running average of the whole student (classifier head included)."""

from __future__ import annotations

import copy
from typing import Generic, TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def ema_decay(step: int, init: float, final: float, warmup: int) -> float:
    """Linear ramp from init to final over `warmup` optimizer steps (reference code)."""
    if warmup <= 0:
        return final
    return init + (final - init) * min(1.0, step / warmup)


class EmaTeacher(Generic[ModuleT]):
    def __init__(self, student: ModuleT) -> None:
        self.module: ModuleT = copy.deepcopy(student).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self._pairs = [
            (t, s)
            for t, s in zip(self.module.state_dict().values(), student.state_dict().values(), strict=True)
            if t.dtype.is_floating_point
        ]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        teacher, student = zip(*self._pairs, strict=True)
        torch._foreach_lerp_(list(teacher), list(student), 1.0 - decay)
