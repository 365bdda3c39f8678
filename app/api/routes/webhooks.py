"""`/webhooks`: a team's endpoints (create, list, get, delete, rotate the secret) and their delivery log."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import delete, func, select

from app.api.deps import CurrentTeam, SessionDep, SettingsDep
from app.api.pagination import MAX_PAGE_SIZE, newest_first
from app.db.models import Webhook as WebhookRow
from app.db.models import WebhookDelivery as DeliveryRow
from app.db.models import utcnow
from app.errors import ApiError, bad_request, not_found
from app.webhooks.outbox import EVENT_TYPES
from app.webhooks.schemas import (
    Delivery,
    DeliveryList,
    Webhook,
    WebhookCreate,
    WebhookList,
    WebhookWithSecret,
)
from app.webhooks.signing import SecretBox, new_secret
from app.webhooks.urls import WebhookUrlError, validate_url

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


def _box(request: Request) -> SecretBox:
    box: SecretBox = request.app.state.webhook_box
    return box


def _owned(session: SessionDep, team: CurrentTeam, webhook_id: str) -> WebhookRow:
    row = session.get(WebhookRow, webhook_id)
    if row is None or row.team_id != team.id:
        raise not_found("webhook", "webhook_id")
    return row


def _check_events(events: list[str]) -> list[str]:
    if not events:
        raise bad_request("invalid_webhook_events", "events must name at least one event type", "events")
    for index, event in enumerate(events):
        if event not in EVENT_TYPES:
            raise bad_request(
                "unknown_webhook_event",
                f"unknown event type {event!r}; expected one of {', '.join(EVENT_TYPES)}",
                f"events.{index}",
            )
    if len(set(events)) != len(events):
        raise bad_request("invalid_webhook_events", "events must not repeat an event type", "events")
    return events


@router.post("", status_code=201, response_model=WebhookWithSecret)
def create_webhook(
    request: Request, session: SessionDep, team: CurrentTeam, settings: SettingsDep, body: WebhookCreate
) -> WebhookWithSecret:
    """Register an endpoint. The answer carries its signing secret, which is never shown again."""
    events = _check_events(body.events)
    try:
        validate_url(body.url, settings.webhook_allowed_hosts)
    except WebhookUrlError as exc:
        raise bad_request(exc.code, exc.message, "url") from exc
    count = session.scalar(select(func.count()).select_from(WebhookRow).where(WebhookRow.team_id == team.id))
    if (count or 0) >= settings.max_webhooks_per_team:
        raise ApiError(409, "too_many_webhooks", f"a team may have at most {settings.max_webhooks_per_team} webhooks")
    secret = new_secret()
    row = WebhookRow(
        team_id=team.id, url=body.url.strip(), events=events, secret_encrypted=_box(request).encrypt(secret)
    )
    session.add(row)
    session.commit()
    return WebhookWithSecret(**Webhook.from_row(row).model_dump(), secret=secret)


@router.get("", response_model=WebhookList)
def list_webhooks(
    session: SessionDep,
    team: CurrentTeam,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 20,
    after: Annotated[str | None, Query(description="The last id of the previous page.")] = None,
) -> WebhookList:
    """The team's endpoints, newest first (without secrets)."""
    query = select(WebhookRow).where(WebhookRow.team_id == team.id)
    rows, has_more = newest_first(session, query, WebhookRow.id, id_prefix="wh", after=after, limit=limit)
    return WebhookList(data=[Webhook.from_row(row) for row in rows], has_more=has_more)


@router.get("/{webhook_id}", response_model=Webhook)
def get_webhook(session: SessionDep, team: CurrentTeam, webhook_id: str) -> Webhook:
    return Webhook.from_row(_owned(session, team, webhook_id))


@router.delete("/{webhook_id}", status_code=204)
def delete_webhook(session: SessionDep, team: CurrentTeam, webhook_id: str) -> Response:
    """Remove the endpoint and its pending deliveries: nothing is sent to it afterwards."""
    row = _owned(session, team, webhook_id)
    session.execute(delete(DeliveryRow).where(DeliveryRow.webhook_id == row.id))
    session.delete(row)
    session.commit()
    return Response(status_code=204)


@router.post("/{webhook_id}/rotate-secret", response_model=WebhookWithSecret)
def rotate_secret(
    request: Request, session: SessionDep, team: CurrentTeam, settings: SettingsDep, webhook_id: str
) -> WebhookWithSecret:
    """A new secret, shown once; deliveries are signed with the old one too for a grace period."""
    row = _owned(session, team, webhook_id)
    secret = new_secret()
    row.previous_secret_encrypted = row.secret_encrypted
    row.previous_secret_expires_at = utcnow() + timedelta(seconds=settings.webhook_previous_secret_seconds)
    row.secret_encrypted = _box(request).encrypt(secret)
    session.commit()
    return WebhookWithSecret(**Webhook.from_row(row).model_dump(), secret=secret)


@router.get("/{webhook_id}/deliveries", response_model=DeliveryList)
def list_deliveries(
    session: SessionDep,
    team: CurrentTeam,
    webhook_id: str,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 20,
    after: Annotated[str | None, Query(description="The last id of the previous page.")] = None,
) -> DeliveryList:
    """What was sent to the endpoint, newest first: event, attempts, last answer, next try."""
    _owned(session, team, webhook_id)
    query = select(DeliveryRow).where(DeliveryRow.webhook_id == webhook_id)
    rows, has_more = newest_first(session, query, DeliveryRow.id, id_prefix="whd", after=after, limit=limit)
    return DeliveryList(data=[Delivery.from_row(row) for row in rows], has_more=has_more)
