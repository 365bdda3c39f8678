"""Starting the ranks of one adaptation with PyTorch's own launcher (torch elastic, what torchrun runs).

Two doors: `must adapt --nproc N` re-runs its own command line under torchrun (`torchrun_main`), and a
caller that needs adapt()'s callbacks (the worker) calls `adapt_on_ranks`, which starts N ranks with
torch elastic's launcher and relays rank 0's progress, checkpoints and errors to the calling thread.

A rank that dies takes the whole run with it: the elastic agent stops every other rank (max_restarts 0)
and the caller gets an error; checkpoints are written by rank 0 alone, atomically, so a rerun (or the
worker's next attempt) resumes from the last one, never from half of one.
"""

from __future__ import annotations

import multiprocessing
import queue
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from must_engine.base_models import DEFAULT_BASE_MODEL, FetchWeights, parse_base_model
from must_engine.config import MustConfig


class RankFailed(RuntimeError):
    """A rank ended without an error of its own (killed, out of memory, crashed): the run stopped whole."""

    code = "rank_failed"


def processes_for(config: MustConfig, available: int) -> int:
    """The most ranks, up to `available`, that split the config's batch evenly (the rule of `split_batch`).

    The batch is global, so fewer ranks train the same model, only slower: a worker runs a job whose batch
    does not split over all of its GPUs on fewer of them instead of failing it. The API cannot check this
    for it: which worker (one GPU or several) takes a job is decided by the queue.
    """
    def splits(ranks: int) -> bool:
        per_step = (config.micro_batch_size or 1) * ranks
        return config.batch_size % per_step == 0

    return max(ranks for ranks in range(1, max(available, 1) + 1) if splits(ranks))


def torchrun_main(nproc: int, argv: Sequence[str]) -> int:
    """Run `python -m must_engine.cli ARGV` as `nproc` ranks of one standalone torchrun; its exit status."""
    from torch.distributed.run import main as torchrun

    try:
        with tempfile.TemporaryDirectory(prefix="must-ranks-") as logs:  # error files; the ranks print theirs
            torchrun(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", f"--log-dir={logs}",
                      "--module", "must_engine.cli", *argv])
    except ChildFailedError as exc:
        if any(process.exitcode < 0 for process in exc.failures.values()):
            return 1  # killed by a signal: every rank was stopped; a rerun resumes from the last checkpoint
        return exc.get_first_failure()[1].exitcode  # the rank's own status (2: bad input, as without --nproc)
    return 0


@dataclass(frozen=True)
class _FetchedWeights:
    """Weights the launching process fetched, by URI: its object-store client does not cross processes."""

    files: dict[str, Path]

    def __call__(self, uri: str) -> Path:
        return self.files[uri]


def adapt_on_ranks(
    nproc: int,
    images: Sequence[Path],
    class_names: Sequence[str],
    out_dir: Path,
    *,
    on_progress: Callable[[Any], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    fetch_weights: FetchWeights | None = None,
    **options: Any,
) -> Any:
    """adapt() on `nproc` ranks of this host; same arguments, same result, same exceptions.

    The callbacks run in the calling thread (rank 0's calls, relayed in order); an exception one raises
    stops the ranks and is raised here once they are gone.
    """
    spec = parse_base_model(options.get("base_model", DEFAULT_BASE_MODEL), options.get("pretrained"))
    files = {}
    if fetch_weights is not None and spec.pretrained and spec.pretrained.startswith("s3://"):
        files[spec.pretrained] = fetch_weights(spec.pretrained)
    context = multiprocessing.get_context("spawn")
    events: Any = context.Queue()
    stop = context.Event()
    outcome: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="must-ranks-") as logs:  # the agent's error files, not kept
        launch = elastic_launch(LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"must-{uuid.uuid4().hex[:12]}",
            rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=logs),
        ), _rank_main)

        def run() -> None:
            try:
                outcome["results"] = launch(list(images), list(class_names), Path(out_dir), options,
                                            _FetchedWeights(files), events, stop)
            except BaseException as exc:  # re-raised in the calling thread
                outcome["failure"] = exc

        launcher = threading.Thread(target=run, name="must-ranks", daemon=True)
        launcher.start()
        rank_errors: dict[int, BaseException] = {}
        callback_error: BaseException | None = None
        while launcher.is_alive() or not _drained(events):
            try:
                kind, payload = events.get(timeout=0.2)
            except queue.Empty:
                kind, payload = "", None
            try:
                if kind == "progress" and on_progress is not None:
                    on_progress(payload)
                elif kind == "checkpoint" and on_checkpoint is not None:
                    on_checkpoint(Path(payload))
                elif kind == "error":
                    rank_errors.setdefault(*payload)
                if should_stop is not None and should_stop():
                    stop.set()
            except BaseException as exc:
                callback_error = callback_error or exc
                stop.set()
        launcher.join()
    if callback_error is not None:
        raise callback_error
    if "failure" in outcome:
        raise _run_error(outcome["failure"], rank_errors, nproc)
    return outcome["results"][0]


def _run_error(failure: BaseException, rank_errors: dict[int, BaseException], nproc: int) -> BaseException:
    """What the caller sees of a failed run: a rank's own error, or RankFailed when one was killed."""
    if not isinstance(failure, ChildFailedError):
        return failure
    killed = [rank for rank, process in failure.failures.items() if process.exitcode < 0]
    if killed:  # whatever the others raised followed from it (a peer's closed connection)
        error: BaseException = RankFailed(f"rank {killed[0]} of {nproc} was killed by a signal; every rank was "
                                          "stopped and the last checkpoint is intact")
    else:
        first, _ = failure.get_first_failure()
        error = rank_errors.get(first) or next(iter(rank_errors.values()), None) or RankFailed(
            f"rank {first} of {nproc} failed; every rank was stopped")
    error.__cause__ = failure
    return error


def _drained(events: Any) -> bool:
    try:
        return bool(events.empty())
    except (OSError, ValueError):
        return True


def _rank_main(images: list[Path], class_names: list[str], out_dir: Path, options: dict[str, Any],
               fetch_weights: _FetchedWeights, events: Any, stop: Any) -> Any:
    """One rank: join the process group, adapt, and tell the launching process what rank 0 saw."""
    from must_engine import distributed
    from must_engine.train import adapt

    ranks = distributed.init_process_group(str(options.get("device", "auto")))
    try:
        return adapt(images, class_names, out_dir, **options, fetch_weights=fetch_weights,
                     on_progress=lambda progress: events.put(("progress", progress)),
                     on_checkpoint=lambda path: events.put(("checkpoint", str(path))),
                     should_stop=stop.is_set)
    except BaseException as exc:
        events.put(("error", (ranks.rank, exc)))  # the typed error (config, divergence, cancel) to re-raise
        raise
    finally:
        distributed.shutdown()
