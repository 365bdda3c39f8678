"""Atomic training checkpoints: everything needed to continue a run exactly where it stopped."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "must-checkpoint/1"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
    state = torch.load(work_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT:
        raise ValueError(f"{work_dir / CHECKPOINT_FILE}: unsupported checkpoint format {state.get('format')!r}")
    return dict(state)
