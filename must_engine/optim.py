"""AdamW with layer-wise lr decay and a cosine schedule, as in the MUST reference code (BEiT style)."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from must_engine.config import MustConfig

_BLOCK = re.compile(r"\.resblocks\.(\d+)\.")
_EMBED = ("visual.conv1", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre")


def layer_id(name: str, num_layers: int, mask_token_lr: str) -> int:
    """0 for patch/position embeddings, i+1 for transformer block i, num_layers+1 for everything after."""
    if any(part in name for part in _EMBED) or (name == "mask_token" and mask_token_lr == "embed"):
        return 0
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def parameter_groups(model: nn.Module, config: MustConfig, num_layers: int) -> list[dict]:
    """One group per (layer, decay or not); 1-D tensors (biases, norms, [CLS]) get no weight decay."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer = layer_id(name, num_layers, config.mask_token_lr)
        decay = parameter.ndim > 1
        group = groups.setdefault((layer, decay), {
            "params": [],
            "names": [],
            "weight_decay": config.weight_decay if decay else 0.0,
            "lr_scale": config.layer_decay ** (num_layers + 1 - layer),
        })
        group["params"].append(parameter)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(model: nn.Module, config: MustConfig, num_layers: int, fused: bool) -> torch.optim.AdamW:
    groups = parameter_groups(model, config, num_layers)
    for group in groups:
        group["lr"] = config.lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def cosine_factor(step: int, total_steps: int, warmup_steps: int, floor: float) -> float:
    """Multiplier of the peak lr: linear warmup, then cosine down to `floor` (min_lr / lr)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: MustConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    floor = config.scaled_min_lr / config.lr if config.lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, total_steps, config.warmup_steps, floor)
    )
