"""Both object-store implementations behave the same, and keys cannot escape their namespace."""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from app.settings import Settings
from app.storage import (
    InvalidKeyError,
    LocalStore,
    ObjectStore,
    S3Store,
    SourceUnreadable,
    check_source_prefix,
    download_prefix,
    object_key,
    s3_client,
    upload_directory,
)


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    bucket = f"store-test-{secrets.token_hex(4)}"
    if request.param == "local":
        store: ObjectStore = LocalStore(tmp_path / "objects", bucket)
    else:
        s3 = request.getfixturevalue("s3_server")
        settings = Settings(
            data_dir=tmp_path, s3_endpoint=s3.endpoint, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key
        )
        store = S3Store(s3_client(settings), bucket)
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    yield store


def test_round_trip(any_store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(b"x" * 3_000_000)
    assert any_store.put_file("teams/t1/a/in.bin", source) == 3_000_000
    assert any_store.put_stream("teams/t1/a/b/small.txt", io.BytesIO(b"hello"), 5) == 5
    assert any_store.put_stream("teams/t1/ab/other.txt", io.BytesIO(b"other"), 5) == 5
    assert any_store.exists("teams/t1/a/in.bin") and not any_store.exists("teams/t1/a/missing")

    listed = any_store.list("teams/t1/a/")
    assert [(info.key, info.size) for info in listed] == [
        ("teams/t1/a/b/small.txt", 5),
        ("teams/t1/a/in.bin", 3_000_000),
    ]
    assert b"".join(any_store.stream("teams/t1/a/b/small.txt")) == b"hello"
    any_store.get_file("teams/t1/a/in.bin", tmp_path / "out" / "copy.bin")
    assert (tmp_path / "out" / "copy.bin").read_bytes() == source.read_bytes()
    with pytest.raises(FileNotFoundError):
        any_store.get_file("teams/t1/a/missing", tmp_path / "nothing")

    copied = download_prefix(any_store, "teams/t1/a/", tmp_path / "download")
    assert sorted(path.relative_to(tmp_path / "download").as_posix() for path in copied) == ["b/small.txt", "in.bin"]

    assert any_store.delete_prefix("teams/t1/a/") == 2
    assert any_store.list("teams/t1/a/") == []
    assert [info.key for info in any_store.list("teams/t1/")] == ["teams/t1/ab/other.txt"]


def test_upload_directory_and_presigning(any_store: ObjectStore, tmp_path: Path) -> None:
    (tmp_path / "artifact").mkdir()
    (tmp_path / "artifact" / "metadata.json").write_text("{}")
    (tmp_path / "artifact" / "model.safetensors").write_bytes(b"w" * 10)
    assert upload_directory(any_store, tmp_path / "artifact", "teams/t/models/m/") == 12
    url = any_store.presigned_get_url("teams/t/models/m/metadata.json", timedelta(minutes=1))
    if isinstance(any_store, LocalStore):
        assert url is None
    else:
        assert url is not None and httpx.get(url).content == b"{}"


@pytest.mark.parametrize("segment", ["", ".", "..", "a/b", "/abs", "x\x00", "-leading-dash", "sp ace"])
def test_object_key_rejects_unsafe_segments(segment: str) -> None:
    with pytest.raises(InvalidKeyError):
        object_key("teams", segment)


def test_local_store_refuses_keys_outside_its_bucket(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects", "bucket")
    store.ensure_bucket()
    (tmp_path / "objects" / "secret.txt").write_text("other bucket's data")
    with pytest.raises(InvalidKeyError):
        store.get_file("../secret.txt", tmp_path / "stolen")
    with pytest.raises(InvalidKeyError):
        store.for_bucket("../objects")


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [("", ""), ("a", "a/"), ("a/b/", "a/b/"), ("a//b", "a/b/"), ("images 2024/x", "images 2024/x/")],
)
def test_source_prefixes_are_normalised(prefix: str, expected: str) -> None:
    assert check_source_prefix(prefix) == expected


@pytest.mark.parametrize("prefix", ["../x", "a/../../b", "/abs", "a\\b", "a\nb", "x" * 1025])
def test_source_prefixes_that_escape_are_refused(prefix: str) -> None:
    with pytest.raises(InvalidKeyError):
        check_source_prefix(prefix)


def test_a_source_the_service_cannot_read_is_not_a_storage_outage(s3_server, tmp_path: Path) -> None:
    """A team's bucket deleted (or an object gone) answers SourceUnreadable, which callers turn into a clear
    4xx or a failed job; StorageError would be retried as an outage forever."""
    settings = Settings(data_dir=tmp_path, s3_endpoint=s3_server.endpoint, s3_access_key=s3_server.access_key,
                        s3_secret_key=s3_server.secret_key)
    missing = S3Store(s3_client(settings), f"never-made-{secrets.token_hex(4)}")
    for read in (lambda: missing.list("photos/"), lambda: b"".join(missing.stream("photos/a.jpg"))):
        with pytest.raises(SourceUnreadable) as raised:
            read()
        assert (raised.value.code, raised.value.bucket, raised.value.gone) == ("NoSuchBucket", missing.bucket, True)
    present = S3Store(s3_client(settings), f"made-{secrets.token_hex(4)}")
    present.ensure_bucket()
    with pytest.raises(SourceUnreadable) as raised:
        b"".join(present.stream("photos/gone.jpg"))
    assert raised.value.code == "NoSuchKey" and raised.value.gone


@pytest.mark.parametrize(("code", "translated"), [("AccessDenied", True), ("NoSuchBucket", True),
                                                  ("SlowDown", False), ("InternalError", False)])
def test_only_unreadable_answers_are_translated(code: str, translated: bool) -> None:
    """Access withdrawn is unreadable but not gone (moto cannot refuse access, so the S3 answer is built here)."""
    from minio.error import S3Error

    from app.storage import _reading

    answer = S3Error(None, code, "refused", "/bucket", "request", "host")  # type: ignore[arg-type]
    with pytest.raises(SourceUnreadable if translated else S3Error) as raised, _reading("team-bucket"):
        raise answer
    if translated:
        assert isinstance(raised.value, SourceUnreadable)
        assert raised.value.code == code and raised.value.gone == (code != "AccessDenied")
