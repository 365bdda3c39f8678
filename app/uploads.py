"""Streaming request bodies: multipart files go straight to a staging directory, never into memory.

Starlette's own form parser keeps files under 1 MiB in memory, so thousands of small images would pile
up in RAM; this parser writes every file part to disk as its bytes arrive and hashes it on the way (the
hashes identify the request for `Idempotency-Key`). Classify bodies, capped at `max_classify_bytes`, are
parsed from memory instead (`parse_multipart_bytes`), off the event loop, with no staging directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Generic, Protocol, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import ApiError, bad_request
from app.request_context import current_request_id

log = logging.getLogger(__name__)

MAX_FIELD_BYTES = 1024 * 1024
MAX_FIELDS = 10_000
_SAFE_SUFFIX = re.compile(r"^\.[a-z0-9]{1,8}$")


@dataclass
class FilePart:
    field: str
    filename: str  # the client's name, for display only; never part of a path or key


@dataclass
class UploadedFile(FilePart):
    path: Path
    sha256: str = ""


@dataclass
class FileInMemory(FilePart):
    """A file part of a body already bounded small (classify): no staging directory, no disk round trip."""

    content: bytes = b""


PartT = TypeVar("PartT", bound=FilePart)
PartCovT = TypeVar("PartCovT", bound=FilePart, covariant=True)


@dataclass
class MultipartForm(Generic[PartT]):
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: list[PartT] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        return self.fields.get(name, [])

    def value(self, name: str) -> str | None:
        """The single value of a field; a field sent twice is ambiguous and rejected."""
        values = self.values(name)
        if len(values) > 1:
            raise bad_request("duplicate_parameter", f"field {name!r} was sent more than once", name)
        return values[0] if values else None

    def files_of(self, name: str) -> list[PartT]:
        return [upload for upload in self.files if upload.field == name]

    def fingerprint(self: MultipartForm[UploadedFile]) -> str:
        """A hash of what was sent (fields and file contents), independent of the multipart boundary."""
        canonical = {
            "fields": sorted((name, values) for name, values in self.fields.items()),
            "files": [(upload.field, upload.filename, upload.sha256) for upload in self.files],
        }
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def display_name(filename: str) -> str:
    """The last path segment of a client filename (some clients send folders)."""
    return PurePosixPath(filename.replace("\\", "/")).name or "upload"


def _staging_name(index: int, filename: str) -> str:
    suffix = PurePosixPath(display_name(filename)).suffix.lower()
    return f"{index:06d}{suffix if _SAFE_SUFFIX.match(suffix) else ''}"


class _DiskFiles:
    """Where the streaming parser puts file parts: a staging file each, hashed as its bytes arrive."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: UploadedFile | None = None
        self._sink: IO[bytes] | None = None
        self._hash: Any = None

    def open(self, field: str, filename: str, index: int) -> UploadedFile:
        path = self.directory / _staging_name(index, filename)
        self._file = UploadedFile(field, display_name(filename), path)
        self._sink = path.open("wb")
        self._hash = hashlib.sha256()
        return self._file

    def write(self, chunk: bytes) -> None:
        assert self._sink is not None
        self._sink.write(chunk)
        self._hash.update(chunk)

    def close(self) -> None:
        if self._file is not None and self._sink is not None:
            self._sink.close()
            self._file.sha256 = self._hash.hexdigest()
        self._file = self._sink = None


class _MemoryFiles:
    """File parts kept in memory, for bodies the size limit already keeps small (classify)."""

    def __init__(self) -> None:
        self._file: FileInMemory | None = None
        self._content = bytearray()

    def open(self, field: str, filename: str, index: int) -> FileInMemory:
        self._file = FileInMemory(field, display_name(filename))
        self._content = bytearray()
        return self._file

    def write(self, chunk: bytes) -> None:
        self._content.extend(chunk)

    def close(self) -> None:
        if self._file is not None:
            self._file.content = bytes(self._content)
        self._file = None


class _FileSink(Protocol[PartCovT]):
    def open(self, field: str, filename: str, index: int) -> PartCovT: ...
    def write(self, chunk: bytes) -> None: ...
    def close(self) -> None: ...


