"""The webhook outbox: events written with the state change they report, then claimed and settled.

`record_event` runs inside the caller's transaction, so an event exists if and only if its change was
committed: a process that dies after the commit leaves the row for the next dispatcher, one that dies
before it leaves neither. Claims are conditional UPDATEs with an expiry, so several API processes share
the work and a sender that died mid-request is replaced (the receiver then sees the same `webhook-id`
again: delivery is at least once).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, delete, or_, select, update
from sqlalchemy.orm import Session

from app.db.models import Adaptation, AdaptationStatus, DeliveryStatus, Webhook, WebhookDelivery, new_id, utcnow
from app.schemas import Adaptation as AdaptationBody

ADAPTATION_EVENTS = {
    AdaptationStatus.RUNNING: "adaptation.running",
    AdaptationStatus.SUCCEEDED: "adaptation.succeeded",
    AdaptationStatus.FAILED: "adaptation.failed",
    AdaptationStatus.CANCELLED: "adaptation.cancelled",
}
# `evaluation.succeeded` is recorded by worker/evaluations.py with `record_event` when an audit ends.
EVENT_TYPES = (*ADAPTATION_EVENTS.values(), "evaluation.succeeded")

JITTER = 0.2


def record_event(session: Session, team_id: str, event_type: str, data: dict[str, Any]) -> str | None:
    """Queue `event_type` for every endpoint of the team that subscribed to it, in the caller's transaction.

    Returns the event id (the `webhook-id` every endpoint receives), or None when nobody listens.
    """
    hooks = [
        hook for hook in session.scalars(select(Webhook).where(Webhook.team_id == team_id)) if event_type in hook.events
    ]
    if not hooks:
        return None
    now = utcnow()
    event_id = new_id("msg")
    body = json.dumps(
        {"type": event_type, "timestamp": now.isoformat().replace("+00:00", "Z"), "data": data},
        separators=(",", ":"),
    )
    for hook in hooks:
        session.add(
            WebhookDelivery(
                webhook_id=hook.id, event_id=event_id, event_type=event_type, body=body, next_attempt_at=now
            )
        )
    return event_id


def record_adaptation_status(session: Session, adaptation_id: str, status: AdaptationStatus) -> None:
    """Queue the webhook event of an adaptation's new status; `data` is the adaptation as the API shows it."""
    event_type = ADAPTATION_EVENTS.get(status)
    if event_type is None:
        return
    # The status was changed by a Core UPDATE in this transaction: read the row as it is now.
    row = session.get_one(Adaptation, adaptation_id, populate_existing=True)
    record_event(session, row.team_id, event_type, AdaptationBody.from_row(row).model_dump(mode="json"))


def claim_due(session: Session, owner: str, claim_seconds: float, limit: int) -> list[str]:
    """Take up to `limit` deliveries that are due and not held by a live sender."""
    now = utcnow()
    free = or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until < now)
    due = and_(
        WebhookDelivery.status == DeliveryStatus.PENDING,
        WebhookDelivery.next_attempt_at <= now,
        free,
    )
    candidates = session.scalars(
        select(WebhookDelivery.id).where(due).order_by(WebhookDelivery.next_attempt_at).limit(limit)
    ).all()
    claimed: list[str] = []
    for delivery_id in candidates:
        result = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, due)
            .values(claimed_by=owner, claimed_until=now + timedelta(seconds=claim_seconds))
            .execution_options(synchronize_session=False)
        )
        if cast(CursorResult[Any], result).rowcount == 1:
            claimed.append(delivery_id)
    return claimed


def prune_deliveries(session: Session, older_than: datetime, batch: int = 1000) -> int:
    """Delete up to `batch` finished (delivered or given-up) deliveries queued before `older_than`."""
    finished = select(WebhookDelivery.id).where(
        WebhookDelivery.status != DeliveryStatus.PENDING, WebhookDelivery.created_at < older_than
    ).order_by(WebhookDelivery.created_at).limit(batch)
    result = session.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(finished))
                             .execution_options(synchronize_session=False))
    return int(cast(CursorResult[Any], result).rowcount)


@dataclass(frozen=True)
class Outcome:
    """What one attempt got: a 2xx, or why not."""

    status_code: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    response_excerpt: str | None = None

    @property
    def delivered(self) -> bool:
        return self.error_code is None and self.status_code is not None and 200 <= self.status_code < 300


def next_delay(attempts: int, delays: Sequence[float]) -> float | None:
    """Seconds until the next try after `attempts` tries (with jitter), or None to give up."""
    if attempts > len(delays):
        return None
    return delays[attempts - 1] * random.uniform(1 - JITTER, 1 + JITTER)


def settle_attempt(session: Session, delivery_id: str, owner: str, outcome: Outcome, delays: Sequence[float]) -> bool:
    """Record one attempt of a delivery we hold; False when the claim was lost or the endpoint deleted."""
    row = session.get(WebhookDelivery, delivery_id, with_for_update=True)
    if row is None or row.claimed_by != owner or row.status != DeliveryStatus.PENDING:
        return False
    now = utcnow()
    row.attempts += 1
    row.last_attempt_at = now
    row.last_status_code = outcome.status_code
    row.last_error_code = outcome.error_code
    row.last_error_message = (outcome.error_message or "")[:500] or None
    row.response_excerpt = outcome.response_excerpt
    row.claimed_by = None
    row.claimed_until = None
    if outcome.delivered:
        row.status = DeliveryStatus.DELIVERED
        row.delivered_at = now
        row.next_attempt_at = None
        return True
    delay = next_delay(row.attempts, delays)
    if delay is None:
        row.status = DeliveryStatus.FAILED
        row.next_attempt_at = None
    else:
        row.next_attempt_at = now + timedelta(seconds=delay)
    return True
