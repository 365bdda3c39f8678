"""Database tables. The adaptation row is the single source of truth for a job's state."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """A public id that sorts by creation time (48-bit milliseconds, then 64 random bits).

    Time-ordered ids make cursor pagination a plain `id < after` comparison.
    """
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone otherwise)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime, dict[str, Any]: JSON, list[str]: JSON}


class AdaptationStatus(StrEnum):
    QUEUED = "queued"
    VALIDATING = "validating"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = (AdaptationStatus.QUEUED, AdaptationStatus.VALIDATING, AdaptationStatus.RUNNING)
LEASED_STATUSES = (AdaptationStatus.VALIDATING, AdaptationStatus.RUNNING)
FINAL_STATUSES = (AdaptationStatus.SUCCEEDED, AdaptationStatus.FAILED, AdaptationStatus.CANCELLED)


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("team"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key: the public `id` travels inside the key, only a hash of the secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Adaptation(Base):
    __tablename__ = "adaptations"
    __table_args__ = (
        UniqueConstraint("team_id", "idempotency_key", name="uq_adaptations_team_idempotency_key"),
        Index("ix_adaptations_team_id_id", "team_id", "id"),
        Index("ix_adaptations_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ada"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default=AdaptationStatus.QUEUED)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    request_sha256: Mapped[str] = mapped_column(String(64))

    class_names: Mapped[list[str]]
    base_model: Mapped[str] = mapped_column(String(500))
    # What the client asked for ({"preset": ..., overrides}); `config` is the engine's resolution of it.
    config_request: Mapped[dict[str, Any]]
    config: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    user_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    # Where the images are: the upload prefix in the service bucket, or a team's source bucket.
    source_bucket: Mapped[str] = mapped_column(String(255))
    source_prefix: Mapped[str] = mapped_column(String(1024))
    num_images: Mapped[int | None] = mapped_column(default=None)
    upload_bytes: Mapped[int] = mapped_column(BigInteger, default=0)

    progress: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    model_id: Mapped[str | None] = mapped_column(String(40), default=None)

    cancel_requested_at: Mapped[datetime | None] = mapped_column(default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(255), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the sweeper should send the queue message again if no worker has taken the job by then.
    requeue_at: Mapped[datetime] = mapped_column(default=utcnow)

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class EventType(StrEnum):
    STATUS = "status"
    PROGRESS = "progress"
    MESSAGE = "message"
    ERROR = "error"


class AdaptationEvent(Base):
    """What happened to an adaptation, in order (the integer id is the `after` cursor)."""

    __tablename__ = "adaptation_events"
    __table_args__ = (Index("ix_adaptation_events_adaptation_id_id", "adaptation_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    adaptation_id: Mapped[str] = mapped_column(ForeignKey("adaptations.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str | None] = mapped_column(Text, default=None)
    data: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Model(Base):
    """An adapted model; its artifact lives in the object store under `artifact_prefix`."""

    __tablename__ = "models"
    __table_args__ = (Index("ix_models_team_id_id", "team_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mdl"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    adaptation_id: Mapped[str] = mapped_column(String(40), unique=True)
    class_names: Mapped[list[str]]
    base_model: Mapped[str] = mapped_column(String(500))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # The label-free report on the bucket (must_engine.estimate), also in the artifact's metadata.
    report: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    artifact_prefix: Mapped[str] = mapped_column(String(1024))
    artifact_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EvaluationStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Evaluation(Base):
    """An audit of a model on labelled images: adapted vs zero-shot on the same images.

    The images are an object (`images_key`) until the worker has scored them; then they are deleted.
    """

    __tablename__ = "evaluations"
    __table_args__ = (
        Index("ix_evaluations_model_id_id", "model_id", "id"),
        Index("ix_evaluations_status_updated_at", "status", "updated_at"),  # the sweeper's scan
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("eva"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default=EvaluationStatus.QUEUED)
    n: Mapped[int] = mapped_column(Integer)
    images_key: Mapped[str] = mapped_column(String(1024))
    progress: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    results: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # Written with each progress update: a running row not touched for a lease period lost its worker.
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class PendingUpload(Base):
    """An upload prefix being written for a request that has not committed its adaptation yet.

    The row is removed in the transaction that inserts the adaptation. One still here long after was
    abandoned (the API process died mid-request): the sweeper deletes its objects.
    """

    __tablename__ = "pending_uploads"

    prefix: Mapped[str] = mapped_column(String(1024), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Webhook(Base):
    """A team's endpoint; its signing secret is stored encrypted (app.webhooks.signing), never hashed,
    because every delivery must be signed with it."""

    __tablename__ = "webhooks"
    __table_args__ = (Index("ix_webhooks_team_id_id", "team_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("wh"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[str]]
    secret_encrypted: Mapped[str] = mapped_column(Text)
    # Kept for a grace period after a rotation, so receivers can switch secrets without losing events.
    previous_secret_encrypted: Mapped[str | None] = mapped_column(Text, default=None)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookDelivery(Base):
    """The outbox: one event for one endpoint, written in the transaction of the change it reports.

    `event_id` is the `webhook-id` header, the same on every attempt; `body` is the exact JSON sent.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_webhook_id_id", "webhook_id", "id"),
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_created_at", "created_at"),  # pruning past the retention
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("whd"))
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(40))
    event_type: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(64), default=None)
    claimed_until: Mapped[datetime | None] = mapped_column(default=None)
    last_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    last_status_code: Mapped[int | None] = mapped_column(default=None)
    last_error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    last_error_message: Mapped[str | None] = mapped_column(String(500), default=None)
    # At most a short excerpt of what the receiver answered; the rest is never stored.
    response_excerpt: Mapped[str | None] = mapped_column(String(256), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
