"""Classification: with an adapted model (`/models/{id}/classify`) or zero-shot (`/classify`)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.security import HTTPAuthorizationCredentials
from PIL.Image import Image
from starlette.concurrency import run_in_threadpool

from app.api.deps import BearerDep, ServicesDep, TeamBriefly, get_current_team
from app.db.models import Model as ModelRow
from app.db.models import Team
from app.errors import ApiError, not_found
from app.predictors import BatchingPredictor
from app.schemas import (
    MIN_SCORE_DESCRIPTION,
    ClassifyImages,
    ClassifyResponse,
    ImageResult,
    Prediction,
    ZeroShotClassify,
)
from app.services import Services
from app.settings import Settings
from app.uploads import (
    FileInMemory,
    MultipartForm,
    media_type,
    multipart_boundary,
    parse_json,
    parse_multipart_bytes,
    read_body,
)
from app.validation import (
    InputError,
    check_base_model_spec,
    class_names_from_form,
    engine_input_error,
    normalize_class_names,
)
from must_engine import DEFAULT_BASE_MODEL, BaseModelError, ImageError, open_image

router = APIRouter(tags=["classify"])

DEFAULT_TOP_K = 5
TopKQuery = Annotated[
    int | None,
    Query(
        description=f"Labels per image (default {DEFAULT_TOP_K}); may instead be sent as the `top_k` form field "
        "or JSON key, and where both are sent they must agree."
    ),
]
_Number = TypeVar("_Number", int, float)
MinScoreQuery = Annotated[float | None, Query(description=MIN_SCORE_DESCRIPTION)]


def _request_body(json_model: str, extra_fields: dict[str, Any], required: tuple[str, ...]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["images", *required],
                        "properties": {
                            "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                            "top_k": {"type": "integer", "default": DEFAULT_TOP_K},
                            "min_score": {"type": "number", "minimum": 0, "maximum": 1},
                            **extra_fields,
                        },
                    }
                },
                "application/json": {"schema": {"$ref": f"#/components/schemas/{json_model}"}},
            },
        }
    }


@dataclass
class ClassifyInput:
    images: list[Image]
    filenames: list[str | None]
    top_k: int
    min_score: float | None  # None: the model's fitted threshold
    class_names: list[str] | None  # zero-shot only
    base_model: str | None


async def _read_input(
    request: Request,
    settings: Settings,
    json_model: type[ClassifyImages] | type[ZeroShotClassify],
    query_top_k: int | None,
    query_min_score: float | None,
) -> ClassifyInput:
    """Read the body on the event loop, then parse and decode it on a worker thread (one hop)."""
    kind = media_type(request)
    if kind not in ("application/json", "multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data or application/json")
    boundary = multipart_boundary(request) if kind == "multipart/form-data" else None
    body = await read_body(request, settings.max_classify_bytes)
    return await run_in_threadpool(_parse_input, body, boundary, settings, json_model, query_top_k, query_min_score)


def _parse_input(
    body: bytes,
    boundary: bytes | None,
    settings: Settings,
    json_model: type[ClassifyImages] | type[ZeroShotClassify],
    query_top_k: int | None,
    query_min_score: float | None,
) -> ClassifyInput:
    """Parse either body form; names are checked before any image is decoded."""
    zero_shot = json_model is ZeroShotClassify
    if boundary is None:
        parsed, _ = parse_json(body, json_model)
        sources: list[tuple[bytes, str | None]] = [
            (_decode_base64(text, index), None) for index, text in enumerate(parsed.images)
        ]
        top_k = _top_k(query_top_k, parsed.top_k if "top_k" in parsed.model_fields_set else None)
        min_score = _one_of("min_score", query_min_score, parsed.min_score)
        if isinstance(parsed, ZeroShotClassify):
            json_names = normalize_class_names(parsed.class_names, settings)
            return _decode(sources, top_k, min_score, json_names, _base_model(parsed.base_model, settings), settings)
        return _decode(sources, top_k, min_score, None, None, settings)
    form = parse_multipart_bytes(body, boundary, max_files=settings.max_classify_images)
    unknown = sorted((set(form.fields) | {upload.field for upload in form.files}) - set(json_model.model_fields))
    if unknown:
        raise InputError("unknown_field", f"unknown field {unknown[0]!r}", unknown[0])
    names = class_names_from_form(form.values("class_names"), settings) if zero_shot else None
    base_model = _base_model(form.value("base_model"), settings) if zero_shot else None
    return _decode(
        [(upload.content, upload.filename) for upload in form.files_of("images")],
        _top_k(query_top_k, _form_top_k(form)),
        _one_of("min_score", query_min_score, _form_min_score(form)),
        names,
        base_model,
        settings,
    )


def _base_model(spec: str | None, settings: Settings) -> str:
    return check_base_model_spec(spec or DEFAULT_BASE_MODEL, settings)


def _top_k(from_query: int | None, from_body: int | None) -> int:
    chosen = _one_of("top_k", from_query, from_body)
    return DEFAULT_TOP_K if chosen is None else chosen


def _one_of(name: str, from_query: _Number | None, from_body: _Number | None) -> _Number | None:
    """A parameter may come in the query string or the body; sent in both, the two must agree."""
    if from_query is not None and from_body is not None and from_query != from_body:
        raise InputError(
            "conflicting_parameter",
            f"{name} is {from_query} in the query string but {from_body} in the body; send one",
            name,
        )
    return from_body if from_body is not None else from_query


def _form_top_k(form: MultipartForm[FileInMemory]) -> int | None:
    text = form.value("top_k")
    if text is None:
        return None
    try:
        return int(text)
    except ValueError as exc:
        raise InputError("invalid_request", "top_k must be an integer", "top_k") from exc


def _form_min_score(form: MultipartForm[FileInMemory]) -> float | None:
    text = form.value("min_score")
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError as exc:
        raise InputError("invalid_request", "min_score must be a number between 0 and 1", "min_score") from exc
    if not math.isfinite(value):
        raise InputError("invalid_request", "min_score must be a number between 0 and 1", "min_score")
    return value


def _decode_base64(text: str, index: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError("invalid_base64", f"image {index} is not valid base64", f"images.{index}") from exc


def _decode(
    sources: list[tuple[bytes, str | None]],
    top_k: int,
    min_score: float | None,
    class_names: list[str] | None,
    base_model: str | None,
    settings: Settings,
) -> ClassifyInput:
    if not sources:
        raise InputError("missing_field", "images is required", "images")
    if len(sources) > settings.max_classify_images:
        raise InputError("too_many_images", f"at most {settings.max_classify_images} images per request", "images")
    if not 1 <= top_k <= settings.max_top_k:
        raise InputError("invalid_request", f"top_k must be between 1 and {settings.max_top_k}", "top_k")
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise InputError("invalid_request", "min_score must be between 0 and 1", "min_score")
    images = []
    for index, (source, name) in enumerate(sources):
        try:
            images.append(open_image(source, filename=name))
        except ImageError as exc:
            raise engine_input_error(exc, f"images.{index}") from exc
    return ClassifyInput(images, [name for _, name in sources], top_k, min_score, class_names, base_model)


def _team_and_model(
    services: Services, credentials: HTTPAuthorizationCredentials | None, model_id: str
) -> tuple[Team, ModelRow | None]:
    """The caller's team (or 401) and its model row, in one session closed before the request waits for
    the batcher, and one worker-thread hop. The 404 is the caller's to raise, after the rate limit."""
    with services.session_factory() as session:
        team = get_current_team(session, credentials)
        row = session.get(ModelRow, model_id)
        return team, row if row is not None and row.team_id == team.id else None


