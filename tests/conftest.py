"""Shared fixtures for the service tests: real PostgreSQL, Redis and an S3 server, once per session.

- PostgreSQL: a fresh database `must_test_<random>` on 127.0.0.1:5432 (user postgres), dropped at the end.
- Redis: a database index nobody else uses during the session, flushed at the end.
- S3: moto's standalone server in a thread on a free port, reached through the real `minio` client.

Each is started lazily, so engine-only runs never touch them.

The session's shared database, bucket and app (`session_factory`, `store`, `client`) collect what every
test leaves, and that app's sweeper runs in the background. A test there asserts only about rows, objects
and keys it created (its own team); a test that asserts over everything (a sweep, a count, "oldest
first") takes a `world` of its own.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from service_support import TINY_CONFIG, DtdImages, Stack, TeamKey, create_team_key

if TYPE_CHECKING:
    from fastapi.testclient import TestClient
    from sqlalchemy.orm import Session, sessionmaker

    from app.settings import Settings
    from app.storage import ObjectStore

POSTGRES_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def dtd_images() -> type[DtdImages]:
    """Helpers to pick real DTD photos and zip them (fixtures, since test folders are not packages)."""
    return DtdImages


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str = "testing"
    secret_key: str = "testing"


@pytest.fixture(scope="session")
def proxy_arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The shipped proxy's architecture registered with open_clip under a fresh name, so it can be named as
    `ARCH:/path` or `ARCH:s3://...` weights (it is not one of open_clip's built-in architectures)."""
    import open_clip

    from must_engine.base_models import SHIPPED_DIR

    name = f"must-proxy-{secrets.token_hex(3)}"
    config = json.loads((SHIPPED_DIR / "proxy-cifar10-tiny" / "open_clip_config.json").read_text())["model_cfg"]
    path = tmp_path_factory.mktemp("arch") / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield S3Server(endpoint=f"http://127.0.0.1:{port}")
    server.stop()


@pytest.fixture(scope="session")
def create_database() -> Iterator[Callable[[], str]]:
    """A factory of fresh PostgreSQL databases, all dropped at the end of the session."""
    import psycopg

    created: list[str] = []

    def create() -> str:
        name = f"must_test_{secrets.token_hex(6)}"
        with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"

    yield create
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
        for name in created:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    import redis

    marker = f"must-test-session-{secrets.token_hex(6)}"
    for index in secrets.SystemRandom().sample(range(1, 16), 15):
        client = redis.Redis(host="127.0.0.1", port=6379, db=index)
        # Claim an empty database atomically: another session picking the same index sees our marker.
        if client.dbsize() == 0 and client.set("must-test-owner", marker, nx=True):
            break
        client.close()
    else:
        pytest.fail("no free Redis database index on 127.0.0.1:6379")
    yield f"redis://127.0.0.1:6379/{index}"
    client.flushdb()
    client.close()


# ---- the service on real components ----------------------------------------------------------------
# Imported lazily: the engine's own tests should not need the web stack.


@pytest.fixture(scope="session")
def base_model() -> str:
    from must_engine import DEFAULT_BASE_MODEL

    return DEFAULT_BASE_MODEL


@pytest.fixture(scope="session")
def source_bucket() -> str:
    return f"team-data-{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def make_service_settings(
    tmp_path_factory: pytest.TempPathFactory,
    create_database: Callable[[], str],
    redis_url: str,
    s3_server: S3Server,
    source_bucket: str,
) -> Callable[..., Settings]:
    """Settings for a fresh, migrated Postgres database, Redis and a fresh bucket, with test-sized limits.

    Each call is a separate world (database, bucket, data dir); a distinct `training_queue` keeps the
    Redis queues apart too.
    """
    from app.prestart import migrate
    from app.settings import Settings
    from app.storage import create_store

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "data_dir": tmp_path_factory.mktemp("service"),
            "database_url": create_database(),
            "broker_url": redis_url,
            "s3_endpoint": s3_server.endpoint,
            "s3_access_key": s3_server.access_key,
            "s3_secret_key": s3_server.secret_key,
            "s3_bucket": f"must-{secrets.token_hex(4)}",
            "source_buckets": [source_bucket],
            "training_queue": f"training-{secrets.token_hex(4)}",
            "min_images": 8,
            "max_images": 64,
            "max_active_jobs_per_team": 50,
            "lease_seconds": 6.0,
            "cancel_poll_seconds": 0.5,
            "sweep_interval_seconds": 1.0,
            "requeue_after_seconds": 3.0,
            "device": "cpu",
        }
        values.update(overrides)
        settings = Settings(**values)  # type: ignore[arg-type]
        migrate(settings)
        store = create_store(settings)
        store.ensure_bucket()
        store.for_bucket(source_bucket).ensure_bucket()
        return settings

    return make


