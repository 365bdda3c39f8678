"""Accepting a new adaptation: validate everything, store the images, insert the job row, enqueue it.

The order is what keeps bad requests from leaving traces: the upload is staged on local disk and fully
validated first; objects are written only for a valid request, and deleted again if the row cannot be
inserted. The message is sent after the commit; if the broker is down the sweeper sends it later.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from app.db.jobs import add_status_event
from app.db.models import ACTIVE_STATUSES, Adaptation, AdaptationStatus, PendingUpload, Team, new_id, utcnow
from app.db.session import transaction
from app.errors import ApiError
from app.queue import enqueue_adaptation
from app.schemas import AdaptationFromSource
from app.services import Services
from app.settings import Settings
from app.storage import InvalidKeyError, check_source_prefix, object_key
from app.uploads import MultipartForm, UploadedFile, loads_json, read_json, read_multipart
from app.validation import (
    ImageLimits,
    InputError,
    check_base_model_spec,
    check_images,
    check_metadata,
    class_names_from_form,
    images_in_upload,
    is_zip,
    normalize_class_names,
    resolve_config,
)
from must_engine import DEFAULT_BASE_MODEL

log = logging.getLogger(__name__)

MULTIPART_FIELDS = {"class_names", "images", "base_model", "config", "metadata"}
UPLOAD_ZIP_NAME = "images.zip"


@dataclass
class Draft:
    """A validated request, ready to become a row (and, for uploads, objects)."""

    fingerprint: str
    class_names: list[str]
    base_model: str
    config_request: dict[str, Any]
    metadata: dict[str, Any]
    config: dict[str, Any] | None = None
    num_images: int | None = None
    source_bucket: str | None = None  # None: the upload prefix in the service bucket
    source_prefix: str = ""
    # (staged file, object name under the upload prefix)
    files: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class Accepted:
    adaptation: Adaptation
    replayed: bool


async def accept_upload(request: Request, team: Team, services: Services, idempotency_key: str | None) -> Accepted:
    settings = services.settings
    settings.staging_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="upload-", dir=settings.staging_dir))
    try:
        (staging / "files").mkdir()
        form = await read_multipart(request, staging / "files", max_files=settings.max_images)
        fingerprint = form.fingerprint()
        if idempotency_key:
            replay = await run_in_threadpool(_find_replay, services, team.id, idempotency_key, fingerprint)
            if replay is not None:
                return Accepted(replay, replayed=True)
        draft = await run_in_threadpool(_validate_upload, form, fingerprint, staging, settings)
        return await run_in_threadpool(_commit, services, team, draft, idempotency_key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


async def accept_source(request: Request, team: Team, services: Services, idempotency_key: str | None) -> Accepted:
    settings = services.settings
    body, fingerprint = await read_json(request, AdaptationFromSource, settings.max_json_bytes)
    if idempotency_key:
        replay = await run_in_threadpool(_find_replay, services, team.id, idempotency_key, fingerprint)
        if replay is not None:
            return Accepted(replay, replayed=True)
    draft = await run_in_threadpool(_validate_source, body, fingerprint, settings)
    return await run_in_threadpool(_commit, services, team, draft, idempotency_key)


def _validate_upload(form: MultipartForm, fingerprint: str, staging: Path, settings: Settings) -> Draft:
    unknown = sorted((set(form.fields) | {upload.field for upload in form.files}) - MULTIPART_FIELDS)
    if unknown:
        raise InputError("unknown_field", f"unknown field {unknown[0]!r}", unknown[0])
    names = class_names_from_form(form.values("class_names"), settings)
    base_model = check_base_model_spec(form.value("base_model") or DEFAULT_BASE_MODEL, settings)
    config_request = _json_field(form, "config")
    metadata = check_metadata(_json_field(form, "metadata"), settings)
    uploads = form.files_of("images")
    limits = ImageLimits.from_settings(settings)
    images = images_in_upload([(upload.path, upload.filename) for upload in uploads], staging / "extracted", limits)
    check_images(images, limits)
    config = resolve_config(config_request, num_images=len(images), class_names=names, base_model=base_model)
    return Draft(
        fingerprint=fingerprint,
        class_names=names,
        base_model=base_model,
        config_request=config_request,
        metadata=metadata,
        config=config.to_dict(),
        num_images=len(images),
        files=_upload_objects(uploads),
    )


def _upload_objects(uploads: list[UploadedFile]) -> list[tuple[Path, str]]:
    """Object names never come from client filenames: the zip, or each image by its staged index."""
    if len(uploads) == 1 and is_zip(uploads[0].path):
        return [(uploads[0].path, UPLOAD_ZIP_NAME)]
    return [(upload.path, upload.path.name) for upload in uploads]


def _json_field(form: MultipartForm, name: str) -> dict[str, Any]:
    text = form.value(name)
    if text is None or not text.strip():
        return {}
    try:
        value = loads_json(text, name)
    except ValueError as exc:
        raise InputError("malformed_json", f"{name} is not valid JSON: {exc}", name) from exc
    if not isinstance(value, dict):
        raise InputError("invalid_request", f"{name} must be a JSON object", name)
    return value


def _validate_source(body: AdaptationFromSource, fingerprint: str, settings: Settings) -> Draft:
    names = normalize_class_names(body.class_names, settings)
    base_model = check_base_model_spec(body.base_model or DEFAULT_BASE_MODEL, settings)
    metadata = check_metadata(body.metadata, settings)
    if body.source.bucket not in settings.source_buckets:
        raise InputError(
            "source_not_allowed",
            f"bucket {body.source.bucket!r} is not one the service may read (MUST_SOURCE_BUCKETS)",
            "source.bucket",
        )
    try:
        prefix = check_source_prefix(body.source.prefix)
    except InvalidKeyError as exc:
        raise InputError("invalid_source", str(exc), "source.prefix") from exc
    # The image count is known only once the worker lists the bucket; checking the config against the
    # largest allowed count still catches unknown presets and out-of-range overrides now.
    resolve_config(body.config, num_images=settings.max_images, class_names=names, base_model=base_model)
    return Draft(
        fingerprint=fingerprint,
        class_names=names,
        base_model=base_model,
        config_request=body.config,
        metadata=metadata,
        source_bucket=body.source.bucket,
        source_prefix=prefix,
    )


def _find_replay(services: Services, team_id: str, key: str, fingerprint: str) -> Adaptation | None:
    with services.session_factory() as session:
        return _replay_of(session, team_id, key, fingerprint)


def _replay_of(session: Session, team_id: str, key: str, fingerprint: str) -> Adaptation | None:
    """The adaptation an earlier request with this key created; 409 when that request was different."""
    existing = session.scalar(
        select(Adaptation).where(Adaptation.team_id == team_id, Adaptation.idempotency_key == key)
    )
    if existing is not None and existing.request_sha256 != fingerprint:
        raise ApiError(
            409,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request body",
            "Idempotency-Key",
        )
    return existing


def _commit(services: Services, team: Team, draft: Draft, idempotency_key: str | None) -> Accepted:
    settings, store = services.settings, services.store
    adaptation_id = new_id("ada")
    upload_prefix = object_key("teams", team.id, "adaptations", adaptation_id, "upload") + "/"
    if draft.files:
        with transaction(services.session_factory) as session:
            session.add(PendingUpload(prefix=upload_prefix))
    try:
        upload_bytes = sum(store.put_file(upload_prefix + name, path) for path, name in draft.files)
        with transaction(services.session_factory) as session:
            _check_active_jobs(session, team.id, settings.max_active_jobs_per_team)
            row = Adaptation(
                id=adaptation_id,
                team_id=team.id,
                idempotency_key=idempotency_key,
                request_sha256=draft.fingerprint,
                class_names=draft.class_names,
                base_model=draft.base_model,
                config_request=draft.config_request,
                config=draft.config,
                user_metadata=draft.metadata,
                source_bucket=draft.source_bucket or store.bucket,
                source_prefix=draft.source_prefix if draft.source_bucket else upload_prefix,
                num_images=draft.num_images,
                upload_bytes=upload_bytes,
                requeue_at=utcnow() + timedelta(seconds=settings.requeue_after_seconds),
            )
            session.add(row)
            session.flush()
            add_status_event(session, adaptation_id, AdaptationStatus.QUEUED, "accepted")
            session.execute(delete(PendingUpload).where(PendingUpload.prefix == upload_prefix))
    except BaseException as exc:
        if draft.files:
            try:
                discard_upload(services, upload_prefix)
            except Exception:
                log.exception("could not discard %s now; the sweeper will", upload_prefix)
        if isinstance(exc, IntegrityError) and idempotency_key:
            # Another request with the same key committed first.
            with services.session_factory() as session:
                replay = _replay_of(session, team.id, idempotency_key, draft.fingerprint)
            if replay is not None:
                return Accepted(replay, replayed=True)
        raise
    services.metrics.adaptations_created.inc()
    try:
        enqueue_adaptation(services.celery, adaptation_id)
    except Exception:
        log.exception("could not enqueue %s; the sweeper will send it", adaptation_id)
    return Accepted(row, replayed=False)


def discard_upload(services: Services, prefix: str) -> None:
    """Delete the objects of an upload that will not become an adaptation, then forget it."""
    services.store.delete_prefix(prefix)
    with transaction(services.session_factory) as session:
        session.execute(delete(PendingUpload).where(PendingUpload.prefix == prefix))


def _check_active_jobs(session: Session, team_id: str, limit: int) -> None:
    # Locking the team row serialises concurrent creations of one team on PostgreSQL.
    session.execute(select(Team.id).where(Team.id == team_id).with_for_update())
    active = session.scalar(
        select(func.count())
        .select_from(Adaptation)
        .where(Adaptation.team_id == team_id, Adaptation.status.in_(ACTIVE_STATUSES))
    )
    if (active or 0) >= limit:
        raise ApiError(
            429,
            "too_many_active_jobs",
            f"the team already has {active} adaptations queued or running (limit {limit})",
            headers={"Retry-After": "60"},
        )
