"""Accepting an audit: validate the labelled zip completely, store it, insert the row, send the task by name.

The zip gets the same archive and image checks as an adaptation upload (`app.validation`), and its class
folders must be the model's classes, all before anything is written. The worker scores it (worker/
evaluations.py) and deletes the images; audit images never train anything.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from app.db.models import Evaluation, Model, Team, new_id
from app.db.session import transaction
from app.errors import ApiError
from app.queue import enqueue_evaluation
from app.services import Services
from app.settings import Settings
from app.storage import object_key
from app.uploads import MultipartForm, read_multipart
from app.validation import ImageLimits, InputError, NamedImage, check_images, extract_archive, is_zip
from must_engine.audit import unknown_folders

MIN_AUDIT_IMAGES = 2
IMAGES_FILE = "images.zip"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledUpload:
    archive: Path
    n: int


def evaluation_images_key(team_id: str, evaluation_id: str) -> str:
    return object_key("teams", team_id, "evaluations", evaluation_id, IMAGES_FILE)


async def accept_evaluation(request: Request, team: Team, model: Model, services: Services) -> Evaluation:
    settings = services.settings
    settings.staging_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="audit-", dir=settings.staging_dir))
    try:
        (staging / "files").mkdir()
        form = await read_multipart(request, staging / "files", max_files=1)
        upload = await run_in_threadpool(_validate, form, staging, model, settings)
        return await run_in_threadpool(_commit, services, team, model, upload)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def labelled_images(extracted: list[Path], root: Path) -> list[NamedImage]:
    """Each image with its `<class folder>/<name>` path; an image outside a class folder is an error."""
    named = []
    for path in extracted:
        relative = path.relative_to(root)
        if len(relative.parts) < 2:
            raise InputError("missing_class_folder",
                             f"{relative.as_posix()}: images must be inside <class name>/ folders", "images")
        named.append((path, relative.as_posix()))
    return named


def _validate(form: MultipartForm, staging: Path, model: Model, settings: Settings) -> LabelledUpload:
    unknown_fields = sorted((set(form.fields) | {upload.field for upload in form.files}) - {"images"})
    if unknown_fields:
        raise InputError("unknown_field", f"unknown field {unknown_fields[0]!r}", unknown_fields[0])
    uploads = form.files_of("images")
    if len(uploads) != 1 or not is_zip(uploads[0].path):
        raise InputError("missing_field", "images is required: one .zip of <class name>/<image> folders", "images")
    limits = ImageLimits(MIN_AUDIT_IMAGES, settings.max_images, settings.max_extracted_bytes)
    root = staging / "extracted"
    images = labelled_images(extract_archive(uploads[0].path, root, limits), root)
    folders = sorted({Path(name).parts[0] for _, name in images})
    unknown = unknown_folders(folders, model.class_names)
    if unknown:
        raise InputError(
            "unknown_class",
            f"folders {unknown} are not classes of the model (its classes: {model.class_names})",
            "images",
        )
    check_images(images, limits)
    return LabelledUpload(uploads[0].path, len(images))


def _commit(services: Services, team: Team, model: Model, upload: LabelledUpload) -> Evaluation:
    """Object, then row, then message; a failure at any step removes what the earlier ones wrote."""
    evaluation_id = new_id("eva")
    key = evaluation_images_key(team.id, evaluation_id)
    services.store.put_file(key, upload.archive)
    try:
        with transaction(services.session_factory) as session:
            row = Evaluation(id=evaluation_id, team_id=team.id, model_id=model.id, n=upload.n, images_key=key)
            session.add(row)
        enqueue_evaluation(services.celery, evaluation_id)
    except Exception:
        log.exception("could not start evaluation %s; removing it", evaluation_id)
        with transaction(services.session_factory) as session:
            session.execute(delete(Evaluation).where(Evaluation.id == evaluation_id))
        services.store.delete_prefix(key)
        raise ApiError(503, "unavailable", "the evaluation could not be started; retry shortly",
                       headers={"Retry-After": "5"}) from None
    return row
