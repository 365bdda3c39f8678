"""Running one adaptation job: lease the row, fetch and validate images, train, store the model.

The engine does the method; this module only moves state. Everything the job does is guarded by the
lease: a worker that loses it (another took the job after this one stalled) stops without writing.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from sqlalchemy.orm import Session, sessionmaker

from app.db.jobs import (
    acquire_lease,
    add_event,
    add_status_event,
    finish_leased,
    release_leased,
    succeed_leased,
    update_leased,
)
from app.db.models import Adaptation, AdaptationStatus, EventType, Model, new_id, utcnow
from app.db.session import is_database_unavailable, transaction
from app.predictions import predictions_prefix
from app.settings import Settings
from app.storage import ObjectStore, SourceUnreadable, StorageError, download_prefix, object_key, upload_directory
from app.validation import (
    ImageLimits,
    InputError,
    check_base_model_spec,
    check_images,
    engine_input_error,
    images_in_directory,
    resolve_config,
)
from app.weights import WeightsFetcher
from must_engine import (
    AdaptCancelled,
    AdaptResult,
    BaseModelError,
    ConfigError,
    Progress,
    ResumeMismatchError,
    TrainingDiverged,
    adapt,
)
from must_engine.bucket import NamedPath
from must_engine.launch import RankFailed, adapt_on_ranks, processes_for
from worker.evidence import BucketEvidence, bucket_names, label_job_bucket
from worker.lease import LeaseKeeper, LeaseLost

log = logging.getLogger(__name__)

T = TypeVar("T")

CHECKPOINT_FILE = "checkpoint.pt"
PROGRESS_WRITE_SECONDS = 1.0
PROGRESS_EVENT_SECONDS = 10.0


def is_transient(exc: BaseException) -> bool:
    """Infrastructure that is briefly unreachable (or a training process that was killed: every rank stopped,
    the next attempt resumes from the checkpoint), as opposed to a job that cannot succeed."""
    return isinstance(exc, StorageError | urllib3.exceptions.HTTPError | RankFailed) or is_database_unavailable(exc)


def failure_summary(exc: BaseException) -> str:
    """The failed job's error: the exception's type only, since its text (torch, open_clip, a loader) can
    quote server paths or library internals; the worker log keeps the text and the traceback.

    Errors re-raised from DataLoader processes name the original error on their message's last line.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    original = lines[-1].split(":", 1)[0] if len(lines) > 1 else ""
    name = original if original.isidentifier() else type(exc).__name__
    return f"training failed with {name}; the worker log has the details"


@dataclass(frozen=True)
class JobSpec:
    """What the worker needs from the row, read once when the lease is taken."""

    adaptation_id: str
    team_id: str
    class_names: list[str]
    base_model: str
    config_request: dict[str, Any]
    source_bucket: str
    source_prefix: str

    @property
    def checkpoint_key(self) -> str:
        return object_key("teams", self.team_id, "adaptations", self.adaptation_id, "checkpoint", CHECKPOINT_FILE)

    @property
    def predictions_prefix(self) -> str:
        return predictions_prefix(self.team_id, self.adaptation_id)


