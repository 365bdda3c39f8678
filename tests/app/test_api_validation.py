"""Bad input answers 4xx with a specific code, and leaves no row, no object and no staged file behind."""

from __future__ import annotations

import io
import json
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Adaptation
from app.settings import Settings
from app.storage import ObjectStore

Files = list[tuple[str, tuple[str, bytes, str]]]


def _zip(entries: dict[str, bytes], *, symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def _real_images(dtd_images, count: int) -> dict[str, bytes]:
    return {f"img/{path.name}": path.read_bytes() for path in dtd_images.paths(count)}


def _as_zip(data: bytes) -> Files:
    return [("images", ("upload.zip", data, "application/zip"))]


def _staged(settings: Settings) -> set[Path]:
    """What is in the shared staging folder now (compared before and after one request, not with empty)."""
    return set(settings.staging_dir.iterdir()) if settings.staging_dir.exists() else set()


@pytest.fixture
def assert_rejected(
    client: TestClient,
    store: ObjectStore,
    session_factory: sessionmaker[Session],
    service_settings: Settings,
    base_model: str,
) -> Callable[..., dict]:
    def check(team, files: Files, *, status: int = 400, code: str, via: TestClient | None = None, **fields):
        data = {"class_names": json.dumps(["banded", "blotchy"]), "base_model": base_model, **fields}
        staged_before = _staged(service_settings)
        response = (via or client).post("/adaptations", headers=team.headers, data=data, files=files)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code, error
        assert error["message"]
        with session_factory() as session:
            rows = session.scalar(select(func.count()).select_from(Adaptation).where(Adaptation.team_id == team.id))
        assert rows == 0, "a rejected request created an adaptation"
        assert store.list(f"teams/{team.id}/") == [], "a rejected request left objects"
        assert _staged(service_settings) == staged_before, "a rejected request left staged files"
        return error

    return check


def test_images_must_be_present(client: TestClient, team, base_model: str) -> None:
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="class_names"\r\n\r\n["a", "b"]\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="base_model"\r\n\r\n{base_model}\r\n'
        f"--{boundary}--\r\n"
    )
    response = client.post(
        "/adaptations",
        headers={**team.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=body.encode(),
    )
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "missing_field",
        "message": "images is required: one .zip or one or more image files",
        "param": "images",
    }


def test_too_few_images(team, assert_rejected, dtd_images) -> None:
    assert_rejected(team, _as_zip(_zip(_real_images(dtd_images, 3))), code="too_few_images")


def test_too_many_images(team, assert_rejected, dtd_images, make_client) -> None:
    with make_client(max_images=9) as limited:
        assert_rejected(team, _as_zip(_zip(_real_images(dtd_images, 10))), code="too_many_images", via=limited)


def test_corrupt_image_in_zip(team, assert_rejected, dtd_images) -> None:
    entries = _real_images(dtd_images, 9)
    entries["img/broken.jpg"] = next(iter(entries.values()))[:300]  # truncated JPEG
    assert_rejected(team, _as_zip(_zip(entries)), code="corrupt_image")


def test_text_file_with_image_extension(team, assert_rejected, dtd_images) -> None:
    files: Files = [("images", (path.name, path.read_bytes(), "image/jpeg")) for path in dtd_images.paths(9)]
    files.append(("images", ("notes.jpg", b"just some text, not a picture" * 10, "image/jpeg")))
    assert_rejected(team, files, code="unsupported_format")


def test_unsupported_file_type(team, assert_rejected, dtd_images) -> None:
    files: Files = [("images", (path.name, path.read_bytes(), "image/jpeg")) for path in dtd_images.paths(9)]
    files.append(("images", ("labels.csv", b"a,b\n", "text/csv")))
    assert_rejected(team, files, code="unsupported_format")


