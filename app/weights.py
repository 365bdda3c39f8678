"""Base-model weights from the object store (`ARCH:s3://bucket/key`), fetched once per process host.

The engine has no object-store client; it calls `fetch_weights(uri) -> Path`. `WeightsFetcher` is that
callable for the worker and the zero-shot predictor cache. Weights are cached under
`<data_dir>/weights/<sha256(uri)>/` so a second job (or a restarted worker) does not download them again.

Which buckets may be read is a security decision, not a convenience: the service's own bucket holds every
team's uploads and models, so only its `base-models/` prefix (where operators put weights) is readable
that way; any `MUST_SOURCE_BUCKETS` bucket is readable in full.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path

from app.settings import Settings
from app.storage import InvalidKeyError, ObjectStore, check_source_prefix

WEIGHTS_PREFIX = "base-models/"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


class WeightsUnavailable(Exception):
    """The URI names a bucket or key the service may not read, or the object is missing."""


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key), refusing keys that could escape their prefix."""
    if not uri.startswith("s3://"):
        raise WeightsUnavailable(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key or key.endswith("/"):
        raise WeightsUnavailable(f"{uri!r} is not an s3://bucket/key URI")
    try:
        checked = check_source_prefix(key).rstrip("/")
    except InvalidKeyError as exc:
        raise WeightsUnavailable(f"{uri!r}: {exc}") from exc
    return bucket, checked


def check_weights_uri(uri: str, settings: Settings) -> tuple[str, str]:
    """Raise WeightsUnavailable unless the service may read this object; returns (bucket, key)."""
    bucket, key = split_s3_uri(uri)
    if bucket in settings.source_buckets:
        return bucket, key
    if bucket == settings.s3_bucket and key.startswith(WEIGHTS_PREFIX):
        return bucket, key
    raise WeightsUnavailable(
        f"the service may not read weights from {uri!r}: use its own bucket under {WEIGHTS_PREFIX} "
        "or a bucket in MUST_SOURCE_BUCKETS"
    )


class WeightsFetcher:
    """`fetch_weights` for the engine: download an allowed `s3://` object once, then reuse the file."""

    def __init__(self, store: ObjectStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.cache_dir = settings.data_dir / "weights"
        self._lock = threading.Lock()

    def path_for(self, uri: str) -> Path:
        """Deterministic per URI; the file keeps the key's name (open_clip picks the loader by suffix)."""
        digest = hashlib.sha256(uri.encode()).hexdigest()[:32]
        name = _SAFE_NAME.sub("_", uri.rsplit("/", 1)[-1])[-128:] or "weights"
        return self.cache_dir / digest / name

    def __call__(self, uri: str) -> Path:
        bucket, key = check_weights_uri(uri, self.settings)
        target = self.path_for(uri)
        with self._lock:  # one download per process; the rename below makes concurrent processes safe
            if target.is_file():
                return target
            partial = target.with_name(f".{target.name}.{os.getpid()}.part")
            partial.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.store.for_bucket(bucket).get_file(key, partial)
            except BaseException as exc:
                partial.unlink(missing_ok=True)  # never leave a half-written file, whatever went wrong
                if isinstance(exc, FileNotFoundError):
                    raise WeightsUnavailable(f"{uri} does not exist") from exc
                raise
            os.replace(partial, target)
        return target
