"""The sweep of evaluation (audit) rows: re-send audits nobody is working on, give up on ones that keep dying.

An audit is stranded when it is queued but no worker took it in `requeue_after_seconds` (its message may be
lost with a broker restart), or when it is running and its worker's heartbeat (worker/evaluations.py) has
not touched it for a lease period. Every change is one UPDATE conditional on what the sweep read, so two
sweepers, or a sweeper and a worker, never both win; a message sent twice runs once (the worker's claim).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, or_, select, update
from sqlalchemy.orm import Session

from app.db.models import Evaluation, EvaluationStatus, utcnow


@dataclass
class AuditSweep:
    resend: list[str] = field(default_factory=list)  # ids whose queue message must be sent again
    given_up: list[str] = field(default_factory=list)  # images keys of audits failed for good (to delete)


def sweep_audits(
    session: Session, *, lease_seconds: float, requeue_after_seconds: float, max_attempts: int, batch: int = 100
) -> AuditSweep:
    """Settle stranded audits. A re-sent audit is due again only `requeue_after_seconds` later (queued) or
    a lease period later (running, put back in the queue), so the oldest come first and none starves."""
    now = utcnow()
    queued_before, beat_before = now - timedelta(seconds=requeue_after_seconds), now - timedelta(seconds=lease_seconds)
    stranded = or_(
        and_(Evaluation.status == EvaluationStatus.QUEUED, Evaluation.updated_at < queued_before),
        and_(Evaluation.status == EvaluationStatus.RUNNING, Evaluation.updated_at < beat_before),
    )
    rows = session.execute(
        select(Evaluation.id, Evaluation.status, Evaluation.attempts, Evaluation.images_key)
        .where(stranded).order_by(Evaluation.updated_at, Evaluation.id).limit(batch)
    ).all()
    result = AuditSweep()
    for evaluation_id, status, attempts, images_key in rows:
        as_read = and_(Evaluation.id == evaluation_id, Evaluation.status == status,
                       Evaluation.attempts == attempts, stranded)
        give_up = status == EvaluationStatus.RUNNING and attempts >= max_attempts
        values: dict[str, Any]
        if give_up:
            values = dict(
                status=EvaluationStatus.FAILED, finished_at=now, error_code="attempts_exhausted",
                error_message=f"gave up after {attempts} attempts (workers lost or infrastructure unavailable)",
            )
        else:
            values = {"status": EvaluationStatus.QUEUED}  # a lost message, or a dead worker: again
        changed = cast(CursorResult[Any], session.execute(
            update(Evaluation).where(as_read).values(updated_at=now, **values)
            .execution_options(synchronize_session=False)
        ))
        if changed.rowcount != 1:
            continue
        if give_up:
            result.given_up.append(images_key)
        else:
            result.resend.append(evaluation_id)
    return result
