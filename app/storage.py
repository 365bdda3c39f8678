"""The object store: uploads, training checkpoints and model artifacts.

Two implementations of one small interface: `S3Store` (MinIO or any S3 API, through the `minio` client)
and `LocalStore` (a directory per bucket, the embedded default). Keys are built only by `object_key`
from server-generated ids and fixed names, so a user-supplied name never becomes a path.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlsplit

from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from app.settings import Settings

CHUNK_BYTES = 1024 * 1024
_KEY_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_TEMPORARY_PREFIX = ".tmp-"


class StorageError(Exception):
    """The object store cannot be reached or refused an operation."""


class SourceUnreadable(Exception):
    """A bucket or object the service can no longer read: deleted (NoSuchBucket, NoSuchKey) or its access
    withdrawn (AccessDenied). Not a StorageError: retrying does not bring it back."""

    def __init__(self, bucket: str, code: str) -> None:
        super().__init__(f"cannot read bucket {bucket!r}: {code}")
        self.bucket = bucket
        self.code = code

    @property
    def gone(self) -> bool:
        return self.code != "AccessDenied"


class InvalidKeyError(ValueError):
    """A key or prefix that could escape its namespace (`..`, absolute, control characters)."""


def object_key(*parts: str) -> str:
    """Join safe path segments into a key; every segment is checked, none may be `.`/`..`."""
    for part in parts:
        if not _KEY_PART.match(part) or part in (".", ".."):
            raise InvalidKeyError(f"unsafe object key segment {part!r}")
    return "/".join(parts)


def check_source_prefix(prefix: str) -> str:
    """Validate a client-supplied prefix inside a source bucket; returns it with a trailing slash."""
    if len(prefix) > 1024 or prefix.startswith("/") or "\\" in prefix:
        raise InvalidKeyError("prefix must be a relative path of at most 1024 characters")
    if any(ord(char) < 32 or ord(char) == 127 for char in prefix):
        raise InvalidKeyError("prefix must not contain control characters")
    segments = [segment for segment in prefix.split("/") if segment]
    if any(segment in (".", "..") for segment in segments):
        raise InvalidKeyError("prefix must not contain '.' or '..' segments")
    return "/".join(segments) + "/" if segments else ""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class ObjectStore(Protocol):
    bucket: str

    def for_bucket(self, bucket: str) -> ObjectStore: ...
    def ensure_bucket(self) -> None: ...
    def put_file(self, key: str, path: Path) -> int: ...
    def put_stream(self, key: str, stream: BinaryIO, length: int) -> int: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def stream(self, key: str) -> Iterator[bytes]: ...
    def list(self, prefix: str) -> list[ObjectInfo]: ...
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def presigned_get_url(self, key: str, expires: timedelta) -> str | None: ...
    def ping(self) -> None: ...


def download_prefix(store: ObjectStore, prefix: str, destination: Path) -> list[Path]:
    """Copy every object under prefix into destination, keeping relative paths; returns the files."""
    files: list[Path] = []
    for info in store.list(prefix):
        relative = info.key[len(prefix) :]
        target = destination.joinpath(*check_source_prefix(relative).rstrip("/").split("/"))
        store.get_file(info.key, target)
        files.append(target)
    return files


def upload_directory(store: ObjectStore, directory: Path, prefix: str) -> int:
    """Upload the files directly inside directory under prefix; returns the bytes written."""
    return sum(
        store.put_file(object_key(*prefix.rstrip("/").split("/"), path.name), path)
        for path in sorted(directory.iterdir())
        if path.is_file()
    )


class LocalStore:
    """Objects as files under `root/<bucket>/<key>`, written atomically (temporary file + rename)."""

    def __init__(self, root: Path, bucket: str) -> None:
        self.root = root
        self.bucket = bucket
        self.bucket_dir = root / bucket

    def for_bucket(self, bucket: str) -> LocalStore:
        return LocalStore(self.root, object_key(bucket))

    def ensure_bucket(self) -> None:
        self.bucket_dir.mkdir(parents=True, exist_ok=True)

    def ping(self) -> None:
        if not self.bucket_dir.is_dir():
            raise StorageError(f"object store directory {self.bucket_dir} is missing")

    def _path(self, key: str) -> Path:
        path = (self.bucket_dir / key).resolve()
        if not path.is_relative_to(self.bucket_dir.resolve()) or key.endswith("/"):
            raise InvalidKeyError(f"key {key!r} escapes the bucket")
        return path

    def put_stream(self, key: str, stream: BinaryIO, length: int) -> int:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=_TEMPORARY_PREFIX)
        try:
            with os.fdopen(handle, "wb") as sink:
                shutil.copyfileobj(stream, sink, CHUNK_BYTES)
                written = sink.tell()
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return written

    def put_file(self, key: str, path: Path) -> int:
        with path.open("rb") as source:
            return self.put_stream(key, source, path.stat().st_size)

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise FileNotFoundError(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def stream(self, key: str) -> Iterator[bytes]:
        with self._path(key).open("rb") as source:
            while chunk := source.read(CHUNK_BYTES):
                yield chunk

    def list(self, prefix: str) -> list[ObjectInfo]:
        directory = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.bucket_dir
        if not directory.is_dir():
            return []
        found = []
        for path in directory.rglob("*"):
            if path.is_file() and not path.name.startswith(_TEMPORARY_PREFIX):
                key = path.relative_to(self.bucket_dir).as_posix()
                if key.startswith(prefix):
                    found.append(ObjectInfo(key, path.stat().st_size))
        return sorted(found, key=lambda info: info.key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> int:
        objects = self.list(prefix)
        for info in objects:
            self._path(info.key).unlink(missing_ok=True)
        if prefix.endswith("/"):
            directory = self._path(prefix.rstrip("/"))
            if directory.is_dir():
                shutil.rmtree(directory, ignore_errors=True)
        return len(objects)

    def presigned_get_url(self, key: str, expires: timedelta) -> str | None:
        return None


_UNREADABLE = ("NoSuchBucket", "NoSuchKey", "AccessDenied")


@contextmanager
def _reading(bucket: str) -> Iterator[None]:
    """S3's answers that a bucket or object cannot be read, as SourceUnreadable; other errors unchanged."""
    try:
        yield
    except S3Error as exc:
        if exc.code in _UNREADABLE:
            raise SourceUnreadable(bucket, exc.code) from exc
        raise


