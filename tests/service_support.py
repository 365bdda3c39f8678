"""Helpers the shared fixtures in tests/conftest.py hand to tests: real DTD photos zipped, team keys, and
the handle of a whole service with a real worker (`Stack`). Plain code, no fixtures: conftest wires them."""

from __future__ import annotations

import io
import json
import secrets
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi.testclient import TestClient
    from sqlalchemy.orm import Session, sessionmaker

    from app.settings import Settings
    from app.storage import ObjectStore

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = REPO_ROOT.parent / "shared" / "datasets"
DTD10 = DATASETS / "dtd10"


def dtd_image_paths(count: int, classes: int = 2) -> list[Path]:
    """`count` real DTD photos spread over the first `classes` classes (labels are never sent)."""
    folders = sorted(path for path in DTD10.iterdir() if path.is_dir())[:classes]
    per_class = [sorted(folder.glob("*.jpg")) for folder in folders]
    picked = [images[index] for index in range(count) for images in per_class][:count]
    assert len(picked) == count, f"not enough DTD images in {DTD10}"
    return picked


def zip_bytes(paths: list[Path]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in paths:
            archive.write(path, f"{path.parent.name}/{path.name}")
    return buffer.getvalue()


class DtdImages:
    paths = staticmethod(dtd_image_paths)
    zip = staticmethod(zip_bytes)


@dataclass(frozen=True)
class TeamKey:
    id: str
    name: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def create_team_key(session_factory: sessionmaker[Session], name: str | None = None) -> TeamKey:
    from app.auth import create_team
    from app.db.session import transaction

    with transaction(session_factory) as session:
        team, key = create_team(session, name or f"team-{secrets.token_hex(4)}")
        return TeamKey(team.id, team.name, key)


# A job that trains for real in seconds: 16 images, batches of 8, one epoch, no loader processes.
TINY_CONFIG = {
    "epochs": 1,
    "batch_size": 8,
    "num_workers": 0,
    "checkpoint_every": 1,
    "log_every": 1,
}


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
