"""Settings: embedded defaults, environment switches, and fail-fast validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("MUST_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_embedded_defaults_live_under_var(tmp_path: Path) -> None:
    settings = Settings()
    assert settings.data_dir == (tmp_path / "var").resolve()
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'var' / 'must.db'}"
    assert settings.broker_url == "filesystem://"
    assert settings.uses_sqlite and not settings.uses_s3
    assert settings.objects_dir.is_relative_to(settings.data_dir)


def test_environment_switches_each_part(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MUST_DATA_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("MUST_DATABASE_URL", "postgresql+psycopg://u:p@db:5432/must")
    monkeypatch.setenv("MUST_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("MUST_S3_ENDPOINT", "http://minio:9000")
    monkeypatch.setenv("MUST_S3_ACCESS_KEY", "access")
    monkeypatch.setenv("MUST_S3_SECRET_KEY", "hunter2-value")
    monkeypatch.setenv("MUST_SOURCE_BUCKETS", "team-a, team-b")
    monkeypatch.setenv("MUST_MAX_IMAGES", "123")
    settings = Settings()
    assert settings.data_dir == tmp_path / "elsewhere"
    assert not settings.uses_sqlite and settings.uses_s3
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.source_buckets == ["team-a", "team-b"]
    assert settings.max_images == 123
    assert "hunter2-value" not in repr(settings)


@pytest.mark.parametrize(
    ("variables", "mentions"),
    [
        ({"MUST_MAX_IMAGES": "0"}, "max_images"),
        ({"MUST_MAX_IMAGES": "lots"}, "max_images"),
        ({"MUST_DATABASE_URL": "mysql://x/y"}, "database_url"),
        ({"MUST_BROKER_URL": "kafka://x"}, "broker_url"),
        ({"MUST_S3_ENDPOINT": "http://minio:9000"}, "s3_access_key"),
        ({"MUST_MIN_IMAGES": "100", "MUST_MAX_IMAGES": "10"}, "min_images"),
        ({"MUST_DEVICE": "tpu"}, "device"),
        ({"MUST_SOURCE_BUCKETS": "must"}, "service bucket"),
        ({"MUST_LEASE_SECONDS": "-1"}, "lease_seconds"),
        ({"MUST_BASE_MODEL_ARCHITECTURES": "ViT-B-16,ViT-B-61"}, "ViT-B-61"),
        ({"MUST_BASE_MODEL_ARCHITECTURES": " , "}, "at least one"),
        ({"MUST_LOCAL_WEIGHTS_DIRS": "/models,weights"}, "absolute"),
        ({"MUST_MAX_CONCURRENT_MODEL_LOADS": "0"}, "max_concurrent_model_loads"),
        ({"MUST_PREDICTOR_CACHE_BYTES": "0"}, "predictor_cache_bytes"),
    ],
)
def test_bad_values_fail_at_start_up(monkeypatch: pytest.MonkeyPatch, variables: dict, mentions: str) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=mentions):
        Settings()


def test_base_model_policy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert defaults.base_model_architectures[:4] == ["proxy-cifar10-tiny", "ViT-B-32", "ViT-B-16", "ViT-L-14"]
    assert "ViT-B-16-quickgelu" in defaults.base_model_architectures  # local files of OpenAI weights
    assert defaults.local_weights_dirs == [], "no local weights unless the operator lists a directory"
    monkeypatch.setenv("MUST_BASE_MODEL_ARCHITECTURES", "proxy-cifar10-tiny, ViT-B-16")
    monkeypatch.setenv("MUST_LOCAL_WEIGHTS_DIRS", "/models, /mnt/weights")
    settings = Settings()
    assert settings.base_model_architectures == ["proxy-cifar10-tiny", "ViT-B-16"]
    assert settings.local_weights_dirs == [Path("/models"), Path("/mnt/weights")]


def test_rate_limits_are_shared_through_redis_when_redis_is_configured() -> None:
    assert Settings().shared_rate_limit_url == ""  # embedded: each process keeps its own buckets
    assert Settings(broker_url="redis://broker:6379/0").shared_rate_limit_url == "redis://broker:6379/0"
    assert Settings(broker_url="amqp://rabbit//").shared_rate_limit_url == ""
    explicit = Settings(broker_url="redis://broker:6379/0", rate_limit_redis_url="rediss://limits:6380/2")
    assert explicit.shared_rate_limit_url == "rediss://limits:6380/2"
    with pytest.raises(ValidationError, match="rate_limit_redis_url"):
        Settings(rate_limit_redis_url="http://limits:6379")
