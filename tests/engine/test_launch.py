"""adapt_on_ranks (what the worker calls with MUST_GPUS_PER_JOB > 1): rank 0's callbacks and errors reach
the caller, and a rank killed outright stops the whole run as RankFailed with the checkpoint intact."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from must_engine import AdaptCancelled, resolve_job_config
from must_engine.checkpoint import load_checkpoint
from must_engine.launch import RankFailed, adapt_on_ranks, processes_for
from must_engine.train import Progress

CLASSES = ["banded", "blotchy", "braided"]


def _config(base_model: str, **overrides: object):
    return resolve_job_config("auto", {"epochs": 20, "batch_size": 8, "num_workers": 0, "log_every": 1,
                                       "checkpoint_every": 1, **overrides},
                              num_images=24, num_classes=3, base_model=base_model)


@pytest.mark.parametrize(("batch", "micro", "available", "expected"), [
    (8, 0, 1, 1), (8, 0, 2, 2), (8, 0, 4, 4), (8, 0, 3, 2), (5, 0, 2, 1), (6, 0, 4, 3),
    (8, 4, 2, 2), (8, 4, 4, 2), (12, 4, 4, 3), (8, 8, 2, 1),
])
def test_a_job_runs_on_the_most_processes_that_split_its_batch(
    tiny_base_model: str, batch: int, micro: int, available: int, expected: int
) -> None:
    config = _config(tiny_base_model, batch_size=batch, micro_batch_size=micro)
    assert processes_for(config, available) == expected


def _rank_processes() -> list[int]:
    """This process's children started by multiprocessing's spawn (the ranks, not its resource tracker)."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                pids.append(int(child))
    return pids


def test_rank_zero_reports_through_the_caller_and_a_cancel_stops_every_rank(
    tiny_base_model: str, dtd_subset: Path, tmp_path: Path
) -> None:
    seen: list[Progress] = []
    saved: list[Path] = []
    with pytest.raises(AdaptCancelled):
        adapt_on_ranks(2, sorted(dtd_subset.rglob("*.jpg")), CLASSES, tmp_path / "model",
                       base_model=tiny_base_model, config=_config(tiny_base_model), device="cpu",
                       work_dir=tmp_path / "work", on_progress=seen.append, on_checkpoint=saved.append,
                       should_stop=lambda: len(saved) >= 2)
    steps = [progress.step for progress in seen if progress.metrics]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2  # rank 0's reports, once each
    assert "on 2 x cpu (gloo)" in (seen[0].message or "")
    assert saved[0] == tmp_path / "work" / "checkpoint.pt"
    assert not (tmp_path / "model").exists()
    assert _rank_processes() == []


def test_a_rank_killed_by_a_signal_stops_the_run_whole(tiny_base_model: str, dtd_subset: Path, tmp_path: Path) -> None:
    killed: list[int] = []

    def kill_a_rank(progress: Progress) -> None:
        if progress.step >= 2 and not killed:
            killed.append(_rank_processes()[-1])
            os.kill(killed[0], signal.SIGKILL)

    with pytest.raises(RankFailed, match="killed by a signal"):
        adapt_on_ranks(2, sorted(dtd_subset.rglob("*.jpg")), CLASSES, tmp_path / "model",
                       base_model=tiny_base_model, config=_config(tiny_base_model), device="cpu",
                       work_dir=tmp_path / "work", on_progress=kill_a_rank)
    checkpoint = load_checkpoint(tmp_path / "work")
    assert killed and checkpoint is not None and checkpoint["step"] >= 2
    assert not (tmp_path / "model").exists()
    assert _rank_processes() == []
