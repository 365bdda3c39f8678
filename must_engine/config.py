"""MUST hyperparameters: one frozen dataclass, its resolution from a preset (must_engine/presets.py), and validation.

A job's configuration is resolved once (preset + overrides + image/class counts + model geometry) and
stored with the checkpoint and the artifact, so a resumed or audited run sees exactly what ran.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from must_engine.presets import PAPER_BATCH_SIZE, PAPER_VALUES, PRESETS, ModelGeometry, auto_values, fit_batch
from must_engine.prior import ClassPriorError, parse_class_prior
from must_engine.templates import TEMPLATE_SETS


class ConfigError(ValueError):
    """A preset or override the engine cannot run; `field` names the offending key."""

    def __init__(self, message: str, *, field: str | None = None, code: str = "invalid_config") -> None:
        super().__init__(message)
        self.field = field
        self.code = code


@dataclass(frozen=True)
class MustConfig:
    # --- schedule and optimiser -------------------------------------------------------------------
    epochs: int = 20
    batch_size: int = 1024  # the method's batch (the paper: 16 GPUs x 64); reached by accumulation
    micro_batch_size: int = 0  # images per forward pass; 0 = pick from the device (memory knob only)
    base_lr: float = 2e-5  # lr = base_lr * batch_size / 256, as in the paper
    min_lr: float = 1e-6  # scaled by batch_size / 256 like base_lr (reference code)
    warmup_steps: int = 0
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    # The reference code puts the new [MSK] token in layer 0 (its name contains "embedding"), so it
    # learns at 0.65^(L+1) of the head's lr. "embed" keeps that; "head" gives it the full lr.
    mask_token_lr: Literal["embed", "head"] = "embed"
    # --- self-training ---------------------------------------------------------------------------
    tau: float = 0.5  # pseudo-label confidence threshold
    ema_init: float = 0.99
    ema_final: float = 0.9998
    ema_warmup: int = 500  # optimizer steps over which the EMA decay ramps linearly
    w_fair: float = 1.0
    # "auto": batch average when one forward pass holds at least as many images as classes, else a moving
    # average (the reference switches at a fixed 512 classes; the real issue is classes vs batch). Decided
    # from the config alone (see fairness_uses_moving_average), so a resumed job never switches.
    fair_mode: Literal["auto", "batch", "moving_average"] = "auto"
    fair_momentum: float = 0.5
    # Distribution alignment of the teacher (ReMixMatch; DebiasPL for CLIP): divide its probabilities by
    # their running class marginal before pseudo-labelling, so a class the zero-shot head favours is not
    # amplified by self-training. 0 = off (the paper); else the running mean's momentum per micro-batch.
    align_pseudo_labels: float = 0.0
    # --- masked image modeling and alignment -----------------------------------------------------
    mim: bool = True  # False = self-training only (no masking, decoder or alignment)
    mask_patch: int = 32  # mask cell in pixels; a multiple of the model's patch size
    mask_ratio: float = 0.3
    w_mim: float = 1.0
    w_align: float = 0.2
    align_target: Literal["cls", "nearest_k"] = "cls"
    align_k: int = 4
    # --- augmentation ----------------------------------------------------------------------------
    input_size: int = 224
    crop_scale_min: float = 0.3
    randaugment: str = "rand-m9-mstd0.5-inc1"  # timm policy string, the reference code's default
    templates: str = "default"  # prompt template set (see templates.json)
    # --- system ----------------------------------------------------------------------------------
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False
    num_workers: int = -1  # -1 = min(8, cpu count)
    seed: int = 0
    checkpoint_every: int = 100  # optimizer steps
    log_every: int = 10
    # The paper evaluates (and the reference logs) the EMA teacher, which is smoother than the student.
    export: Literal["teacher", "student"] = "teacher"
    # Fold a per-class logit offset into the exported head that balances its predictions over the bucket
    # (must_engine/balance.py). Off in the paper's presets (the paper does not do it); on in `auto`.
    balance_classes: bool = False
    # Balance the zero-shot head the same way *before* training, so the teacher's first pseudo-labels already
    # have the uniform class marginal the fairness term assumes instead of the shift's skew (OTTER, Shin et
    # al. 2024: Sinkhorn label-distribution correction of zero-shot CLIP). Off in the paper's presets.
    balance_init: bool = False
    # The bucket's expected class shares, in class order (must_engine/prior.py): both balancings move the
    # predictions to them instead of to uniform. () = uniform. A job gives {class name: weight} or a list.
    class_prior: tuple[float, ...] = ()
    # Images of no known class (must_engine/unknown.py). "ueo": self-training weighted by the teacher's
    # confidence and the fairness average by its inverse (UEO, Liang et al. 2023), and the balancing above
    # left to the images not flagged unknown; "ueo_zero_shot" takes the confidence of the frozen zero-shot
    # model instead (UEO's own choice). "off": the paper's MUST, in every preset and in `auto` too: neither
    # weighting kept unknown images from pulling known-class accuracy down better than the paper's MUST on the
    # proxy benchmark (docs/BENCHMARKS.md, section 9), and `auto`'s quality table is measured without it.
    unknown_weighting: Literal["off", "ueo", "ueo_zero_shot"] = "off"
    notes: tuple[str, ...] = field(default=())

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size if self.micro_batch_size else 1

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256

    @property
    def scaled_min_lr(self) -> float:
        return self.min_lr * self.batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["notes"] = list(self.notes)
        data["class_prior"] = list(self.class_prior)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MustConfig:
        values = dict(data)
        values["notes"] = tuple(values.get("notes", ()))
        values["class_prior"] = tuple(values.get("class_prior", ()))
        return cls(**{k: v for k, v in values.items() if k in _FIELDS})


_FIELDS = {f.name: f for f in dataclasses.fields(MustConfig)}

# Ranges checked for every resolved config: (minimum, maximum), inclusive.
_RANGES: dict[str, tuple[float, float]] = {
    "epochs": (1, 1000),
    "batch_size": (1, 65536),
    "micro_batch_size": (0, 4096),
    "base_lr": (0.0, 1.0),
    "min_lr": (0.0, 1.0),
    "warmup_steps": (0, 10_000_000),
    "weight_decay": (0.0, 1.0),
    "layer_decay": (0.01, 1.0),
    "tau": (0.0, 1.0),
    "ema_init": (0.0, 1.0),
    "ema_final": (0.0, 1.0),
    "ema_warmup": (0, 10_000_000),
    "w_fair": (0.0, 100.0),
    "fair_momentum": (0.0, 0.999),
    "align_pseudo_labels": (0.0, 0.9999),
    "mask_patch": (1, 1024),
    "mask_ratio": (0.0, 0.95),
    "w_mim": (0.0, 100.0),
    "w_align": (0.0, 100.0),
    "align_k": (1, 64),
    "input_size": (16, 1024),
    "crop_scale_min": (0.01, 1.0),
    "num_workers": (-1, 64),
    "seed": (0, 2**31 - 1),
    "checkpoint_every": (1, 10_000_000),
    "log_every": (1, 10_000_000),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "mask_token_lr": ("embed", "head"),
    "fair_mode": ("auto", "batch", "moving_average"),
    "align_target": ("cls", "nearest_k"),
    "precision": ("auto", "bf16", "fp32"),
    "export": ("teacher", "student"),
    "unknown_weighting": ("off", "ueo", "ueo_zero_shot"),
}
# Fields a job may not set: they are derived or bookkeeping.
_NOT_OVERRIDABLE = {"notes", "input_size"}

# Images per forward pass assumed when micro_batch_size is 0 (the device picks it, at least this many):
# the reference's per-GPU batch.
REFERENCE_MICRO_BATCH = 64


def resolve_config(
    preset: str = "auto",
    overrides: Mapping[str, Any] | None = None,
    *,
    num_images: int,
    num_classes: int,
    geometry: ModelGeometry | None = None,
    class_names: Sequence[str] | None = None,
) -> MustConfig:
    """Preset + per-job overrides -> a validated MustConfig for this many images and classes (`class_names`
    are needed only to read a `class_prior` given by class name)."""
    if preset not in PRESETS:
        raise ConfigError(
            f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}", field="preset", code="unknown_preset"
        )
    if num_images < 1:
        raise ConfigError("no images to adapt on", field="images", code="too_few_images")
    if num_classes < 2:
        raise ConfigError("at least two class names are needed", field="class_names", code="too_few_classes")
    geometry = geometry or ModelGeometry(image_size=224, patch_size=16)
    overrides = dict(overrides or {})
    if "class_prior" in overrides:
        try:
            overrides["class_prior"] = parse_class_prior(overrides["class_prior"], class_names, num_classes)
        except ClassPriorError as exc:
            raise ConfigError(str(exc), field="class_prior", code="invalid_class_prior") from exc
    _check_override_types(overrides)

    notes: list[str] = []
    if preset == "auto":
        values = auto_values(num_images, num_classes, geometry)
    else:
        columns = PAPER_VALUES[preset]
        column = "L" if geometry.large and "L" in columns else "B"
        if geometry.large and column == "B":
            notes.append(f"preset {preset!r} has no ViT-L/14 values in the paper; using its ViT-B/16 values")
        values = dict(columns[column])
    values["mask_patch"] = values.pop("mask_patches") * geometry.patch_size
    values["input_size"] = geometry.image_size
    values["templates"] = preset if preset != "auto" else "default"

    batch_size = int(overrides.get("batch_size", values.pop("batch_size", PAPER_BATCH_SIZE)))
    if "batch_size" not in overrides:
        fitted = fit_batch(batch_size, num_images)
        if fitted != batch_size:
            notes.append(f"batch_size {batch_size} > {num_images} images; using {fitted}")
        batch_size = fitted
    values["batch_size"] = batch_size

    values.update(overrides)
    values["notes"] = tuple(notes)
    config = MustConfig(**values)
    validate_config(config, num_images=num_images, geometry=geometry)
    return config


def fairness_uses_moving_average(config: MustConfig, num_classes: int) -> bool:
    """Whether L_fair averages predictions over steps: from the config and the class count, never the device."""
    if config.fair_mode != "auto":
        return config.fair_mode == "moving_average"
    per_forward = min(config.micro_batch_size or REFERENCE_MICRO_BATCH, config.batch_size)
    return num_classes > per_forward


def pick_device(device: str) -> torch.device:
    """"auto" = CUDA when present; an explicit CUDA device on a machine without one is a config error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available", field="device")
    return torch.device(device)


