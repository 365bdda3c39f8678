"""Running one audit: claim the row, fetch the model and the labelled zip, score both models, finish the row.

The engine's `audit` does the scoring. The row is claimed with one conditional UPDATE, so a message
delivered twice runs once. While it runs, a heartbeat thread touches the row every third of a lease period;
a row left `running` with no heartbeat for a lease period lost its worker, and is claimed again (by a
redelivered message, or one the API's sweeper sends). Each claim increments `attempts`, and every later write
of the claimer is conditional on that number: a worker that was presumed dead and comes back can neither
finish the row another worker now holds nor delete its images. The claimer deletes the images just before
it ends the row, however it ends.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, and_, or_, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Evaluation, EvaluationStatus, Model, utcnow
from app.db.session import transaction
from app.schemas import Evaluation as EvaluationOut
from app.settings import Settings
from app.storage import ObjectStore, download_prefix
from app.validation import ImageLimits, InputError, extract_archive
from app.webhooks.outbox import record_event
from app.weights import WeightsFetcher
from must_engine.audit import audit
from worker.periodic import Periodic

log = logging.getLogger(__name__)


class EvaluationRunner:
    def __init__(
        self, settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, evaluation_id: str
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.store = store
        self.evaluation_id = evaluation_id
        self.attempt = 0  # the claim this runner holds (the row's `attempts` after its claim)

    def run(self) -> str:
        claimed = self._claim()
        if claimed is None:
            return "skipped: finished, deleted or running elsewhere"
        images_key, artifact_prefix = claimed
        with Heartbeat(self._touch, self.settings.lease_seconds / 3):
            try:
                results = self._score(images_key, artifact_prefix)
            except Exception as exc:
                code, message = ((exc.code, exc.message) if isinstance(exc, InputError)
                                 else ("evaluation_failed", str(exc)))
                log.exception("evaluation %s failed", self.evaluation_id)
                status, values = EvaluationStatus.FAILED, dict[str, Any](error_code=code, error_message=message)
            else:
                status, values = EvaluationStatus.SUCCEEDED, dict[str, Any](results=results, progress={"fraction": 1.0})
            # The images go before the row ends, so a finished audit never has any left; but only while the
            # claim is still this runner's, or they are another worker's now.
            if not self._touch():
                return "abandoned: another worker claimed it"
            self.store.delete_prefix(images_key)
            if not self._finish(status, **values):
                return "abandoned: another worker claimed it"
        return "succeeded" if status == EvaluationStatus.SUCCEEDED else f"failed: {values['error_code']}"

    def _claim(self) -> tuple[str, str] | None:
        now = utcnow()
        stale = now - timedelta(seconds=self.settings.lease_seconds)
        with transaction(self.session_factory) as session:
            claimed = session.execute(
                update(Evaluation)
                .where(
                    Evaluation.id == self.evaluation_id,
                    or_(Evaluation.status == EvaluationStatus.QUEUED,
                        and_(Evaluation.status == EvaluationStatus.RUNNING, Evaluation.updated_at < stale)),
                )
                .values(status=EvaluationStatus.RUNNING, attempts=Evaluation.attempts + 1, updated_at=now,
                        started_at=now, progress={"fraction": 0.0})
                .returning(Evaluation.attempts, Evaluation.images_key, Evaluation.model_id)
                .execution_options(synchronize_session=False)
            ).one_or_none()
            if claimed is None:
                return None
            self.attempt, images_key, model_id = claimed
            return images_key, session.get_one(Model, model_id).artifact_prefix

    def _write_mine(self, session: Session, **values: Any) -> bool:
        """Touch the row and write `values`, only while this runner's claim is the current one."""
        mine = and_(Evaluation.id == self.evaluation_id, Evaluation.status == EvaluationStatus.RUNNING,
                    Evaluation.attempts == self.attempt)
        changed = cast(CursorResult[Any], session.execute(
            update(Evaluation).where(mine).values(updated_at=utcnow(), **values)
            .execution_options(synchronize_session=False)
        ))
        return changed.rowcount == 1

    def _score(self, images_key: str, artifact_prefix: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix=f"must-{self.evaluation_id}-") as scratch:
            root = Path(scratch)
            download_prefix(self.store, artifact_prefix, root / "artifact")
            self.store.get_file(images_key, root / "images.zip")
            limits = ImageLimits(1, self.settings.max_images, self.settings.max_extracted_bytes)
            extract_archive(root / "images.zip", root / "labelled", limits)  # checked again: it left our hands
            return audit(root / "artifact", root / "labelled", device=self.settings.device,
                         fetch_weights=WeightsFetcher(self.store, self.settings),
                         on_progress=self._report)

    def _touch(self, **values: Any) -> bool:
        """Touch the row (the heartbeat) and write `values`, if this runner still holds it."""
        with transaction(self.session_factory) as session:
            return self._write_mine(session, **values)

    def _report(self, fraction: float) -> None:
        self._touch(progress={"fraction": fraction})

    def _finish(self, status: EvaluationStatus, **values: Any) -> bool:
        """End the row if this runner still holds it; a success queues its `evaluation.succeeded` webhooks in
        the same transaction. False: another worker claimed it meanwhile, and nothing was written."""
        with transaction(self.session_factory) as session:
            if not self._write_mine(session, status=status, finished_at=utcnow(), **values):
                return False
            if status == EvaluationStatus.SUCCEEDED:
                row = session.get_one(Evaluation, self.evaluation_id)
                session.refresh(row)
                record_event(session, row.team_id, "evaluation.succeeded",
                             EvaluationOut.from_row(row).model_dump(mode="json"))
            return True


class Heartbeat(Periodic):
    """Calls `beat` every `interval` seconds until the block ends; a failed beat (a database restart) is
    logged and retried at the next interval."""

    def __init__(self, beat: Callable[[], object], interval: float) -> None:
        super().__init__(interval, name="evaluation-heartbeat")
        self.beat = beat

    def tick(self) -> bool:
        try:
            self.beat()
        except Exception as exc:
            log.warning("evaluation heartbeat failed: %s", exc)
        return True
