"""`/adaptations`: create (upload or bucket source), list, get, cancel, events."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy import select

from app.api.deps import CurrentTeam, ServicesDep, SessionDep
from app.api.pagination import MAX_PAGE_SIZE, newest_first
from app.db.jobs import request_cancel
from app.db.models import FINAL_STATUSES
from app.db.models import Adaptation as AdaptationRow
from app.db.models import AdaptationEvent as EventRow
from app.errors import ApiError, not_found
from app.intake import accept_source, accept_upload
from app.schemas import Adaptation, AdaptationFromSource, AdaptationList, Event, EventList
from app.uploads import media_type

router = APIRouter(prefix="/adaptations", tags=["adaptations"])


_MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["class_names", "images"],
    "properties": {
        "class_names": {
            "type": "array",
            "items": {"type": "string"},
            "description": "A JSON array of names, or the field repeated once per name.",
        },
        "images": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "One .zip of images, or one or more image files.",
        },
        "base_model": {"type": "string", "description": "Defaults to the shipped offline base model."},
        "config": {"type": "string", "description": 'JSON object: {"preset": "auto", ...overrides}.'},
        "metadata": {"type": "string", "description": "JSON object stored with the adaptation."},
    },
}
_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            "application/json": {"schema": {"$ref": "#/components/schemas/AdaptationFromSource"}},
        },
    }
}


@router.post("", status_code=202, response_model=Adaptation, openapi_extra=_CREATE_BODY)
async def create_adaptation(
    request: Request,
    response: Response,
    team: CurrentTeam,
    services: ServicesDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)] = None,
) -> Adaptation:
    """Start adapting a base model to a team's images: an upload (multipart) or a bucket prefix (JSON)."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        accepted = await accept_upload(request, team, services, idempotency_key)
    elif kind == "application/json":
        accepted = await accept_source(request, team, services, idempotency_key)
    else:
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data (upload) or application/json")
    if accepted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return Adaptation.from_row(accepted.adaptation)


def _owned(session: SessionDep, team: CurrentTeam, adaptation_id: str) -> AdaptationRow:
    row = session.get(AdaptationRow, adaptation_id)
    if row is None or row.team_id != team.id:
        raise not_found("adaptation", "adaptation_id")
    return row


@router.get("", response_model=AdaptationList)
def list_adaptations(
    session: SessionDep,
    team: CurrentTeam,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 20,
    after: Annotated[str | None, Query(description="The last id of the previous page.")] = None,
) -> AdaptationList:
    """The team's adaptations, newest first."""
    query = select(AdaptationRow).where(AdaptationRow.team_id == team.id)
    rows, has_more = newest_first(session, query, AdaptationRow.id, id_prefix="ada", after=after, limit=limit)
    return AdaptationList(data=[Adaptation.from_row(row) for row in rows], has_more=has_more)


@router.get("/{adaptation_id}", response_model=Adaptation)
def get_adaptation(session: SessionDep, team: CurrentTeam, adaptation_id: str) -> Adaptation:
    return Adaptation.from_row(_owned(session, team, adaptation_id))


@router.post("/{adaptation_id}/cancel", response_model=Adaptation)
def cancel_adaptation(session: SessionDep, team: CurrentTeam, adaptation_id: str) -> Adaptation:
    """Cancel at once if no worker runs it yet; otherwise the worker stops within seconds."""
    row = _owned(session, team, adaptation_id)
    if row.status in FINAL_STATUSES:
        raise ApiError(409, "adaptation_finished", f"the adaptation already {row.status}", "adaptation_id")
    request_cancel(session, adaptation_id)
    session.commit()
    session.refresh(row)
    return Adaptation.from_row(row)


@router.get("/{adaptation_id}/events", response_model=EventList)
def list_events(
    session: SessionDep,
    team: CurrentTeam,
    adaptation_id: str,
    after: Annotated[int | None, Query(ge=0, description="The last event id already seen.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventList:
    """Status changes, progress, messages and errors, oldest first."""
    _owned(session, team, adaptation_id)
    query = select(EventRow).where(EventRow.adaptation_id == adaptation_id)
    if after is not None:
        query = query.where(EventRow.id > after)
    rows = session.scalars(query.order_by(EventRow.id).limit(limit + 1)).all()
    return EventList(data=[Event.from_row(row) for row in rows[:limit]], has_more=len(rows) > limit)


# The JSON request body is parsed by hand (the route also takes multipart), so its schema is
# registered for the OpenAPI document here.
OPENAPI_MODELS: list[type[BaseModel]] = [AdaptationFromSource]