async def _predict(predictor: BatchingPredictor, batch: ClassifyInput) -> list[ImageResult]:
    results = await asyncio.wrap_future(predictor.submit(batch.images, batch.top_k, batch.min_score))
    return [
        ImageResult(
            index=index,
            filename=batch.filenames[index],
            predictions=[Prediction(label=label, score=score) for label, score in result.predictions],
            ood_score=result.ood_score,
            unknown=result.unknown,
        )
        for index, result in enumerate(results)
    ]


def _min_score(predictor: BatchingPredictor, batch: ClassifyInput) -> float:
    return predictor.min_score if batch.min_score is None else batch.min_score


@router.post(
    "/models/{model_id}/classify",
    response_model=ClassifyResponse,
    openapi_extra=_request_body("ClassifyImages", {}, ()),
)
async def classify_with_model(
    request: Request,
    credentials: BearerDep,
    services: ServicesDep,
    model_id: str,
    top_k: TopKQuery = None,
    min_score: MinScoreQuery = None,
) -> ClassifyResponse:
    """Top-k labels from an adapted model of the team, each image with its unknown decision."""
    team, row = await run_in_threadpool(_team_and_model, services, credentials, model_id)
    await services.classify_limiter.check(team.id)
    if row is None:
        raise not_found("model", "model_id")
    batch = await _read_input(request, services.settings, ClassifyImages, top_k, min_score)
    predictor = services.predictors.loaded_model(row.id)
    if predictor is None:  # a load may take seconds: off the event loop
        predictor = await run_in_threadpool(services.predictors.for_model, row.id, row.artifact_prefix)
    results = await _predict(predictor, batch)
    services.metrics.classified_images.labels("adapted").inc(len(results))
    return ClassifyResponse(model_id=row.id, base_model=row.base_model, min_score=_min_score(predictor, batch),
                            results=results)


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    openapi_extra=_request_body(
        "ZeroShotClassify",
        {
            "class_names": {"type": "array", "items": {"type": "string"}},
            "base_model": {"type": "string"},
        },
        ("class_names",),
    ),
)
async def classify_zero_shot(
    request: Request, team: TeamBriefly, services: ServicesDep, top_k: TopKQuery = None,
    min_score: MinScoreQuery = None,
) -> ClassifyResponse:
    """Top-k labels from a base model's zero-shot head: the baseline an adapted model is compared with."""
    await services.classify_limiter.check(team.id)
    batch = await _read_input(request, services.settings, ZeroShotClassify, top_k, min_score)
    assert batch.class_names is not None and batch.base_model is not None
    base_model = batch.base_model
    try:
        predictor = services.predictors.loaded_zero_shot(base_model, batch.class_names)
        if predictor is None:
            predictor = await run_in_threadpool(services.predictors.zero_shot, base_model, batch.class_names)
    except BaseModelError as exc:
        raise engine_input_error(exc, "base_model") from exc
    results = await _predict(predictor, batch)
    services.metrics.classified_images.labels("zero_shot").inc(len(results))
    return ClassifyResponse(model_id=None, base_model=base_model, min_score=_min_score(predictor, batch),
                            results=results)
