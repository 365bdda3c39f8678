"""Input validation shared by the API (before anything is written) and the worker (`validating` stage).

Each check raises `InputError` with a specific code; the API answers it as a 400, the worker records it
as the job's error. Image and archive safety is the engine's (`open_image`, `extract_zip`), so the
service and the `must` CLI accept exactly the same files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.base_model_policy import BaseModelRefused, check_policy
from app.request_context import current_request_id
from app.settings import Settings
from must_engine import (
    ArchiveError,
    ArchiveLimits,
    BaseModelError,
    ConfigError,
    ImageError,
    MustConfig,
    check_base_model,
    extract_zip,
    find_images,
    open_image,
    resolve_job_config,
)
from must_engine import normalize_class_names as engine_normalize_class_names
from must_engine.images import is_image_name

log = logging.getLogger(__name__)

ZIP_MAGIC = b"PK\x03\x04"


class InputError(ValueError):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


@dataclass(frozen=True)
class ImageLimits:
    min_images: int
    max_images: int
    max_extracted_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(settings.min_images, settings.max_images, settings.max_extracted_bytes)


def normalize_class_names(raw: Any, settings: Settings) -> list[str]:
    """Collapse whitespace; reject empty, overlong, duplicate (ignoring case) and too many/few names."""
    if not isinstance(raw, list) or not all(isinstance(name, str) for name in raw):
        raise InputError("invalid_class_names", "class_names must be an array of strings", "class_names")
    if len(raw) > settings.max_class_names:
        raise InputError(
            "too_many_class_names", f"at most {settings.max_class_names} class names are allowed", "class_names"
        )
    try:
        names = engine_normalize_class_names(raw)
    except ConfigError as exc:
        raise InputError(exc.code, str(exc), exc.field) from exc
    for index, name in enumerate(names):
        if len(name) > settings.max_class_name_length:
            raise InputError(
                "class_name_too_long",
                f"class name {index} is longer than {settings.max_class_name_length} characters",
                f"class_names.{index}",
            )
    return names


def class_names_from_form(values: list[str], settings: Settings) -> list[str]:
    """Multipart `class_names`: one JSON array, or the field repeated once per name."""
    if not values:
        raise InputError("missing_field", "class_names is required", "class_names")
    if len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            parsed = json.loads(values[0])
        except ValueError as exc:
            raise InputError("malformed_json", f"class_names is not valid JSON: {exc}", "class_names") from exc
        return normalize_class_names(parsed, settings)
    return normalize_class_names(values, settings)


def check_metadata(metadata: Any, settings: Settings) -> dict[str, Any]:
    if not isinstance(metadata, dict):
        raise InputError("invalid_request", "metadata must be a JSON object", "metadata")
    if len(json.dumps(metadata)) > settings.max_metadata_bytes:
        raise InputError(
            "metadata_too_large", f"metadata is limited to {settings.max_metadata_bytes} bytes", "metadata"
        )
    return metadata


def check_base_model_spec(spec: str, settings: Settings) -> str:
    """The deployment's policy first (nothing on disk is touched for a refused spec), then the engine's parse.

    Returns the spec to store and load: local weights by their real path.
    """
    try:
        checked = check_policy(spec, settings)
    except BaseModelRefused as exc:
        raise InputError(exc.code, exc.message, "base_model") from exc
    try:
        check_base_model(checked)
    except BaseModelError as exc:
        raise engine_input_error(exc, "base_model") from exc
    return checked


# Our words for engine errors that wrap a third-party exception (PIL, zipfile, torch, open_clip, botocore):
# their text can quote server paths or library internals, so it goes to the log, never to the team.
_PUBLIC_MESSAGES = {
    "corrupt_image": "corrupt or truncated image",
    "decompression_bomb": "the image has more pixels than allowed",
    "unsupported_format": "not a readable image",
    "corrupt_archive": "the archive is corrupt or not a zip file",
    "weights_unavailable": "the weights of this base model could not be loaded",
    "unknown_base_model": "the configuration of this base model could not be read",
}


def engine_input_error(
    exc: BaseModelError | ImageError | ArchiveError, param: str, *, where: str | None = None
) -> InputError:
    """The InputError for an engine error; if it wraps another library's exception, with our own message.

    The original is logged with `where` it happened (by default the request id, which the message then
    quotes so the operator can find the log line).
    """
    if exc.__cause__ is None:
        return InputError(exc.code, str(exc), param)
    request_id = current_request_id()
    log.warning("%s in %s: %s", exc.code, where or f"request {request_id}", exc)
    message = _PUBLIC_MESSAGES.get(exc.code, "the input could not be processed")
    filename = getattr(exc, "filename", None)
    if filename:
        message = f"{filename}: {message}"
    if request_id:
        message = f"{message} (request id {request_id})"
    return InputError(exc.code, message, param)


def resolve_config(
    config_request: dict[str, Any], *, num_images: int, class_names: list[str], base_model: str
) -> MustConfig:
    """`{"preset": name, ...overrides}` -> the engine's validated config for this job."""
    overrides = dict(config_request)
    preset = overrides.pop("preset", "auto")
    if not isinstance(preset, str):
        raise InputError("unknown_preset", "config.preset must be a string", "config.preset")
    try:
        return resolve_job_config(
            preset, overrides, num_images=num_images, num_classes=len(class_names), base_model=base_model,
            class_names=class_names,
        )
    except ConfigError as exc:
        param = f"config.{exc.field}" if exc.field else "config"
        raise InputError(exc.code, str(exc), param) from exc
    except BaseModelError as exc:
        raise engine_input_error(exc, "base_model") from exc