@pytest.fixture(scope="session")
def service_settings(make_service_settings: Callable[..., Settings]) -> Settings:
    return make_service_settings()


@dataclass(frozen=True)
class World:
    settings: Settings
    session_factory: sessionmaker[Session]
    store: ObjectStore


@pytest.fixture
def world(make_service_settings: Callable[..., Settings]) -> Iterator[World]:
    """A database, bucket and queue for this test alone, with no API process sweeping it.

    For tests that assert over every row (sweeps, counts, "oldest first"): in the shared database the
    rows other tests leave behind, and the shared app's background sweeper, would decide the outcome.
    """
    from app.db.session import create_db_engine, create_session_factory
    from app.storage import create_store

    settings = make_service_settings()
    engine = create_db_engine(settings)
    yield World(settings, create_session_factory(engine), create_store(settings))
    engine.dispose()


@pytest.fixture
def world_client(world: World) -> Iterator[TestClient]:
    """The API on the test's own `world` (its lifespan runs a sweeper there, as in production)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(world.settings)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def session_factory(service_settings: Settings) -> Iterator[sessionmaker[Session]]:
    from app.db.session import create_db_engine, create_session_factory

    engine = create_db_engine(service_settings)
    yield create_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def store(service_settings: Settings) -> ObjectStore:
    from app.storage import create_store

    store = create_store(service_settings)
    store.ensure_bucket()
    return store


@pytest.fixture(scope="session")
def client(service_settings: Settings) -> Iterator[TestClient]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(service_settings)) as test_client:
        yield test_client


@pytest.fixture
def make_client(service_settings: Settings) -> Callable[..., AbstractContextManager[TestClient]]:
    """An app on the same services with some settings changed (limits, for instance)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    @contextmanager
    def build(**overrides: object) -> Iterator[TestClient]:
        with TestClient(create_app(service_settings.model_copy(update=overrides))) as test_client:
            yield test_client

    return build


@pytest.fixture(scope="session")
def make_team() -> Callable[..., TeamKey]:
    """Create a team (and key) in the database of a given session factory."""
    return create_team_key


def _team_database(request: pytest.FixtureRequest) -> sessionmaker[Session]:
    """Teams live in the database of the test's `stack` or `world` when it has one, else the shared service's."""
    for own in ("stack", "world"):
        if own in request.fixturenames:
            return request.getfixturevalue(own).session_factory
    return request.getfixturevalue("session_factory")


@pytest.fixture
def team(request: pytest.FixtureRequest) -> TeamKey:
    return create_team_key(_team_database(request))


@pytest.fixture
def other_team(request: pytest.FixtureRequest) -> TeamKey:
    return create_team_key(_team_database(request))


# ---- the whole service with a real worker --------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_config() -> dict[str, Any]:
    """A config for real but seconds-long training jobs; tests override fields with `{**tiny_config, ...}`."""
    return dict(TINY_CONFIG)


@pytest.fixture(scope="module")
def stack_overrides() -> dict[str, object]:
    """Settings a test module's `stack` needs changed; a module overrides this fixture."""
    return {}


@pytest.fixture(scope="module")
def stack(
    make_service_settings: Callable[..., Settings], base_model: str, stack_overrides: dict[str, object]
) -> Iterator[Stack]:
    from celery.contrib.testing.worker import start_worker
    from fastapi.testclient import TestClient

    from app.db.session import create_db_engine, create_session_factory
    from app.main import create_app
    from app.storage import create_store
    from worker.celery_app import create_worker_app

    settings = make_service_settings(**stack_overrides)
    celery = create_worker_app(settings)
    engine = create_db_engine(settings)
    with (
        TestClient(create_app(settings)) as client,
        start_worker(
            celery,
            pool="solo",
            concurrency=1,
            queues=[settings.training_queue],
            perform_ping_check=False,
            shutdown_timeout=60,
        ),
    ):
        yield Stack(settings, client, create_session_factory(engine), create_store(settings), celery, base_model)
    engine.dispose()
