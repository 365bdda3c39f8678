"""State transitions of the adaptation row, shared by the API, the worker and the sweeper.

Every transition is one conditional UPDATE, so two processes racing on the same job (a redelivered
message, a cancel arriving as training ends, two sweepers) can never both win.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Update, and_, or_, select, update
from sqlalchemy.orm import Session

from app.db.models import (
    ACTIVE_STATUSES,
    LEASED_STATUSES,
    Adaptation,
    AdaptationEvent,
    AdaptationStatus,
    EventType,
    Model,
    utcnow,
)
from app.webhooks.outbox import record_adaptation_status


def add_event(
    session: Session,
    adaptation_id: str,
    type_: EventType,
    message: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    session.add(AdaptationEvent(adaptation_id=adaptation_id, type=type_, message=message, data=data))


def add_status_event(session: Session, adaptation_id: str, status: AdaptationStatus, message: str) -> None:
    add_event(session, adaptation_id, EventType.STATUS, message, {"status": status.value})
    record_adaptation_status(session, adaptation_id, status)  # the webhook outbox, in the same transaction


def _rows_changed(session: Session, statement: Update) -> int:
    result = cast(CursorResult[Any], session.execute(statement.execution_options(synchronize_session=False)))
    return result.rowcount


def _lease_is_expired(now: datetime) -> Any:
    return and_(Adaptation.status.in_(LEASED_STATUSES), Adaptation.lease_expires_at < now)


def acquire_lease(session: Session, adaptation_id: str, owner: str, lease_seconds: float) -> bool:
    """Take the job if it is waiting, or if its previous worker's lease ran out (that worker is gone).

    A message delivered twice finds the job leased (or finished) and does nothing.
    """
    now = utcnow()
    taken = _rows_changed(
        session,
        update(Adaptation)
        .where(
            Adaptation.id == adaptation_id,
            Adaptation.cancel_requested_at.is_(None),
            or_(Adaptation.status == AdaptationStatus.QUEUED, _lease_is_expired(now)),
        )
        .values(
            status=AdaptationStatus.VALIDATING,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=Adaptation.attempts + 1,
        ),
    )
    return taken == 1


@dataclass(frozen=True)
class LeaseState:
    held: bool
    cancel_requested: bool


def renew_lease(session: Session, adaptation_id: str, owner: str, lease_seconds: float) -> LeaseState:
    """Extend our lease and report whether the job should stop (cancelled, or taken by another worker)."""
    held = _rows_changed(
        session,
        update(Adaptation)
        .where(
            Adaptation.id == adaptation_id,
            Adaptation.lease_owner == owner,
            Adaptation.status.in_(LEASED_STATUSES),
        )
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds)),
    )
    cancel_requested = session.scalar(
        select(Adaptation.cancel_requested_at.is_not(None)).where(Adaptation.id == adaptation_id)
    )
    return LeaseState(held=held == 1, cancel_requested=bool(cancel_requested))


def update_leased(session: Session, adaptation_id: str, owner: str, **values: Any) -> bool:
    """Write fields of a job we hold; False when the lease was lost (the write is then skipped)."""
    changed = _rows_changed(
        session,
        update(Adaptation)
        .where(
            Adaptation.id == adaptation_id,
            Adaptation.lease_owner == owner,
            Adaptation.status.in_(LEASED_STATUSES),
        )
        .values(**values),
    )
    return changed == 1


def finish_leased(
    session: Session,
    adaptation_id: str,
    owner: str,
    status: AdaptationStatus,
    message: str,
    *,
    require_no_cancel: bool = False,
    error_code: str | None = None,
    error_message: str | None = None,
    **values: Any,
) -> bool:
    """Move a job we hold to a final status, with its events, in the caller's transaction."""
    conditions = [
        Adaptation.id == adaptation_id,
        Adaptation.lease_owner == owner,
        Adaptation.status.in_(LEASED_STATUSES),
    ]
    if require_no_cancel:
        conditions.append(Adaptation.cancel_requested_at.is_(None))
    changed = _rows_changed(
        session,
        update(Adaptation)
        .where(*conditions)
        .values(
            status=status,
            finished_at=utcnow(),
            lease_expires_at=None,
            error_code=error_code,
            error_message=error_message,
            **values,
        ),
    )
    if changed:
        _record_final(session, adaptation_id, status, message, error_code, error_message)
    return changed == 1


def _record_final(
    session: Session,
    adaptation_id: str,
    status: AdaptationStatus,
    message: str,
    error_code: str | None,
    error_message: str | None,
) -> None:
    if error_code is not None:
        add_event(session, adaptation_id, EventType.ERROR, error_message, {"code": error_code})
    add_status_event(session, adaptation_id, status, message)


