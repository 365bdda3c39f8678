"""Request and response bodies of `/webhooks` (kept beside the feature; shapes follow app/schemas.py)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from app.db.models import Webhook as WebhookRow
from app.db.models import WebhookDelivery as DeliveryRow
from app.schemas import ErrorDetail, StrictBody


class WebhookCreate(StrictBody):
    url: str
    events: list[str]


class Webhook(BaseModel):
    id: str
    object: str = "webhook"
    url: str
    events: list[str]
    created_at: datetime

    @classmethod
    def from_row(cls, row: WebhookRow) -> Webhook:
        return cls(id=row.id, url=row.url, events=list(row.events), created_at=row.created_at)


class WebhookWithSecret(Webhook):
    """Only the answers to create and rotate carry the secret; it is never shown again."""

    secret: str


class WebhookList(BaseModel):
    object: str = "list"
    data: list[Webhook]
    has_more: bool


class Delivery(BaseModel):
    id: str
    object: str = "webhook_delivery"
    webhook_id: str
    event_id: str
    event_type: str
    status: str
    attempts: int
    created_at: datetime
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: ErrorDetail | None
    response_excerpt: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None

    @classmethod
    def from_row(cls, row: DeliveryRow) -> Delivery:
        error = (
            ErrorDetail(code=row.last_error_code, message=row.last_error_message or "") if row.last_error_code else None
        )
        return cls(
            id=row.id,
            webhook_id=row.webhook_id,
            event_id=row.event_id,
            event_type=row.event_type,
            status=row.status,
            attempts=row.attempts,
            created_at=row.created_at,
            last_attempt_at=row.last_attempt_at,
            last_status_code=row.last_status_code,
            last_error=error,
            response_excerpt=row.response_excerpt,
            next_attempt_at=row.next_attempt_at,
            delivered_at=row.delivered_at,
        )


class DeliveryList(BaseModel):
    object: str = "list"
    data: list[Delivery]
    has_more: bool
