"""`GET /adaptations/{id}/predictions`: the bucket labelled by the adapted model and by zero-shot.

JSON pages follow the image names (`after` = the last image of the previous page); `format=csv|jsonl`
streams every row that passes the filters straight from the object store, one part at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from app.api.deps import CurrentTeam, ServicesDep, SessionDep
from app.api.pagination import MAX_PAGE_SIZE
from app.db.models import Adaptation as AdaptationRow
from app.db.models import AdaptationStatus
from app.errors import ApiError, bad_request, not_found
from app.predictions import predictions_prefix, read_index, rows_after, stream_lines
from app.schemas import BucketPredictionList
from app.storage import ObjectStore
from must_engine.bucket import csv_header, csv_line
from must_engine.evaluate import class_key

router = APIRouter(prefix="/adaptations", tags=["predictions"])

DEFAULT_PAGE_SIZE = 20


class Format(StrEnum):
    JSON = "json"
    CSV = "csv"
    JSONL = "jsonl"


class RowFilter:
    """Which rows a request wants: the adapted top-1 label and score, whether zero-shot said otherwise, and
    whether the image looks like no known class."""

    def __init__(
        self, class_names: list[str], label: str | None, zero_shot_label: str | None,
        score_min: float | None, score_max: float | None, changed: bool | None, unknown: bool | None = None,
    ) -> None:
        self.label = _class_named(label, class_names, "label")
        self.zero_shot_label = _class_named(zero_shot_label, class_names, "zero_shot_label")
        if score_min is not None and score_max is not None and score_min > score_max:
            raise bad_request("invalid_request", "score_min must not exceed score_max", "score_min")
        self.score_min, self.score_max, self.changed, self.unknown = score_min, score_max, changed, unknown

    @property
    def is_empty(self) -> bool:
        return (self.label, self.zero_shot_label, self.score_min, self.score_max, self.changed,
                self.unknown) == (None,) * 6

    def __call__(self, row: dict[str, Any]) -> bool:
        best, zero = row["predictions"][0], row["zero_shot"][0]
        return (
            (self.label is None or best["label"] == self.label)
            and (self.zero_shot_label is None or zero["label"] == self.zero_shot_label)
            and (self.score_min is None or best["score"] >= self.score_min)
            and (self.score_max is None or best["score"] <= self.score_max)
            and (self.changed is None or row["changed"] == self.changed)
            and (self.unknown is None or row.get("unknown") == self.unknown)  # rows from before it: never match
        )


def _class_named(value: str | None, class_names: list[str], param: str) -> str | None:
    """The model's spelling of a class name given with any case or spacing; unknown names are a 400."""
    if value is None:
        return None
    match = {class_key(name): name for name in class_names}.get(class_key(value))
    if match is None:
        raise bad_request("unknown_class", f"{value!r} is not one of the classes {class_names}", param)
    return match


@router.get(
    "/{adaptation_id}/predictions",
    response_model=BucketPredictionList,
    responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}},
                     "description": "A JSON page, or every row as CSV or JSON Lines."}},
)
def list_predictions(
    session: SessionDep,
    team: CurrentTeam,
    services: ServicesDep,
    adaptation_id: str,
    limit: Annotated[int | None, Query(ge=1, le=MAX_PAGE_SIZE, description="Rows per JSON page (20).")] = None,
    after: Annotated[str | None, Query(max_length=4096, description="The image of the last row already seen.")] = None,
    format: Annotated[Format, Query(description="json: pages; csv or jsonl: every row, streamed.")] = Format.JSON,
    label: Annotated[str | None, Query(description="Only rows whose adapted top-1 is this class.")] = None,
    zero_shot_label: Annotated[str | None, Query(description="Only rows whose zero-shot top-1 is this class.")] = None,
    score_min: Annotated[float | None, Query(ge=0, le=1, description="Adapted top-1 score at least this.")] = None,
    score_max: Annotated[float | None, Query(ge=0, le=1, description="Adapted top-1 score at most this.")] = None,
    changed: Annotated[bool | None, Query(description="Only rows whose top-1 differs (or not) from zero-shot.")] = None,
    unknown: Annotated[bool | None, Query(description="Only images of no known class (or of one).")] = None,
) -> BucketPredictionList | StreamingResponse:
    """Every image of the bucket with the adapted model's and zero-shot's top-5 and the unknown decision (ood_score
    above the threshold fitted on the bucket at adaptation time), sorted by image name."""
    row = session.get(AdaptationRow, adaptation_id)
    if row is None or row.team_id != team.id:
        raise not_found("adaptation", "adaptation_id")
    if row.status != AdaptationStatus.SUCCEEDED:
        raise ApiError(409, "predictions_unavailable",
                       f"the adaptation is {row.status}; only a succeeded adaptation has predictions", "adaptation_id")
    keep = RowFilter(row.class_names, label, zero_shot_label, score_min, score_max, changed, unknown)
    store, prefix = services.store, predictions_prefix(team.id, adaptation_id)
    index = read_index(store, prefix)
    if index is None:
        raise ApiError(409, "predictions_unavailable",
                       "this adaptation succeeded before the service labelled buckets; it has no predictions",
                       "adaptation_id")
    if format is Format.JSON:
        limit = limit or DEFAULT_PAGE_SIZE
        rows = rows_after(store, prefix, index, after)
        page: list[dict[str, Any]] = []
        for candidate in rows:
            if keep(candidate):
                if len(page) == limit:
                    return BucketPredictionList.model_validate({"data": page, "has_more": True})
                page.append(candidate)
        return BucketPredictionList.model_validate({"data": page, "has_more": False})
    for name, value in (("after", after), ("limit", limit)):
        if value is not None:
            raise bad_request("invalid_request", f"{name} pages JSON results; csv and jsonl stream every row", name)
    media = "text/csv" if format is Format.CSV else "application/x-ndjson"
    return StreamingResponse(
        _stream(store, prefix, index, keep, format), media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{adaptation_id}-predictions.{format.value}"'},
    )


def _stream(
    store: ObjectStore, prefix: str, index: dict[str, Any], keep: RowFilter, format: Format
) -> Iterator[bytes]:
    if format is Format.CSV:
        yield csv_header().encode()
    for line in stream_lines(store, prefix, index):
        if keep.is_empty and format is Format.JSONL:
            yield line  # stored lines are already JSON Lines
            continue
        row = json.loads(line)
        if keep(row):
            yield csv_line(row).encode() if format is Format.CSV else line
