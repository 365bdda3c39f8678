"""`/models/{id}/evaluations`: audits of a model on a team's labelled images, against zero-shot."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import select

from app.api.deps import CurrentTeam, ServicesDep, SessionDep
from app.api.pagination import MAX_PAGE_SIZE, newest_first
from app.api.routes.models import owned_model
from app.db.models import Evaluation as EvaluationRow
from app.errors import ApiError, not_found
from app.evaluations import accept_evaluation
from app.schemas import Evaluation, EvaluationList
from app.uploads import media_type

router = APIRouter(prefix="/models", tags=["evaluations"])

_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["images"],
            "properties": {"images": {"type": "string", "format": "binary",
                                      "description": "One .zip of <class name>/<image> folders."}},
        }}},
    }
}


@router.post("/{model_id}/evaluations", status_code=202, response_model=Evaluation, openapi_extra=_UPLOAD_BODY)
async def create_evaluation(request: Request, team: CurrentTeam, services: ServicesDep, model_id: str) -> Evaluation:
    """Score the model and zero-shot on labelled images; runs on a worker, poll it until `succeeded`."""
    with services.session_factory() as session:
        model = owned_model(session, team, model_id)
    if media_type(request) != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data with one zip in `images`")
    return Evaluation.from_row(await accept_evaluation(request, team, model, services))


@router.get("/{model_id}/evaluations", response_model=EvaluationList)
def list_evaluations(
    session: SessionDep,
    team: CurrentTeam,
    model_id: str,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 20,
    after: Annotated[str | None, Query(description="The last id of the previous page.")] = None,
) -> EvaluationList:
    """The model's evaluations, newest first."""
    owned_model(session, team, model_id)
    query = select(EvaluationRow).where(EvaluationRow.model_id == model_id)
    rows, has_more = newest_first(session, query, EvaluationRow.id, id_prefix="eva", after=after, limit=limit)
    return EvaluationList(data=[Evaluation.from_row(row) for row in rows], has_more=has_more)


@router.get("/{model_id}/evaluations/{evaluation_id}", response_model=Evaluation)
def get_evaluation(session: SessionDep, team: CurrentTeam, model_id: str, evaluation_id: str) -> Evaluation:
    owned_model(session, team, model_id)
    row = session.get(EvaluationRow, evaluation_id)
    if row is None or row.model_id != model_id:
        raise not_found("evaluation", "evaluation_id")
    return Evaluation.from_row(row)
