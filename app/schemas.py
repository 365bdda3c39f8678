"""Request and response bodies of the HTTP API (pydantic v2)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.db.models import Adaptation as AdaptationRow
from app.db.models import AdaptationEvent as EventRow
from app.db.models import Evaluation as EvaluationRow
from app.db.models import Model as ModelRow


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class SourceLocation(StrictBody):
    bucket: str = Field(min_length=1, max_length=63)
    prefix: str = Field(default="", max_length=1024)


class AdaptationFromSource(StrictBody):
    """JSON form of `POST /adaptations`: images already in an object-store bucket."""

    class_names: list[str]
    source: SourceLocation
    base_model: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


class Progress(BaseModel):
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    epochs: int = 0
    fraction: float = 0.0


class JobError(BaseModel):
    code: str
    message: str


class Adaptation(BaseModel):
    id: str
    object: str = "adaptation"
    status: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    class_names: list[str]
    num_images: int | None
    base_model: str
    config: dict[str, Any]
    progress: Progress
    metrics: dict[str, Any]
    model_id: str | None
    error: JobError | None
    metadata: dict[str, Any]
    cancel_requested: bool
    attempts: int

    @classmethod
    def from_row(cls, row: AdaptationRow) -> Adaptation:
        return cls(
            id=row.id,
            status=row.status,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            class_names=row.class_names,
            num_images=row.num_images,
            base_model=row.base_model,
            config=row.config if row.config is not None else row.config_request,
            progress=Progress(**(row.progress or {})),
            metrics=row.metrics or {},
            model_id=row.model_id,
            error=JobError(code=row.error_code, message=row.error_message or "") if row.error_code else None,
            metadata=row.user_metadata,
            cancel_requested=row.cancel_requested_at is not None,
            attempts=row.attempts,
        )


class AdaptationList(BaseModel):
    object: str = "list"
    data: list[Adaptation]
    has_more: bool


class Event(BaseModel):
    id: int
    type: str
    created_at: datetime
    message: str | None
    data: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: EventRow) -> Event:
        return cls(id=row.id, type=row.type, created_at=row.created_at, message=row.message, data=row.data)


class EventList(BaseModel):
    object: str = "list"
    data: list[Event]
    has_more: bool


class Model(BaseModel):
    id: str
    object: str = "model"
    adaptation_id: str
    created_at: datetime
    class_names: list[str]
    base_model: str
    metrics: dict[str, Any]
    # Label-free evidence on the bucket (must_engine.estimate.BucketEvidence.report); None on older models.
    report: dict[str, Any] | None
    artifact_bytes: int

    @classmethod
    def from_row(cls, row: ModelRow) -> Model:
        return cls(
            id=row.id,
            adaptation_id=row.adaptation_id,
            created_at=row.created_at,
            class_names=row.class_names,
            base_model=row.base_model,
            metrics=row.metrics or {},
            report=row.report,
            artifact_bytes=row.artifact_bytes,
        )


class ModelList(BaseModel):
    object: str = "list"
    data: list[Model]
    has_more: bool


class ModelScores(BaseModel):
    """One model's scores in an audit (must_engine.evaluate.EvalResult)."""

    top1: float
    mean_per_class: float
    n: int
    per_class: dict[str, float]
    class_names: list[str]
    confusion: list[list[int]] = Field(description="confusion[i][j]: images of class i predicted as class j")


class Evaluation(BaseModel):
    id: str
    object: str = "evaluation"
    model_id: str
    status: str
    n: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    adapted: ModelScores | None
    zero_shot: ModelScores | None
    error: JobError | None

    @classmethod
    def from_row(cls, row: EvaluationRow) -> Evaluation:
        results = row.results or {}
        return cls(
            id=row.id,
            model_id=row.model_id,
            status=row.status,
            n=row.n,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            progress=Progress(**(row.progress or {})),
            adapted=results.get("adapted"),
            zero_shot=results.get("zero_shot"),
            error=JobError(code=row.error_code, message=row.error_message or "") if row.error_code else None,
        )


class EvaluationList(BaseModel):
    object: str = "list"
    data: list[Evaluation]
    has_more: bool


class BucketPrediction(BaseModel):
    image: str
    predictions: list[Prediction]
    zero_shot: list[Prediction]
    changed: bool
    ood_score: float | None = Field(
        default=None, description="Higher = less like any class; null for buckets labelled before it existed.")
    unknown: bool | None = Field(
        default=None, description="ood_score above the model's threshold (fitted on the bucket); null as ood_score.")


class BucketPredictionList(BaseModel):
    object: str = "list"
    data: list[BucketPrediction]
    has_more: bool


class ArtifactFileUrl(BaseModel):
    name: str
    url: str


class ArtifactUrls(BaseModel):
    model_id: str
    expires_at: datetime
    files: list[ArtifactFileUrl]


MIN_SCORE_DESCRIPTION = (
    "Images whose certainty (1 - ood_score) is below this are `unknown` (0..1); default: the threshold fitted on the "
    "model's bucket at adaptation time (zero-shot: 0.05, i.e. nearly uniform predictions only). Or the `min_score` "
    "query parameter; where both are sent they must agree."
)


class ClassifyImages(StrictBody):
    """JSON form of `POST /models/{id}/classify`: base64-encoded image bytes."""

    images: list[str] = Field(min_length=1)
    top_k: int = Field(default=5, description="Or the `top_k` query parameter; where both are sent they must agree.")
    min_score: float | None = Field(default=None, description=MIN_SCORE_DESCRIPTION)


class ZeroShotClassify(StrictBody):
    """JSON form of `POST /classify`."""

    images: list[str] = Field(min_length=1)
    class_names: list[str]
    base_model: str | None = None
    top_k: int = Field(default=5, description="Or the `top_k` query parameter; where both are sent they must agree.")
    min_score: float | None = Field(default=None, description=MIN_SCORE_DESCRIPTION)


class Prediction(BaseModel):
    label: str
    score: float


class ImageResult(BaseModel):
    index: int
    filename: str | None
    predictions: list[Prediction]
    ood_score: float = Field(description="Higher = less like any class: the entropy of the prediction over all "
                             "classes divided by log(number of classes), 0..1.")
    unknown: bool = Field(description="Of no known class: ood_score above the model's threshold, or 1 - ood_score "
                          "below the request's min_score.")


class ClassifyResponse(BaseModel):
    model_id: str | None
    base_model: str
    min_score: float = Field(description="The 1 - ood_score below which an image was called unknown: the "
                             "request's, or the model's fitted threshold.")
    results: list[ImageResult]


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
