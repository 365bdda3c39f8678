"""Workers and brokers failing under real jobs: a SIGKILLed Celery worker and a Redis that loses its
queues. Real worker processes, the real API (with its sweeper) and real training on tiny jobs."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from reliability_support import Process, RedisServer, start_worker, wait_until
from sqlalchemy import func, select

from app.db.models import Model
from app.db.session import create_db_engine, create_session_factory
from app.main import create_app
from app.settings import Settings
from app.storage import create_store, object_key
from worker.runner import CHECKPOINT_FILE

FINAL = ("succeeded", "failed", "cancelled")
RESUMED = re.compile(r"resumed from checkpoint at step (\d+)")
# Fast failure detection: a lease of 3 s, swept every half second.
FAST_RECOVERY: dict[str, Any] = {"lease_seconds": 3.0, "sweep_interval_seconds": 0.5, "cancel_poll_seconds": 0.5}


class Api:
    """The API in this process (its lifespan runs the sweeper) plus the helpers the tests poll with."""

    def __init__(self, settings: Settings, client: TestClient, team: Any) -> None:
        self.settings, self.client, self.team = settings, client, team
        self.store = create_store(settings)
        self.engine = create_db_engine(settings)
        self.sessions = create_session_factory(self.engine)

    def submit(self, images: bytes, config: dict[str, Any]) -> str:
        import json

        data = {"class_names": json.dumps(["banded", "blotchy"]), "config": json.dumps(config)}
        files = {"images": ("images.zip", images, "application/zip")}
        response = self.client.post("/adaptations", headers=self.team.headers, data=data, files=files)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def get(self, adaptation_id: str) -> dict[str, Any]:
        return dict(self.client.get(f"/adaptations/{adaptation_id}", headers=self.team.headers).json())

    def messages(self, adaptation_id: str) -> list[str]:
        page = self.client.get(
            f"/adaptations/{adaptation_id}/events", headers=self.team.headers, params={"limit": 1000}
        ).json()
        return [event["message"] or "" for event in page["data"]]

    def wait_final(self, adaptation_id: str, timeout: float) -> dict[str, Any]:
        wait_until(lambda: self.get(adaptation_id)["status"] in FINAL, timeout, f"{adaptation_id} to finish", 0.25)
        return self.get(adaptation_id)

    def models_of(self, adaptation_id: str) -> int:
        with self.sessions() as session:
            count = session.scalar(select(func.count()).select_from(Model).where(Model.adaptation_id == adaptation_id))
        return int(count or 0)


@pytest.fixture
def make_api(make_service_settings: Callable[..., Settings], make_team: Any) -> Iterator[Callable[..., Api]]:
    opened: list[tuple[Api, TestClient]] = []

    def build(**overrides: Any) -> Api:
        settings = make_service_settings(**{**FAST_RECOVERY, **overrides})
        client = TestClient(create_app(settings))
        client.__enter__()
        api = Api(settings, client, None)
        api.team = make_team(api.sessions)
        opened.append((api, client))
        return api

    yield build
    for api, client in opened:
        client.__exit__(None, None, None)
        api.engine.dispose()


def test_sigkilled_worker_job_resumes_from_its_checkpoint_on_another(
    make_api: Callable[..., Api], processes: list[Process], dtd_images: Any, tiny_config: dict, tmp_path: Path
) -> None:
    api = make_api()
    config = {**tiny_config, "epochs": 10, "checkpoint_every": 3}
    adaptation_id = api.submit(dtd_images.zip(dtd_images.paths(16)), config)
    checkpoint = object_key("teams", api.team.id, "adaptations", adaptation_id, "checkpoint", CHECKPOINT_FILE)

    first = start_worker(api.settings, tmp_path / "worker-1.log", "first")
    processes.append(first)
    wait_until(
        lambda: api.get(adaptation_id)["progress"]["step"] >= 4 and api.store.exists(checkpoint),
        120,
        "training to pass a checkpoint",
    )
    first.kill()  # SIGKILL mid-training: no ack, no cleanup, the lease just stops being renewed
    killed_at = api.get(adaptation_id)
    assert killed_at["status"] == "running" and killed_at["progress"]["step"] < killed_at["progress"]["total_steps"]

    second = start_worker(api.settings, tmp_path / "worker-2.log", "second")
    processes.append(second)
    done = api.wait_final(adaptation_id, 180)

    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2 and api.models_of(adaptation_id) == 1
    messages = api.messages(adaptation_id)
    assert any(m.startswith("re-enqueued: its worker stopped renewing the lease") for m in messages), messages
    resumed = [int(hit.group(1)) for m in messages if (hit := RESUMED.search(m))]
    assert len(resumed) == 1 and resumed[0] > 0, messages
    assert done["progress"]["step"] == done["progress"]["total_steps"]
    assert not api.store.exists(checkpoint), "the finished job's checkpoint is deleted"
    # Lease owners are host:pid:nonce; the second attempt ran in the second worker process.
    assert any("attempt 1 on" in m and f":{first.process.pid}:" in m for m in messages), messages
    assert any("attempt 2 on" in m and f":{second.process.pid}:" in m for m in messages), messages


def test_redis_loss_loses_no_accepted_job(
    make_api: Callable[..., Api],
    private_redis: RedisServer,
    processes: list[Process],
    dtd_images: Any,
    tiny_config: dict,
    tmp_path: Path,
) -> None:
    """Redis dies (no persistence) with one job running and two queued; after it is back, all three finish."""
    api = make_api(broker_url=private_redis.url, requeue_after_seconds=2.0)
    images = dtd_images.zip(dtd_images.paths(16))
    running = api.submit(images, {**tiny_config, "epochs": 8, "checkpoint_every": 4})
    worker = start_worker(api.settings, tmp_path / "worker.log", "redis-loss")
    processes.append(worker)
    wait_until(lambda: api.get(running)["status"] == "running", 120, "the first job to run")
    queued = [api.submit(images, tiny_config) for _ in range(2)]
    assert {api.get(adaptation_id)["status"] for adaptation_id in queued} == {"queued"}

    private_redis.kill()  # every message in it is gone
    time.sleep(1)
    private_redis.start()

    for adaptation_id in (running, *queued):
        done = api.wait_final(adaptation_id, 180)
        assert done["status"] == "succeeded", done
        assert api.models_of(adaptation_id) == 1
    assert any(m.startswith("re-enqueued") for q in queued for m in api.messages(q))