def test_decompression_bomb(team, assert_rejected, dtd_images) -> None:
    entries = _real_images(dtd_images, 9)
    entries["img/huge.png"] = _png(10_000, 10_000, mode="1")  # 100 Mpx in a few kB
    assert len(entries["img/huge.png"]) < 100_000
    assert_rejected(team, _as_zip(_zip(entries)), code="decompression_bomb")


@pytest.mark.parametrize(
    ("bad_entry", "code"),
    [
        ("../escape.jpg", "unsafe_archive"),
        ("/abs/path.jpg", "unsafe_archive"),
        ("inner/nested.zip", "nested_archive"),
    ],
)
def test_unsafe_archives(team, assert_rejected, dtd_images, bad_entry: str, code: str) -> None:
    entries = _real_images(dtd_images, 9)
    entries[bad_entry] = next(iter(entries.values()))
    assert_rejected(team, _as_zip(_zip(entries)), code=code)


def test_symlink_in_archive(team, assert_rejected, dtd_images) -> None:
    assert_rejected(team, _as_zip(_zip(_real_images(dtd_images, 9), symlink="img/link.jpg")), code="unsafe_archive")


def test_zip_bomb(team, assert_rejected, dtd_images) -> None:
    entries = _real_images(dtd_images, 9)
    entries["img/zeros.bmp"] = bytes(50 * 1024 * 1024)  # deflates ~1000:1
    assert_rejected(team, _as_zip(_zip(entries)), code="zip_bomb")


def test_empty_and_corrupt_archives(team, assert_rejected) -> None:
    assert_rejected(team, _as_zip(_zip({"readme.txt": b"no images here"})), code="empty_archive")
    assert_rejected(
        team,
        [("images", ("upload.zip", b"PK\x03\x04 definitely not a zip", "application/zip"))],
        code="corrupt_archive",
    )


def test_zip_among_image_files(team, assert_rejected, dtd_images) -> None:
    files: Files = [("images", (path.name, path.read_bytes(), "image/jpeg")) for path in dtd_images.paths(9)]
    files.append(("images", ("more.zip", _zip(_real_images(dtd_images, 2)), "application/zip")))
    assert_rejected(team, files, code="nested_archive")


@pytest.mark.parametrize(
    ("class_names", "code", "param"),
    [
        (json.dumps(["only-one"]), "too_few_class_names", "class_names"),
        (json.dumps(["cat", " "]), "empty_class_name", "class_names.1"),
        (json.dumps(["cat", "Cat "]), "duplicate_class_name", "class_names.1"),
        (json.dumps(["cat", "  big   CAT", "big cat"]), "duplicate_class_name", "class_names.2"),
        (json.dumps(["cat", "x" * 201]), "class_name_too_long", "class_names.1"),
        (json.dumps([f"c{i}" for i in range(1001)]), "too_many_class_names", "class_names"),
        (json.dumps(["cat", 3]), "invalid_class_names", "class_names"),
        ('["cat", "dog"', "malformed_json", "class_names"),
    ],
)
def test_bad_class_names(team, assert_rejected, dtd_images, class_names: str, code: str, param: str) -> None:
    error = assert_rejected(team, _as_zip(_zip(_real_images(dtd_images, 8))), code=code, class_names=class_names)
    assert error["param"] == param