class AdaptationRunner:
    """Runs one delivery of `run_adaptation`; `run()` returns what happened, for the task's log."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        store: ObjectStore,
        adaptation_id: str,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.store = store
        self.adaptation_id = adaptation_id
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._last_write = 0.0
        self._last_event = 0.0
        self._last_epoch = -1

    def run(self) -> str:
        spec = self._lease()
        if spec is None:
            return "skipped: the job is finished, cancelled or held by another worker"
        with LeaseKeeper(self.session_factory, spec.adaptation_id, self.owner, self.settings) as keeper:
            try:
                return self._run_leased(spec, keeper)
            except LeaseLost:
                log.warning("lost the lease of %s; another worker has it", spec.adaptation_id)
                return "abandoned: lease lost"
            except AdaptCancelled:
                if keeper.lease_lost.is_set():
                    return "abandoned: lease lost"
                self._finish(spec, AdaptationStatus.CANCELLED, "cancelled by request")
                return "cancelled"
            except InputError as exc:
                self._fail(spec, exc.code, exc.message)
                return f"failed: {exc.code}"
            except BaseModelError as exc:
                error = engine_input_error(exc, "base_model", where=f"adaptation {spec.adaptation_id}")
                self._fail(spec, error.code, error.message)
                return f"failed: {exc.code}"
            except (ConfigError, TrainingDiverged, ResumeMismatchError) as exc:
                self._fail(spec, exc.code, str(exc))
                return f"failed: {exc.code}"
            except Exception as exc:
                if is_transient(exc):
                    # The object store or database is briefly away: give the job back for another attempt
                    # (the sweeper re-sends it at once; max_attempts bounds the retries).
                    # The team's event names the error's type; its text (hosts, library internals) stays in the log.
                    log.warning("adaptation %s: transient failure, releasing it: %s: %s",
                                spec.adaptation_id, type(exc).__name__, exc)
                    cause = ("a training process was killed" if isinstance(exc, RankFailed)
                             else "the object store or database was briefly unavailable")
                    reason = f"{type(exc).__name__} ({cause})"
                    self._with_retry(lambda session: release_leased(session, spec.adaptation_id, self.owner, reason))
                    return "released: transient failure"
                log.exception("adaptation %s failed", spec.adaptation_id)
                self._fail(spec, "training_failed", failure_summary(exc))
                return "failed: training_failed"

    def _lease(self) -> JobSpec | None:
        with transaction(self.session_factory) as session:
            if not acquire_lease(session, self.adaptation_id, self.owner, self.settings.lease_seconds):
                return None
            row = session.get_one(Adaptation, self.adaptation_id)
            resumed = " (resuming an interrupted run)" if row.attempts > 1 else ""
            add_status_event(
                session, row.id, AdaptationStatus.VALIDATING, f"attempt {row.attempts} on {self.owner}{resumed}"
            )
            return JobSpec(
                adaptation_id=row.id,
                team_id=row.team_id,
                class_names=list(row.class_names),
                base_model=row.base_model,
                config_request=dict(row.config_request),
                source_bucket=row.source_bucket,
                source_prefix=row.source_prefix,
            )

    def _run_leased(self, spec: JobSpec, keeper: LeaseKeeper) -> str:
        # The API checked the spec already; the worker checks it again under its own settings before
        # anything is read, so a row written some other way cannot make it open a file it may not.
        base_model = check_base_model_spec(spec.base_model, self.settings)
        with tempfile.TemporaryDirectory(prefix=f"must-{spec.adaptation_id}-") as scratch:
            root = Path(scratch)
            images = self._fetch_images(spec, root)
            keeper.check()
            config = resolve_config(
                spec.config_request,
                num_images=len(images),
                class_names=list(spec.class_names),
                base_model=base_model,
            )
            self._start_running(spec, num_images=len(images), config=config.to_dict())
            work_dir = root / "work"
            work_dir.mkdir()
            if self.store.exists(spec.checkpoint_key):
                self.store.get_file(spec.checkpoint_key, work_dir / CHECKPOINT_FILE)
                self._event(spec, EventType.MESSAGE, "found a checkpoint from an earlier attempt; resuming")
            keeper.check()
            fetch_weights = WeightsFetcher(self.store, self.settings)
            nproc = processes_for(config, self.settings.gpus_per_job)
            if nproc < self.settings.gpus_per_job:
                self._event(spec, EventType.MESSAGE, f"batch_size {config.batch_size} does not split over "
                            f"{self.settings.gpus_per_job} processes; training on {nproc}")
            train = adapt if nproc == 1 else partial(adapt_on_ranks, nproc)
            result = train(
                [path for path, _ in images],
                spec.class_names,
                root / "artifact",
                base_model=base_model,
                config=config,
                device=self.settings.device,
                work_dir=work_dir,
                on_progress=lambda progress: self._on_progress(spec, progress),
                on_checkpoint=lambda path: self._on_checkpoint(spec, path),
                should_stop=keeper.should_stop,
                fetch_weights=fetch_weights,
            )
            evidence = label_job_bucket(
                images, result.artifact_dir, root / "predictions", device=self.settings.device,
                fetch_weights=fetch_weights, check=keeper.check,
                report_progress=lambda message, data: self._event(spec, EventType.PROGRESS, message, data),
            )
            return self._store_model(spec, result, evidence)

    def _fetch_images(self, spec: JobSpec, root: Path) -> list[NamedPath]:
        source = self.store.for_bucket(spec.source_bucket)
        downloaded = root / "source"
        try:
            download_prefix(source, spec.source_prefix, downloaded)
        except SourceUnreadable as exc:
            raise InputError("source_unavailable", str(exc), "source.bucket") from exc
        limits = ImageLimits.from_settings(self.settings)
        images = images_in_directory(downloaded, root / "extracted", limits)
        check_images(images, limits)
        self._event(spec, EventType.MESSAGE, f"{len(images)} images validated")
        return bucket_names([path for path, _ in images], downloaded, root / "extracted")

    def _start_running(self, spec: JobSpec, **values: Any) -> None:
        def start(session: Session) -> bool:
            row = session.get_one(Adaptation, spec.adaptation_id)
            if row.started_at is None:
                values["started_at"] = utcnow()
            if not update_leased(session, spec.adaptation_id, self.owner, status=AdaptationStatus.RUNNING, **values):
                return False
            add_status_event(session, spec.adaptation_id, AdaptationStatus.RUNNING, "training started")
            return True

        if not self._with_retry(start):
            raise LeaseLost(spec.adaptation_id)

    def _on_progress(self, spec: JobSpec, progress: Progress) -> None:
        """Progress reaches the row at most once a second and the event log every few seconds."""
        now = time.monotonic()
        finished = progress.step >= progress.total_steps
        new_epoch = progress.epoch != self._last_epoch
        if progress.message is None and not finished and now - self._last_write < PROGRESS_WRITE_SECONDS:
            return
        snapshot = {
            "step": progress.step,
            "total_steps": progress.total_steps,
            "epoch": progress.epoch,
            "epochs": progress.epochs,
            "fraction": round(progress.fraction, 6),
        }
        values: dict[str, Any] = {"progress": snapshot}
        if progress.metrics:
            values["metrics"] = progress.metrics
        try:
            with transaction(self.session_factory) as session:
                update_leased(session, spec.adaptation_id, self.owner, **values)
                if progress.message is not None:
                    add_event(session, spec.adaptation_id, EventType.MESSAGE, progress.message, snapshot)
                elif finished or new_epoch or now - self._last_event >= PROGRESS_EVENT_SECONDS:
                    add_event(
                        session,
                        spec.adaptation_id,
                        EventType.PROGRESS,
                        None,
                        {**snapshot, "metrics": progress.metrics, "pseudo_labels": progress.pseudo_labels},
                    )
                    self._last_event = now
                    self._last_epoch = progress.epoch
        except Exception as exc:
            # Losing one progress update is better than losing the run; the next one catches up.
            if not is_database_unavailable(exc):
                raise
            log.warning("could not record progress of %s: %s", spec.adaptation_id, exc)
        self._last_write = now

    def _on_checkpoint(self, spec: JobSpec, path: Path) -> None:
        try:
            self.store.put_file(spec.checkpoint_key, path)
        except Exception:
            log.exception("uploading the checkpoint of %s failed; training goes on", spec.adaptation_id)

    def _store_model(self, spec: JobSpec, result: AdaptResult, evidence: BucketEvidence) -> str:
        """Upload the artifact and predictions, then reference them in one transaction; never a row without files."""
        model_id = new_id("mdl")
        prefix = object_key("teams", spec.team_id, "models", model_id) + "/"
        size = upload_directory(self.store, result.artifact_dir, prefix)
        upload_directory(self.store, evidence.predictions_dir, spec.predictions_prefix)
        model = Model(
            id=model_id,
            team_id=spec.team_id,
            adaptation_id=spec.adaptation_id,
            class_names=spec.class_names,
            base_model=spec.base_model,
            metrics=result.metrics,
            report=evidence.report,
            artifact_prefix=prefix,
            artifact_bytes=size,
        )

        def commit(session: Session) -> bool:
            return succeed_leased(session, spec.adaptation_id, self.owner, model)

        if self._with_retry(commit):
            self._discard_checkpoint(spec)
            return f"succeeded: {model_id}"
        self.store.delete_prefix(prefix)
        self.store.delete_prefix(spec.predictions_prefix)
        raise AdaptCancelled("cancelled as training finished")

    def _finish(self, spec: JobSpec, status: AdaptationStatus, message: str, **values: Any) -> None:
        self._with_retry(
            lambda session: finish_leased(session, spec.adaptation_id, self.owner, status, message, **values)
        )
        self._discard_checkpoint(spec)
        try:  # a job that does not succeed has no predictions, even if an earlier attempt uploaded some
            self.store.delete_prefix(spec.predictions_prefix)
        except Exception:
            log.exception("could not delete the predictions of %s", spec.adaptation_id)

    def _fail(self, spec: JobSpec, code: str, message: str) -> None:
        self._finish(spec, AdaptationStatus.FAILED, f"failed: {code}", error_code=code, error_message=message)

    def _discard_checkpoint(self, spec: JobSpec) -> None:
        try:
            self.store.delete_prefix(spec.checkpoint_key)
        except Exception:
            log.exception("could not delete the checkpoint of %s", spec.adaptation_id)

    def _event(self, spec: JobSpec, type_: EventType, message: str, data: dict[str, Any] | None = None) -> None:
        self._with_retry(lambda session: add_event(session, spec.adaptation_id, type_, message, data))

    def _with_retry(self, work: Callable[[Session], T]) -> T:
        """Run work in a transaction, waiting out a database restart for up to one lease period."""
        deadline = time.monotonic() + self.settings.lease_seconds
        delay = 0.5
        while True:
            try:
                with transaction(self.session_factory) as session:
                    return work(session)
            except Exception as exc:
                if not is_database_unavailable(exc) or time.monotonic() > deadline:
                    raise
                log.warning("database unavailable (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
