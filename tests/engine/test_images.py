"""Image decoding and archive extraction refuse everything unsafe, with a specific code."""

import io
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from must_engine.images import ArchiveError, ArchiveLimits, ImageError, extract_zip, find_images, open_image


def png_bytes(size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def noisy_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


def write_zip(path: Path, entries: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return path


def test_open_image_decodes_to_rgb() -> None:
    image = open_image(png_bytes(), filename="a.png")
    assert image.mode == "RGB" and image.size == (8, 8)


@pytest.mark.parametrize(
    ("data", "name", "code"),
    [
        (noisy_jpeg()[: len(noisy_jpeg()) // 2], "truncated.jpg", "corrupt_image"),
        (b"this is text, not an image", "fake.jpg", "unsupported_format"),
        (png_bytes(), "notes.txt", "unsupported_format"),
    ],
)
def test_bad_images_have_specific_codes(data: bytes, name: str, code: str) -> None:
    with pytest.raises(ImageError) as error:
        open_image(data, filename=name)
    assert error.value.code == code


def test_decompression_bomb_is_refused_before_decoding() -> None:
    with pytest.raises(ImageError) as error:
        open_image(png_bytes((5000, 5000)), filename="bomb.png", max_pixels=1_000_000)
    assert error.value.code == "decompression_bomb"


def test_zip_extracts_images_recursively_and_skips_junk(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "a.zip", {
        "cats/1.png": png_bytes(), "dogs/deep/2.PNG": png_bytes(), "readme.txt": b"hi",
        "__MACOSX/._1.png": b"junk", ".hidden.png": png_bytes(),
    })
    written = extract_zip(archive, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == ["cats/1.png", "dogs/deep/2.PNG"]
    assert find_images(tmp_path / "out") == sorted(written)


@pytest.mark.parametrize(
    ("entries", "symlink", "code"),
    [
        ({"../evil.png": png_bytes()}, None, "unsafe_archive"),
        ({"/abs/evil.png": png_bytes()}, None, "unsafe_archive"),
        ({"ok.png": png_bytes()}, "link.png", "unsafe_archive"),
        ({"inner.zip": b"PK"}, None, "nested_archive"),
        ({"readme.txt": b"no images"}, None, "empty_archive"),
        ({"bomb.png": b"\0" * 5_000_000}, None, "zip_bomb"),
    ],
)
def test_unsafe_archives_are_refused_and_nothing_is_written(
    tmp_path: Path, entries: dict, symlink: str | None, code: str
) -> None:
    archive = write_zip(tmp_path / "a.zip", entries, symlink)
    with pytest.raises(ArchiveError) as error:
        extract_zip(archive, tmp_path / "out")
    assert error.value.code == code
    assert not (tmp_path / "out").exists()
    assert not (tmp_path.parent / "evil.png").exists()


def test_too_many_files_and_corrupt_archives(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "a.zip", {f"{i}.png": png_bytes() for i in range(5)})
    with pytest.raises(ArchiveError) as error:
        extract_zip(archive, tmp_path / "out", limits=ArchiveLimits(max_files=4))
    assert error.value.code == "too_many_files"
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ArchiveError) as error:
        extract_zip(tmp_path / "broken.zip", tmp_path / "out2")
    assert error.value.code == "corrupt_archive"
