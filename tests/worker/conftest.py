"""A complete service on real components: the API, a real Celery worker consuming from Redis, Postgres
and the S3 server. The worker runs in a thread of the test process (`celery.contrib.testing`), so the
task executes the production code path, engine included.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings
from app.storage import ObjectStore

# A job that trains for real in seconds: 16 images, batches of 8, one epoch, no loader processes.
TINY_CONFIG = {"epochs": 1, "batch_size": 8, "num_workers": 0, "checkpoint_every": 1, "log_every": 1}
FINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Stack:
    settings: Settings
    client: TestClient
    session_factory: sessionmaker[Session]
    store: ObjectStore
    celery: Any
    base_model: str

    def wait_for(self, team: Any, adaptation_id: str, done: Callable[[dict], bool], timeout: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            body = self.client.get(f"/adaptations/{adaptation_id}", headers=team.headers).json()
            if done(body):
                return body
            assert time.monotonic() < deadline, f"timed out; last state {body}"
            time.sleep(0.25)

    def wait_final(self, team: Any, adaptation_id: str, timeout: float = 300.0) -> dict:
        return self.wait_for(team, adaptation_id, lambda body: body["status"] in FINAL, timeout)

    def events(self, team: Any, adaptation_id: str) -> list[dict]:
        page = self.client.get(f"/adaptations/{adaptation_id}/events", headers=team.headers, params={"limit": 1000})
        return page.json()["data"]

    def submit(self, team: Any, images: bytes, config: dict | None = None, **fields: str) -> dict:
        data = {
            "class_names": json.dumps(["banded", "blotchy"]),
            "base_model": self.base_model,
            "config": json.dumps(config or TINY_CONFIG),
            **fields,
        }
        files = {"images": ("images.zip", images, "application/zip")}
        response = self.client.post("/adaptations", headers=team.headers, data=data, files=files)
        assert response.status_code == 202, response.text
        return response.json()


@pytest.fixture(scope="module")
def stack(make_service_settings: Callable[..., Settings], base_model: str) -> Iterator[Stack]:
    from celery.contrib.testing.worker import start_worker

    from app.db.session import create_db_engine, create_session_factory
    from app.main import create_app
    from app.storage import create_store
    from worker.celery_app import create_celery_app

    settings = make_service_settings()
    celery = create_celery_app(settings)
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


@pytest.fixture
def team(stack: Stack, make_team: Callable[..., Any]) -> Any:
    return make_team(stack.session_factory)


@pytest.fixture
def other_team(stack: Stack, make_team: Callable[..., Any]) -> Any:
    return make_team(stack.session_factory)