def succeed_leased(session: Session, adaptation_id: str, owner: str, model: Model) -> bool:
    """Record the model and mark the job succeeded, unless a cancel arrived first (then nothing changes)."""
    if not finish_leased(
        session,
        adaptation_id,
        owner,
        AdaptationStatus.SUCCEEDED,
        f"model {model.id} is ready",
        require_no_cancel=True,
        model_id=model.id,
        metrics=model.metrics,
    ):
        return False
    session.add(model)
    return True


def release_leased(session: Session, adaptation_id: str, owner: str, reason: str) -> bool:
    """Give a job back after a transient failure: its lease ends now and the sweeper re-sends it."""
    now = utcnow()
    released = _rows_changed(
        session,
        update(Adaptation)
        .where(
            Adaptation.id == adaptation_id,
            Adaptation.lease_owner == owner,
            Adaptation.status.in_(LEASED_STATUSES),
        )
        .values(lease_expires_at=now, requeue_at=now),
    )
    if released:
        add_event(session, adaptation_id, EventType.MESSAGE, f"released for another attempt: {reason}")
    return released == 1


def request_cancel(session: Session, adaptation_id: str) -> None:
    """Ask a job to stop. A job no worker holds is cancelled at once; a running one stops at its next poll."""
    now = utcnow()
    _rows_changed(
        session,
        update(Adaptation)
        .where(
            Adaptation.id == adaptation_id,
            Adaptation.status.in_(ACTIVE_STATUSES),
            Adaptation.cancel_requested_at.is_(None),
        )
        .values(cancel_requested_at=now),
    )
    cancelled_now = _rows_changed(
        session,
        update(Adaptation)
        .where(
            Adaptation.id == adaptation_id,
            or_(Adaptation.status == AdaptationStatus.QUEUED, _lease_is_expired(now)),
        )
        .values(status=AdaptationStatus.CANCELLED, finished_at=now, lease_expires_at=None),
    )
    if cancelled_now:
        add_status_event(session, adaptation_id, AdaptationStatus.CANCELLED, "cancelled before a worker ran it")
    else:
        add_event(session, adaptation_id, EventType.MESSAGE, "cancel requested; the worker stops at its next poll")


def sweep(session: Session, *, max_attempts: int, requeue_after_seconds: float, batch: int = 100) -> list[str]:
    """Settle jobs nobody is working on; returns the ids whose queue message must be sent again.

    A job is stranded when it is queued but no worker took it in `requeue_after_seconds` (its message may
    be lost with a broker restart), or when its lease expired (its worker died). Sending a message twice is
    harmless: the lease lets only one delivery run the job.

    The longest-due jobs come first, and a re-sent job is due again only `requeue_after_seconds` later, so
    it goes to the back of the line: a backlog larger than `batch` is worked through, and jobs that keep
    coming due again (their re-sends never get taken) cannot starve the others.
    """
    now = utcnow()
    stranded = session.execute(
        select(Adaptation.id, Adaptation.status, Adaptation.attempts, Adaptation.cancel_requested_at)
        .where(
            Adaptation.requeue_at < now,
            or_(Adaptation.status == AdaptationStatus.QUEUED, _lease_is_expired(now)),
        )
        .order_by(Adaptation.requeue_at, Adaptation.id)
        .limit(batch)
    ).all()
    to_enqueue: list[str] = []
    for adaptation_id, status, attempts, cancel_requested_at in stranded:
        still_stranded = and_(
            Adaptation.id == adaptation_id,
            Adaptation.status == status,
            Adaptation.requeue_at < now,
            or_(Adaptation.status == AdaptationStatus.QUEUED, _lease_is_expired(now)),
        )
        lost_worker = status != AdaptationStatus.QUEUED
        if cancel_requested_at is not None:
            final, code, message = AdaptationStatus.CANCELLED, None, "cancelled; its worker had stopped"
        elif lost_worker and attempts >= max_attempts:
            final, code, message = (
                AdaptationStatus.FAILED,
                "attempts_exhausted",
                f"gave up after {attempts} attempts (workers lost or infrastructure unavailable)",
            )
        else:
            if _rows_changed(
                session,
                update(Adaptation)
                .where(still_stranded)
                .values(requeue_at=now + timedelta(seconds=requeue_after_seconds)),
            ):
                reason = "its worker stopped renewing the lease" if lost_worker else "no worker took it yet"
                add_event(session, adaptation_id, EventType.MESSAGE, f"re-enqueued: {reason}")
                to_enqueue.append(adaptation_id)
            continue
        if _rows_changed(
            session,
            update(Adaptation)
            .where(still_stranded)
            .values(
                status=final,
                finished_at=now,
                lease_expires_at=None,
                error_code=code,
                error_message=message if code else None,
            ),
        ):
            _record_final(session, adaptation_id, final, message, code, message if code else None)
    return to_enqueue