class _PartParser(Generic[PartT]):
    """python-multipart callbacks that route field parts to memory and file parts to `files`."""

    def __init__(self, files: _FileSink[PartT], max_files: int) -> None:
        self.files = files
        self.max_files = max_files
        self.form: MultipartForm[PartT] = MultipartForm()
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._field_name = ""
        self._field_data = bytearray()
        self._in_file = False
        self._field_count = 0

    def on_part_begin(self) -> None:
        self._headers = {}
        self._field_data = bytearray()
        self._in_file = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise bad_request("invalid_multipart", "a multipart part has no field name")
        self._field_name = options[b"name"].decode("utf-8", "replace")
        if b"filename" not in options:
            self._field_count += 1
            if self._field_count > MAX_FIELDS:
                raise bad_request("invalid_multipart", f"more than {MAX_FIELDS} form fields")
            return
        if len(self.form.files) >= self.max_files:
            raise bad_request(
                "too_many_images", f"a request may carry at most {self.max_files} files", self._field_name
            )
        filename = options[b"filename"].decode("utf-8", "replace")
        self.form.files.append(self.files.open(self._field_name, filename, len(self.form.files)))
        self._in_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._in_file:
            self.files.write(chunk)
            return
        if len(self._field_data) + len(chunk) > MAX_FIELD_BYTES:
            raise ApiError(413, "request_too_large", f"field {self._field_name!r} exceeds 1 MiB", self._field_name)
        self._field_data.extend(chunk)

    def on_part_end(self) -> None:
        if self._in_file:
            self.files.close()
            self._in_file = False
            return
        text = self._field_data.decode("utf-8", "replace")
        self.form.fields.setdefault(self._field_name, []).append(text)

    def multipart(self, boundary: bytes) -> MultipartParser:
        callbacks: Any = {name: getattr(self, name) for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
            "on_part_data", "on_part_end",
        )}
        return MultipartParser(boundary, callbacks)

    @contextlib.contextmanager
    def parsing(self) -> Iterator[None]:
        """Malformed bodies become 400 `invalid_multipart`; a file cut off mid-part is closed either way."""
        try:
            yield
        except FormParserError as exc:
            # python-multipart's text names parser internals; the log keeps it.
            log.info("malformed multipart body (request %s): %s", current_request_id(), exc)
            raise bad_request("invalid_multipart", "malformed multipart body") from exc
        finally:
            self.files.close()


def multipart_boundary(request: Request) -> bytes:
    """The boundary of a multipart request, or 400 `invalid_multipart`."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise bad_request("invalid_multipart", "multipart body without a boundary")
    return bytes(boundary)


async def read_multipart(request: Request, directory: Path, *, max_files: int) -> MultipartForm[UploadedFile]:
    """Parse a multipart body, streaming file parts into `directory` (which the caller cleans up)."""
    parser = _PartParser(_DiskFiles(directory), max_files)
    multipart = parser.multipart(multipart_boundary(request))
    with parser.parsing():
        async for chunk in request.stream():
            multipart.write(chunk)
        multipart.finalize()
    return parser.form


def parse_multipart_bytes(body: bytes, boundary: bytes, *, max_files: int) -> MultipartForm[FileInMemory]:
    """Parse a whole multipart body held in memory (blocking: run it off the event loop)."""
    parser = _PartParser(_MemoryFiles(), max_files)
    multipart = parser.multipart(boundary)
    with parser.parsing():
        multipart.write(body)
        multipart.finalize()
    return parser.form


def loads_json(text: str | bytes | bytearray, field: str | None = None) -> Any:
    """`json.loads`, refusing a key repeated in an object (it would keep the last one unseen), as a form
    field sent twice is refused; `field` names the form field the JSON came in, for the error's param."""

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                param = f"{field}.{key}" if field else key
                raise bad_request("duplicate_parameter", f"key {key!r} appears more than once in a JSON object", param)
            result[key] = value
        return result

    return json.loads(text, object_pairs_hook=refuse_duplicates)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 once it passes `max_bytes`."""
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            raise ApiError(413, "request_too_large", f"the request body exceeds {max_bytes} bytes")
    return bytes(body)


async def read_json(request: Request, model: type[BaseModel], max_bytes: int) -> tuple[Any, str]:
    """Parse and validate a JSON body; returns the model and a hash of its canonical form."""
    return parse_json(await read_body(request, max_bytes), model)


def parse_json(body: bytes, model: type[BaseModel]) -> tuple[Any, str]:
    """Validate a JSON body already read (blocking for big bodies: run it off the event loop)."""
    try:
        raw = loads_json(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request("malformed_json", f"the request body is not valid JSON: {exc}") from exc
    try:
        parsed = model.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        # Unknown keys first, as for form fields: a misspelt key also shows up as a missing one.
        first = next((error for error in errors if error["type"] == "extra_forbidden"), errors[0])
        param = ".".join(str(part) for part in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            raise bad_request("unknown_field", f"unknown field {param!r}", param) from exc
        raise bad_request("invalid_request", f"{param}: {first['msg']}" if param else first["msg"], param) from exc
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    return parsed, digest
