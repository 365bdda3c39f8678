"""Safe image and archive handling: the one place that decides what counts as a usable image.

Every image the engine or the service touches goes through `open_image`, and every uploaded or local
archive through `extract_zip`, so limits on pixels, ratios and paths are enforced identically everywhere.
"""

from __future__ import annotations

import io
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
ARCHIVE_EXTENSIONS = frozenset({".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar"})
_PIL_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "MPO"})
DEFAULT_MAX_PIXELS = 40_000_000  # ~ a 7,000 x 6,000 photo; larger is almost surely a decompression bomb


class ImageError(ValueError):
    def __init__(self, message: str, *, code: str, filename: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.filename = filename


class ArchiveError(ValueError):
    def __init__(self, message: str, *, code: str, filename: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.filename = filename


@dataclass(frozen=True)
class ArchiveLimits:
    max_files: int = 200_000
    max_total_bytes: int = 20 * 2**30  # uncompressed
    max_ratio: float = 200.0  # uncompressed / compressed, per entry and overall


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def find_images(root: Path) -> list[Path]:
    """Image files under root, recursively, sorted; hidden files and folders (e.g. __MACOSX/._x) skipped."""
    return sorted(
        path
        for path in root.rglob("*")
        if path.is_file()
        and is_image_name(path.name)
        and not any(part.startswith((".", "__MACOSX")) for part in path.relative_to(root).parts)
    )


def open_image(
    source: bytes | Path, *, filename: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode fully into RGB, or raise ImageError with a specific code.

    `draft_size` lets JPEG decode at a reduced scale (much faster for large photos that will be resized).
    """
    name = filename or (source.name if isinstance(source, Path) else None)
    if name is not None and not is_image_name(name):
        raise ImageError(f"{name}: unsupported file type", code="unsupported_format", filename=name)
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(stream) as image:
                if image.format not in _PIL_FORMATS:
                    raise ImageError(
                        f"{name}: unsupported image format {image.format}", code="unsupported_format", filename=name
                    )
                if image.width * image.height > max_pixels:
                    raise ImageError(
                        f"{name}: {image.width}x{image.height} pixels exceeds the limit of {max_pixels}",
                        code="decompression_bomb",
                        filename=name,
                    )
                if draft_size and image.format == "JPEG":
                    image.draft("RGB", (draft_size, draft_size))
                return image.convert("RGB")
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"{name}: {exc}", code="decompression_bomb", filename=name) from exc
        except UnidentifiedImageError as exc:
            raise ImageError(f"{name}: not a readable image", code="unsupported_format", filename=name) from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            message = f"{name}: corrupt or truncated image ({exc})"
            raise ImageError(message, code="corrupt_image", filename=name) from exc


def _safe_member_path(info: zipfile.ZipInfo) -> PurePosixPath:
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"archive entry {info.filename!r} escapes the archive", code="unsafe_archive",
                           filename=info.filename)
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise ArchiveError(f"archive entry {info.filename!r} is a symbolic link", code="unsafe_archive",
                           filename=info.filename)
    return path


def extract_zip(zip_path: Path, dest: Path, *, limits: ArchiveLimits | None = None) -> list[Path]:
    """Extract the images of a zip into dest after checking every entry; returns the image paths.

    Checks happen on the central directory before a byte is written, and sizes are re-counted while
    streaming, because a forged header can understate them.
    """
    limits = limits or ArchiveLimits()
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"not a readable zip archive: {exc}", code="corrupt_archive") from exc
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        images: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        total = compressed = 0
        for info in members:
            path = _safe_member_path(info)
            if any(part.startswith((".", "__MACOSX")) for part in path.parts):
                continue
            if path.suffix.lower() in ARCHIVE_EXTENSIONS:
                raise ArchiveError(f"nested archive {info.filename!r} is not supported", code="nested_archive",
                                   filename=info.filename)
            if not is_image_name(path.name):
                continue
            total += info.file_size
            compressed += info.compress_size
            if info.compress_size and info.file_size / info.compress_size > limits.max_ratio:
                raise ArchiveError(f"entry {info.filename!r} expands {info.file_size / info.compress_size:.0f}x",
                                   code="zip_bomb", filename=info.filename)
            images.append((info, path))
        if not images:
            raise ArchiveError("the archive contains no images", code="empty_archive")
        if len(images) > limits.max_files:
            raise ArchiveError(f"the archive holds {len(images)} images; the limit is {limits.max_files}",
                               code="too_many_files")
        if total > limits.max_total_bytes or (compressed and total / compressed > limits.max_ratio):
            raise ArchiveError("the archive expands beyond the allowed size", code="zip_bomb")

        written: list[Path] = []
        budget = limits.max_total_bytes
        for info, path in images:
            target = dest.joinpath(*path.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as source, target.open("wb") as sink:
                    while chunk := source.read(1 << 20):
                        budget -= len(chunk)
                        if budget < 0:
                            raise ArchiveError("the archive expands beyond the allowed size", code="zip_bomb")
                        sink.write(chunk)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise ArchiveError(f"entry {info.filename!r} is corrupt: {exc}", code="corrupt_archive",
                                   filename=info.filename) from exc
            written.append(target)
        return written
