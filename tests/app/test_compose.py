"""docker-compose.yml cannot run here (no Docker engine); check that it agrees with the code instead:
services, ports, environment names and values, commands, health checks and the GPU reservation."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from app.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def interpolate(value: str) -> str:
    """Compose's `${NAME:-default}` with nothing set, as on a fresh machine."""
    assert "${" not in _DEFAULTED.sub("", value), f"{value}: every variable needs a default"
    return _DEFAULTED.sub(lambda match: match.group(2), value)


def service_env(service: dict) -> dict[str, str]:
    return {name: interpolate(str(value)) for name, value in service["environment"].items()}


def test_services(compose: dict) -> None:
    assert set(compose["services"]) == {"postgres", "redis", "minio", "migrate", "api", "worker", "worker-4gpu"}
    for name in ("postgres", "redis", "minio", "api"):
        assert "healthcheck" in compose["services"][name], name
    assert set(compose["volumes"]) >= {"postgres-data", "redis-data", "minio-data"}


def test_environment_names_are_settings(compose: dict) -> None:
    fields = {f"MUST_{name.upper()}" for name in Settings.model_fields}
    for name in ("migrate", "api", "worker"):
        env = service_env(compose["services"][name])
        unknown = {key for key in env if key.startswith("MUST_")} - fields
        assert not unknown, f"{name}: {unknown} are not settings in app/settings.py"
        for required in (
            "MUST_DATABASE_URL",
            "MUST_BROKER_URL",
            "MUST_S3_ENDPOINT",
            "MUST_S3_ACCESS_KEY",
            "MUST_S3_SECRET_KEY",
            "MUST_S3_BUCKET",
        ):
            assert required in env, f"{name} lacks {required}"


def test_environment_values_validate_and_point_at_the_services(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose["services"]
    env = service_env(services["api"])
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # fails fast on a bad value, as the containers would
    assert settings.uses_s3 and not settings.uses_sqlite

    database = urlsplit(settings.database_url)
    postgres = service_env(services["postgres"])
    assert database.scheme == "postgresql+psycopg" and database.hostname == "postgres" and database.port == 5432
    assert (database.username, database.password, database.path.lstrip("/")) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        postgres["POSTGRES_DB"],
    )
    assert urlsplit(settings.broker_url).hostname == "redis"
    endpoint = urlsplit(settings.s3_endpoint)
    assert endpoint.hostname == "minio" and f"{endpoint.port}:{endpoint.port}" in services["minio"]["ports"]
    minio = service_env(services["minio"])
    assert (settings.s3_access_key, settings.s3_secret_key.get_secret_value()) == (
        minio["MINIO_ROOT_USER"],
        minio["MINIO_ROOT_PASSWORD"],
    )
    assert service_env(services["worker"]) == env == service_env(services["migrate"])


def test_commands(compose: dict) -> None:
    services = compose["services"]
    migrate = services["migrate"]["command"]
    assert migrate[:2] == ["python", "-m"] and importlib.import_module(migrate[2]).main

    api = services["api"]["command"]
    assert api[:2] == ["must", "serve"] and "--no-worker" in api
    port = api[api.index("--port") + 1]
    assert f"{port}:{port}" in services["api"]["ports"]
    assert f"127.0.0.1:{port}/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert int(interpolate(api[api.index("--workers") + 1])) >= 1

    worker = services["worker"]["command"]
    module, _, attribute = worker[worker.index("-A") + 1].partition(":")
    assert worker[0] == "celery" and hasattr(importlib.import_module(module), attribute)
    assert worker[worker.index("-Q") + 1] == Settings.model_fields["training_queue"].default
    assert "--concurrency=1" in worker and "--pool=solo" in worker


def test_order_and_gpu(compose: dict) -> None:
    services = compose["services"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(device["driver"] == "nvidia" and "gpu" in device["capabilities"] for device in devices)
    assert "deploy" not in services["api"]


def test_the_multi_gpu_worker_reserves_the_gpus_one_job_trains_on(
    compose: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    worker, multi = services["worker"], services["worker-4gpu"]
    env = service_env(multi)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings().gpus_per_job == 4
    assert {**service_env(worker), "MUST_GPUS_PER_JOB": "4"} == env
    assert multi["command"] == worker["command"] and multi["profiles"] == ["multi-gpu"]
    devices = multi["deploy"]["resources"]["reservations"]["devices"]
    assert [device["count"] for device in devices if device["driver"] == "nvidia"] == [4]


def test_dockerfile_copies_what_the_commands_need() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    for path in ("must_engine", "app", "worker", "migrations", "pyproject.toml"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", dockerfile, re.MULTILINE), path
    assert "pip install -e ." in dockerfile
