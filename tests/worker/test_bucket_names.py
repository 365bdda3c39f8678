"""Bucket images are named as the team knows them, and names never collide."""

from __future__ import annotations

import zipfile
from pathlib import Path

from app.validation import ImageLimits, images_in_directory
from worker.evidence import bucket_names


def _zip(path: Path, members: list[str], image: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for member in members:
            archive.writestr(member, image)


def _names(root: Path) -> list[str]:
    downloaded, extracted = root / "source", root / "extracted"
    images = images_in_directory(downloaded, extracted, ImageLimits(1, 100, 10**8))
    named = bucket_names([path for path, _ in images], downloaded, extracted)
    assert [path for path, _ in named] == [path for path, _ in images]
    return sorted(name for _, name in named)


def test_an_uploaded_zip_names_images_by_their_path_in_it(tmp_path: Path, dtd_images) -> None:
    image = dtd_images.paths(1)[0].read_bytes()
    _zip(tmp_path / "source" / "images.zip", ["cat/1.jpg", "dog/1.jpg", "2.jpg"], image)
    assert _names(tmp_path) == ["2.jpg", "cat/1.jpg", "dog/1.jpg"]


def test_a_source_prefix_names_files_by_key_and_members_by_zip_and_path(tmp_path: Path, dtd_images) -> None:
    image = dtd_images.paths(1)[0].read_bytes()
    (tmp_path / "source" / "cat").mkdir(parents=True)
    (tmp_path / "source" / "cat" / "1.jpg").write_bytes(image)
    _zip(tmp_path / "source" / "more" / "a.zip", ["cat/1.jpg"], image)
    _zip(tmp_path / "source" / "b.zip", ["cat/1.jpg"], image)
    assert _names(tmp_path) == ["b.zip/cat/1.jpg", "cat/1.jpg", "more/a.zip/cat/1.jpg"]