def is_zip(path: Path) -> bool:
    if path.suffix.lower() == ".zip":
        return True
    with path.open("rb") as handle:
        return handle.read(4) == ZIP_MAGIC


def extract_archive(archive: Path, destination: Path, limits: ImageLimits) -> list[Path]:
    archive_limits = ArchiveLimits(max_files=limits.max_images, max_total_bytes=limits.max_extracted_bytes)
    try:
        return extract_zip(archive, destination, limits=archive_limits)
    except ArchiveError as exc:
        if exc.code == "too_many_files":
            raise InputError("too_many_images", str(exc), "images") from exc
        raise engine_input_error(exc, "images") from exc


NamedImage = tuple[Path, str]  # a file on disk and the name its owner knows it by


def images_in_upload(files: list[NamedImage], scratch: Path, limits: ImageLimits) -> list[NamedImage]:
    """The images of an upload: one zip (extracted into scratch), or image files."""
    if not files:
        raise InputError("missing_field", "images is required: one .zip or one or more image files", "images")
    if len(files) == 1 and is_zip(files[0][0]):
        return [(path, path.name) for path in extract_archive(files[0][0], scratch, limits)]
    for path, name in files:
        if is_zip(path):
            raise InputError("nested_archive", f"{name}: send one .zip on its own, or only image files", "images")
        if not is_image_name(name):
            raise InputError("unsupported_format", f"{name}: not a supported image type", "images")
    return files


def images_in_directory(directory: Path, scratch: Path, limits: ImageLimits) -> list[NamedImage]:
    """Images under a downloaded source prefix; zips found there are extracted (each checked)."""
    extracted: list[Path] = []
    archives = sorted(path for path in directory.rglob("*") if path.is_file() and path.suffix.lower() == ".zip")
    for index, archive in enumerate(archives):
        extracted += extract_archive(archive, scratch / f"archive-{index}", limits)
    return [(path, path.relative_to(directory).as_posix()) for path in find_images(directory)] + [
        (path, path.name) for path in extracted
    ]


def check_images(images: list[NamedImage], limits: ImageLimits) -> None:
    """Count, then fully decode every image (corrupt, truncated, unsupported, decompression bombs)."""
    if len(images) < limits.min_images:
        raise InputError("too_few_images", f"{len(images)} images; at least {limits.min_images} are needed", "images")
    if len(images) > limits.max_images:
        raise InputError("too_many_images", f"{len(images)} images; at most {limits.max_images} are allowed", "images")
    for path, name in images:
        try:
            open_image(path, filename=name).close()
        except ImageError as exc:
            raise engine_input_error(exc, "images") from exc
