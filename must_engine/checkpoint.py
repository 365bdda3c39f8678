"""Atomic training checkpoints: everything needed to continue a run exactly where it stopped.

Checkpoints travel through the object store, so they are read with `torch.load(weights_only=True)`:
tensors, containers and plain values only, never pickled code. The numpy RNG state is stored as a
tensor for that reason.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "must-checkpoint/1"


def rng_state() -> dict[str, Any]:
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(work_dir: Path, state: dict[str, Any]) -> Path:
    """Write to a temporary file, fsync, then rename: a kill at any moment leaves the old or the new file."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / CHECKPOINT_FILE
    temporary = work_dir / (CHECKPOINT_FILE + ".tmp")
    with temporary.open("wb") as handle:
        torch.save({"format": FORMAT, **state}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def load_checkpoint(work_dir: Path | None) -> dict[str, Any] | None:
    if work_dir is None or not (work_dir / CHECKPOINT_FILE).is_file():
        return None
    try:
        state = torch.load(work_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # it holds more than tensors and plain values: never unpickle it
        raise ValueError(f"{work_dir / CHECKPOINT_FILE} is not a MUST checkpoint (it holds pickled objects)") from exc
    if state.get("format") != FORMAT:
        raise ValueError(f"{work_dir / CHECKPOINT_FILE}: unsupported checkpoint format {state.get('format')!r}")
    return dict(state)


class ResumeMismatchError(ValueError):
    """work_dir holds a checkpoint of a different job (other data, classes, base model or method config)."""

    code = "resume_mismatch"


# How a run executes on this machine, not what it computes: on resume the job's own values win, so a run
# can continue on a device with less memory or with other logging. Every other config field must match.
RUNTIME_FIELDS = frozenset({"micro_batch_size", "num_workers", "log_every", "checkpoint_every", "compile",
                            "precision", "notes"})


def check_resume(
    checkpoint: dict[str, Any], *, class_names: list[str], base_model: str, num_images: int, config: dict[str, Any]
) -> None:
    """Refuse a checkpoint of another job, naming what differs, instead of using it silently.

    Precedence: the job's config always wins; a checkpoint is only resumed when it was made with the same
    data, classes, base model and every config field except RUNTIME_FIELDS.
    """
    job = {"class_names": class_names, "base_model": base_model, "num_images": num_images}
    differing = [key for key, value in job.items() if checkpoint.get(key) != value]
    saved = checkpoint["config"]
    differing += [
        f"config.{name}" for name in sorted(set(saved) | set(config))
        if name not in RUNTIME_FIELDS and saved.get(name) != config.get(name)
    ]
    if differing:
        raise ResumeMismatchError(
            f"the checkpoint in the work directory belongs to another job ({', '.join(differing)} differ); "
            "use a fresh work directory, or rerun with the checkpoint's settings"
        )