@pytest.mark.parametrize(
    ("fields", "code", "param"),
    [
        ({"base_model": "no-such-model"}, "unknown_base_model", "base_model"),
        ({"base_model": "ViT-B-16:no-such-tag"}, "weights_unavailable", "base_model"),
        ({"config": json.dumps({"preset": "imagenet-22k"})}, "unknown_preset", "config.preset"),
        ({"config": json.dumps({"epochs": 0})}, "invalid_config", "config.epochs"),
        ({"config": json.dumps({"tau": 1.5})}, "invalid_config", "config.tau"),
        ({"config": json.dumps({"epochs": "ten"})}, "invalid_config", "config.epochs"),
        ({"config": json.dumps({"no_such_field": 1})}, "invalid_config", "config.no_such_field"),
        ({"config": json.dumps({"class_prior": {"banded": 3, "striped": 1}})}, "invalid_class_prior",
         "config.class_prior"),
        ({"config": json.dumps({"class_prior": {"banded": 3}})}, "invalid_class_prior", "config.class_prior"),
        ({"config": json.dumps({"class_prior": [1, 0]})}, "invalid_class_prior", "config.class_prior"),
        ({"config": "{not json"}, "malformed_json", "config"),
        ({"config": "[1, 2]"}, "invalid_request", "config"),
        ({"metadata": "[]"}, "invalid_request", "metadata"),
        ({"metadata": json.dumps({"blob": "x" * 20_000})}, "metadata_too_large", "metadata"),
        ({"colour": "blue"}, "unknown_field", "colour"),
        ({"config": '{"epochs": 1, "epochs": 5}'}, "duplicate_parameter", "config.epochs"),
        ({"base_model": ["proxy-cifar10-tiny", "other"]}, "duplicate_parameter", "base_model"),
    ],
)
def test_bad_fields(team, assert_rejected, dtd_images, fields: dict[str, str], code: str, param: str) -> None:
    error = assert_rejected(team, _as_zip(_zip(_real_images(dtd_images, 8))), code=code, **fields)
    assert error["param"] == param


def test_oversized_upload_is_413(team, assert_rejected, dtd_images, make_client) -> None:
    with make_client(max_upload_bytes=100_000) as limited:
        assert_rejected(
            team, _as_zip(_zip(_real_images(dtd_images, 12))), status=413, code="request_too_large", via=limited
        )


def test_oversized_chunked_upload_is_413(
    team, client: TestClient, make_client, store, dtd_images, service_settings: Settings
) -> None:
    """Without Content-Length the limit is enforced while the body streams in."""
    body = _zip(_real_images(dtd_images, 12))
    boundary = "xyz"
    payload = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.zip"\r\n\r\n'.encode()
        + body
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def chunks():
        for start in range(0, len(payload), 65536):
            yield payload[start : start + 65536]

    staged_before = _staged(service_settings)
    with make_client(max_upload_bytes=100_000) as limited:
        response = limited.post(
            "/adaptations",
            headers={**team.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
            content=chunks(),
        )
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert store.list(f"teams/{team.id}/") == []
    assert _staged(service_settings) == staged_before


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"class_names": ["a", "b"]}, "invalid_request", "source"),
        ({"class_names": "a,b", "source": {"bucket": "b"}}, "invalid_request", "class_names"),
        ({"class_names": ["a", "b"], "source": {"bucket": "b"}, "extra": 1}, "unknown_field", "extra"),
        ({"class_names": ["a", "b"], "source": {"bucket": "b", "prefixes": "x"}}, "unknown_field", "source.prefixes"),
        ({"class_names": ["a", "b"], "sources": {"bucket": "b"}}, "unknown_field", "sources"),  # not `missing source`
        ({"class_names": ["a", "b"], "source": {"bucket": "b"}, "metadata": [1]}, "invalid_request", "metadata"),
    ],
)
def test_json_body_shapes(client: TestClient, team, body: dict, code: str, param: str) -> None:
    response = client.post("/adaptations", headers=team.headers, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code and response.json()["error"]["param"] == param


def test_malformed_json_body_and_wrong_media_type(client: TestClient, team) -> None:
    response = client.post(
        "/adaptations", headers={**team.headers, "Content-Type": "application/json"}, content=b'{"class_names": ['
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "malformed_json"
    response = client.post("/adaptations", headers={**team.headers, "Content-Type": "text/plain"}, content=b"hi")
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    response = client.post("/adaptations", headers=team.headers, data={"class_names": "a"})  # urlencoded
    assert response.status_code == 415
    response = client.post(
        "/adaptations", headers={**team.headers, "Content-Type": "multipart/form-data"}, content=b"--x\r\n"
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_multipart"