class S3Store:
    """MinIO / S3 through the `minio` client; errors surface as StorageError, or SourceUnreadable when reading."""

    def __init__(self, client: Minio, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    def for_bucket(self, bucket: str) -> S3Store:
        return S3Store(self.client, bucket)

    def ensure_bucket(self) -> None:
        try:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StorageError(str(exc)) from exc

    def ping(self) -> None:
        try:
            self.client.bucket_exists(self.bucket)
        except Exception as exc:  # urllib3 connection errors as well as S3 errors
            raise StorageError(f"object store unreachable: {exc}") from exc

    def put_stream(self, key: str, stream: BinaryIO, length: int) -> int:
        self.client.put_object(self.bucket, key, stream, length=length, part_size=16 * CHUNK_BYTES)
        return length

    def put_file(self, key: str, path: Path) -> int:
        self.client.fput_object(self.bucket, key, str(path))
        return path.stat().st_size

    def get_file(self, key: str, path: Path) -> None:
        try:
            with _reading(self.bucket):
                self.client.fget_object(self.bucket, key, str(path))
        except SourceUnreadable as exc:
            if exc.code == "NoSuchKey":
                raise FileNotFoundError(key) from exc
            raise

    def stream(self, key: str) -> Iterator[bytes]:
        with _reading(self.bucket):
            response = self.client.get_object(self.bucket, key)
        try:
            yield from response.stream(CHUNK_BYTES)
        finally:
            response.close()
            response.release_conn()

    def list(self, prefix: str) -> list[ObjectInfo]:
        with _reading(self.bucket):
            return [
                ObjectInfo(item.object_name, item.size or 0)
                for item in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
                if item.object_name is not None and not item.is_dir
            ]

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise
        return True

    def delete_prefix(self, prefix: str) -> int:
        keys = [info.key for info in self.list(prefix)]
        errors = list(self.client.remove_objects(self.bucket, (DeleteObject(key) for key in keys)))
        if errors:
            raise StorageError(f"could not delete {len(errors)} objects under {prefix}: {errors[0]}")
        return len(keys)

    def presigned_get_url(self, key: str, expires: timedelta) -> str | None:
        return self.client.presigned_get_object(self.bucket, key, expires=expires)


def s3_client(settings: Settings) -> Minio:
    """A minio client; the endpoint may be `host:port` or a URL whose scheme decides TLS."""
    endpoint, secure = settings.s3_endpoint, settings.s3_secure
    if "://" in endpoint:
        parts = urlsplit(endpoint)
        endpoint, secure = parts.netloc, parts.scheme == "https"
    return Minio(
        endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value(),
        secure=secure,
        region=settings.s3_region,
    )


def create_store(settings: Settings) -> ObjectStore:
    if settings.uses_s3:
        return S3Store(s3_client(settings), settings.s3_bucket)
    return LocalStore(settings.objects_dir, settings.s3_bucket)
