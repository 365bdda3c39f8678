"""Thumbnails of a bucket's images for the dashboard's gallery.

A bucket prediction names its image as the worker did (worker/evidence.py `bucket_names`): its key under
the adaptation's source prefix, or its path inside a zip there (`<zip key>/<member>`, or just `<member>`
when the prefix holds one zip and nothing else). A zip is copied to local disk once and reused, since a
gallery page asks for dozens of its members; only the few most recently used copies are kept.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
import zipfile
from collections import defaultdict
from pathlib import Path

from PIL import Image

from app.storage import InvalidKeyError, ObjectStore, SourceUnreadable, check_source_prefix
from must_engine import open_image

THUMBNAIL_SIZES = (64, 128, 256)
KEPT_ZIPS = 4
_MAX_SOURCE_BYTES = 64 * 1024 * 1024  # a loose image bigger than this is not thumbnailed


class ImageNotFound(LookupError):
    """No image of that name in the adaptation's source; `reason` says why when it is not just the name."""

    def __init__(self, name: str, reason: str = "") -> None:
        super().__init__(name)
        self.reason = reason


class GalleryImages:
    """Find an image of an adaptation's source and shrink it to a JPEG thumbnail."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    def thumbnail(self, store: ObjectStore, prefix: str, name: str, size: int, cache_id: str) -> bytes:
        """Raises ImageNotFound, or SourceUnreadable when the team withdrew the service's access to its bucket."""
        try:
            data = self._image_bytes(store, prefix, name, cache_id)
        except SourceUnreadable as exc:
            if not exc.gone:
                raise
            # deleted after the adaptation read it: that image is not there any more, not a fault of the service
            raise ImageNotFound(name, f"bucket {store.bucket!r} or the image was deleted since") from exc
        image = open_image(data, filename=name.rsplit("/", 1)[-1])
        image.thumbnail((size, size), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        return out.getvalue()

    def _image_bytes(self, store: ObjectStore, prefix: str, name: str, cache_id: str) -> bytes:
        try:
            relative = check_source_prefix(name).rstrip("/")
        except InvalidKeyError as exc:
            raise ImageNotFound(name) from exc
        if not relative:
            raise ImageNotFound(name)
        if not relative.lower().endswith(".zip"):  # a loose image: listed by its own key, not the whole prefix
            for info in store.list(prefix + relative):
                if info.key == prefix + relative:
                    if info.size > _MAX_SOURCE_BYTES:
                        raise ImageNotFound(name)
                    return b"".join(store.stream(info.key))
        objects = {info.key[len(prefix) :]: info for info in store.list(prefix)}
        zips = sorted(key for key in objects if key.lower().endswith(".zip"))
        for key in zips:
            if relative.startswith(key + "/"):
                return self._member(store, prefix + key, relative[len(key) + 1 :], cache_id, name)
        if len(zips) == 1 and len(objects) == 1:
            return self._member(store, prefix + zips[0], relative, cache_id, name)
        raise ImageNotFound(name)

    def _member(self, store: ObjectStore, key: str, member: str, cache_id: str, name: str) -> bytes:
        try:
            opened = zipfile.ZipFile(self._local_copy(store, key, cache_id))
        except FileNotFoundError:  # pruned by another request between download and open: fetch again
            opened = zipfile.ZipFile(self._local_copy(store, key, cache_id))
        with opened:
            try:
                info = opened.getinfo(member)
            except KeyError as exc:
                raise ImageNotFound(name) from exc
            if info.file_size > _MAX_SOURCE_BYTES:
                raise ImageNotFound(name)
            return opened.read(info)

    def _local_copy(self, store: ObjectStore, key: str, cache_id: str) -> Path:
        """The zip on local disk, downloaded once per process (concurrent requests wait for the first)."""
        path = self.cache_dir / f"{cache_id}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.zip"
        with self._locks[str(path)]:
            if path.is_file():
                os.utime(path)
                return path
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(prefix=".tmp-", dir=self.cache_dir)
            try:
                with os.fdopen(descriptor, "wb") as handle:
                    for chunk in store.stream(key):
                        handle.write(chunk)
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        self._prune(keep=path)
        return path

    def _prune(self, keep: Path) -> None:
        copies = sorted(self.cache_dir.glob("*.zip"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in [p for p in copies if p != keep][KEPT_ZIPS - 1 :]:
            old.unlink(missing_ok=True)