def normalize_class_names(class_names: Sequence[str]) -> list[str]:
    """Collapse whitespace; refuse empty names and duplicates that differ only in case or spacing."""
    names = [" ".join(str(name).split()) for name in class_names]
    if len(names) < 2:
        raise ConfigError("at least two class names are needed", field="class_names", code="too_few_class_names")
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if not name:
            raise ConfigError(f"class name {index} is empty", field=f"class_names.{index}", code="empty_class_name")
        if name.casefold() in seen:
            raise ConfigError(f"class name {name!r} repeats class name {seen[name.casefold()]}",
                              field=f"class_names.{index}", code="duplicate_class_name")
        seen[name.casefold()] = index
    return names


def _check_override_types(overrides: Mapping[str, Any]) -> None:
    for key, value in overrides.items():
        if key not in _FIELDS or key in _NOT_OVERRIDABLE:
            raise ConfigError(
                f"unknown config field {key!r}; valid fields: {', '.join(sorted(set(_FIELDS) - _NOT_OVERRIDABLE))}",
                field=key,
            )
        if key == "class_prior":
            continue  # parsed and checked by parse_class_prior
        default = _FIELDS[key].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ConfigError(
                f"config field {key!r} must be {type(default).__name__}, got {value!r}", field=key
            )


def validate_config(config: MustConfig, *, num_images: int, geometry: ModelGeometry) -> None:
    """Every rule a config must meet to run on this many images; also checks configs built by hand."""
    for name, (low, high) in _RANGES.items():
        value = getattr(config, name)
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}", field=name)
    for name, choices in _CHOICES.items():
        if getattr(config, name) not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}", field=name)
    if config.ema_init > config.ema_final:
        raise ConfigError("ema_init must not exceed ema_final", field="ema_init")
    if config.batch_size > num_images:
        raise ConfigError(
            f"batch_size {config.batch_size} exceeds the number of images ({num_images})", field="batch_size"
        )
    if config.micro_batch_size and config.batch_size % config.micro_batch_size:
        raise ConfigError("batch_size must be a multiple of micro_batch_size", field="micro_batch_size")
    if config.input_size % geometry.patch_size:
        raise ConfigError(
            f"input_size must be a multiple of the model's patch size {geometry.patch_size}", field="input_size"
        )
    if config.mask_patch % geometry.patch_size or config.input_size % config.mask_patch:
        raise ConfigError(
            f"mask_patch must be a multiple of the patch size ({geometry.patch_size}) dividing input_size "
            f"({config.input_size})",
            field="mask_patch",
        )
    if config.min_lr > config.base_lr:
        raise ConfigError("min_lr must not exceed base_lr", field="min_lr")
    if config.templates not in TEMPLATE_SETS:
        raise ConfigError(f"templates must be one of {', '.join(TEMPLATE_SETS)}", field="templates")
