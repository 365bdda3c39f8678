"""`/models`: the team's adapted models (list, get, delete, artifact download, ONNX export)."""

from __future__ import annotations

import os
import tempfile
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse
from sqlalchemy import select
from starlette.background import BackgroundTask

from app.api.deps import CurrentTeam, ServicesDep, SessionDep
from app.api.pagination import MAX_PAGE_SIZE, newest_first
from app.db.models import Evaluation as EvaluationRow
from app.db.models import Model as ModelRow
from app.db.models import utcnow
from app.errors import ApiError, not_found
from app.schemas import ArtifactFileUrl, ArtifactUrls, Model, ModelList
from app.storage import ObjectStore, download_prefix

router = APIRouter(prefix="/models", tags=["models"])

PRESIGNED_URL_LIFETIME = timedelta(minutes=15)


def owned_model(session: SessionDep, team: CurrentTeam, model_id: str) -> ModelRow:
    row = session.get(ModelRow, model_id)
    if row is None or row.team_id != team.id:
        raise not_found("model", "model_id")
    return row


@router.get("", response_model=ModelList)
def list_models(
    session: SessionDep,
    team: CurrentTeam,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 20,
    after: Annotated[str | None, Query(description="The last id of the previous page.")] = None,
) -> ModelList:
    """The team's models, newest first."""
    query = select(ModelRow).where(ModelRow.team_id == team.id)
    rows, has_more = newest_first(session, query, ModelRow.id, id_prefix="mdl", after=after, limit=limit)
    return ModelList(data=[Model.from_row(row) for row in rows], has_more=has_more)


@router.get("/{model_id}", response_model=Model)
def get_model(session: SessionDep, team: CurrentTeam, model_id: str) -> Model:
    return Model.from_row(owned_model(session, team, model_id))


@router.delete("/{model_id}", status_code=204)
def delete_model(session: SessionDep, team: CurrentTeam, services: ServicesDep, model_id: str) -> Response:
    """Forget the model, then delete its files: a failure in between leaves files, never a dangling row."""
    row = owned_model(session, team, model_id)
    prefix = row.artifact_prefix
    # Its evaluations go with it (foreign key); the images of any not yet scored go too.
    audit_images = session.scalars(select(EvaluationRow.images_key).where(EvaluationRow.model_id == model_id)).all()
    session.delete(row)
    session.commit()
    services.predictors.evict_model(model_id)
    services.store.delete_prefix(prefix)
    for key in audit_images:
        services.store.delete_prefix(key)
    return Response(status_code=204)


@router.get(
    "/{model_id}/artifact",
    response_model=ArtifactUrls,
    responses={200: {"content": {"application/zip": {}}, "description": "The artifact as a zip archive."}},
)
def download_artifact(
    session: SessionDep,
    team: CurrentTeam,
    services: ServicesDep,
    model_id: str,
    presign: Annotated[bool, Query(description="Answer with short-lived S3 URLs instead of the bytes.")] = False,
) -> Response | ArtifactUrls:
    """`model.safetensors` + `metadata.json`, zipped; or presigned URLs when the store is S3."""
    row = owned_model(session, team, model_id)
    store = services.store
    if presign:
        return _presigned(store, row)
    archive = _zip_artifact(store, row, services.settings.staging_dir)
    return FileResponse(
        archive,
        media_type="application/zip",
        filename=f"{row.id}.zip",
        background=BackgroundTask(archive.unlink, missing_ok=True),
    )


def _presigned(store: ObjectStore, row: ModelRow) -> ArtifactUrls:
    objects = store.list(row.artifact_prefix)
    urls = [store.presigned_get_url(info.key, PRESIGNED_URL_LIFETIME) for info in objects]
    if not objects or any(url is None for url in urls):
        raise ApiError(400, "presign_unsupported", "the object store cannot presign URLs; omit presign", "presign")
    return ArtifactUrls(
        model_id=row.id,
        expires_at=utcnow() + PRESIGNED_URL_LIFETIME,
        files=[
            ArtifactFileUrl(name=info.key[len(row.artifact_prefix) :], url=url)
            for info, url in zip(objects, urls, strict=True)
            if url is not None
        ],
    )


def _zip_artifact(store: ObjectStore, row: ModelRow, scratch: Path) -> Path:
    """Stream the artifact's objects into a zip on disk (weights do not compress; stored as is)."""
    scratch.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix="artifact-", suffix=".zip", dir=scratch)
    path = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
            for info in store.list(row.artifact_prefix):
                name = info.key[len(row.artifact_prefix) :]
                with archive.open(f"{row.id}/{name}", "w", force_zip64=True) as member:
                    for chunk in store.stream(info.key):
                        member.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


@router.get(
    "/{model_id}/export",
    response_class=FileResponse,
    responses={200: {"content": {"application/onnx": {}}, "description": "The model as ONNX."}},
)
def export_model(
    session: SessionDep,
    team: CurrentTeam,
    services: ServicesDep,
    model_id: str,
    format: Annotated[Literal["onnx"], Query(description="Only `onnx` for now.")] = "onnx",
) -> FileResponse:
    """The adapted classifier as one ONNX file: uint8 RGB images (batch, size, size, 3) in, class
    probabilities out, class names and preprocessing in its metadata (see README, "Run it elsewhere")."""
    row = owned_model(session, team, model_id)
    session.close()  # the export takes seconds: no pooled connection held meanwhile
    scratch = services.settings.staging_dir
    scratch.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix="export-", suffix=".onnx", dir=scratch)
    path = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle, services.predictors.load_slot():
            handle.write(_onnx_bytes(services.store, row, scratch))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return FileResponse(
        path,
        media_type="application/onnx",
        filename=f"{row.id}.onnx",
        background=BackgroundTask(path.unlink, missing_ok=True),
    )


def _onnx_bytes(store: ObjectStore, row: ModelRow, scratch: Path) -> bytes:
    from must_engine.artifact import load_artifact
    from must_engine.onnx_export import export_onnx

    with tempfile.TemporaryDirectory(prefix="export-", dir=scratch) as directory:
        download_prefix(store, row.artifact_prefix, Path(directory))
        classifier, metadata = load_artifact(Path(directory))
    return export_onnx(classifier, metadata["class_names"], metadata["preprocess"], {**metadata, "model_id": row.id})
