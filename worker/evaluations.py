"""Running one audit: claim the row, fetch the model and the labelled zip, score both models, finish the row.

The engine's `audit` does the scoring. The row is claimed with one conditional UPDATE, so a message
delivered twice runs once; a row left `running` by a worker that died is claimed again once it has not
been touched for a lease period. The images are deleted when the audit ends, however it ends.
"""

from __future__ import annotations

import logging
import tempfile
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

log = logging.getLogger(__name__)


class EvaluationRunner:
    def __init__(
        self, settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, evaluation_id: str
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.store = store
        self.evaluation_id = evaluation_id

    def run(self) -> str:
        claimed = self._claim()
        if claimed is None:
            return "skipped: finished, deleted or running elsewhere"
        images_key, artifact_prefix = claimed
        try:
            results = self._score(images_key, artifact_prefix)
        except Exception as exc:
            code, message = (exc.code, exc.message) if isinstance(exc, InputError) else ("evaluation_failed", str(exc))
            log.exception("evaluation %s failed", self.evaluation_id)
            self._finish(EvaluationStatus.FAILED, error_code=code, error_message=message)
            return f"failed: {code}"
        finally:
            self.store.delete_prefix(images_key)
        self._finish(EvaluationStatus.SUCCEEDED, results=results, progress={"fraction": 1.0})
        return "succeeded"

    def _claim(self) -> tuple[str, str] | None:
        now = utcnow()
        stale = now - timedelta(seconds=self.settings.lease_seconds)
        with transaction(self.session_factory) as session:
            taken = cast(CursorResult[Any], session.execute(
                update(Evaluation)
                .where(
                    Evaluation.id == self.evaluation_id,
                    or_(Evaluation.status == EvaluationStatus.QUEUED,
                        and_(Evaluation.status == EvaluationStatus.RUNNING, Evaluation.updated_at < stale)),
                )
                .values(status=EvaluationStatus.RUNNING, attempts=Evaluation.attempts + 1, updated_at=now,
                        started_at=now, progress={"fraction": 0.0})
                .execution_options(synchronize_session=False)
            ))
            if taken.rowcount != 1:
                return None
            row = session.get_one(Evaluation, self.evaluation_id)
            model = session.get_one(Model, row.model_id)
            return row.images_key, model.artifact_prefix

    def _score(self, images_key: str, artifact_prefix: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix=f"must-{self.evaluation_id}-") as scratch:
            root = Path(scratch)
            download_prefix(self.store, artifact_prefix, root / "artifact")
            self.store.get_file(images_key, root / "images.zip")
            limits = ImageLimits(1, self.settings.max_images, self.settings.max_extracted_bytes)
            extract_archive(root / "images.zip", root / "labelled", limits)  # checked again: it left our hands
            return audit(root / "artifact", root / "labelled", device=self.settings.device,
                         fetch_weights=WeightsFetcher(self.store, self.settings),
                         on_progress=lambda fraction: self._update(progress={"fraction": fraction}))

    def _update(self, **values: Any) -> None:
        with transaction(self.session_factory) as session:
            session.execute(update(Evaluation).where(Evaluation.id == self.evaluation_id)
                            .values(updated_at=utcnow(), **values).execution_options(synchronize_session=False))

    def _finish(self, status: EvaluationStatus, **values: Any) -> None:
        """End the row; a success queues its `evaluation.succeeded` webhooks in the same transaction."""
        with transaction(self.session_factory) as session:
            session.execute(update(Evaluation).where(Evaluation.id == self.evaluation_id)
                            .values(updated_at=utcnow(), status=status, finished_at=utcnow(), **values)
                            .execution_options(synchronize_session=False))
            if status == EvaluationStatus.SUCCEEDED:
                row = session.get_one(Evaluation, self.evaluation_id)
                session.refresh(row)
                record_event(session, row.team_id, "evaluation.succeeded",
                             EvaluationOut.from_row(row).model_dump(mode="json"))
