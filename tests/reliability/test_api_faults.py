"""The API process and its database failing: `must serve` SIGKILLed mid-upload, and PostgreSQL going
away behind a TCP proxy (the shared server itself is never stopped)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from reliability_support import Process, TcpProxy, free_port, start_api, wait_until
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from app.db.models import Adaptation, PendingUpload
from app.db.session import create_db_engine, create_session_factory
from app.main import create_app
from app.settings import Settings
from app.storage import create_store


def _counts(sessions: Any, team_id: str) -> tuple[int, int]:
    """(adaptations of the team, pending uploads of the team)."""
    with sessions() as session:
        adaptations = session.scalar(select(func.count()).select_from(Adaptation).where(Adaptation.team_id == team_id))
        pending = session.scalar(
            select(func.count()).select_from(PendingUpload).where(PendingUpload.prefix.startswith(f"teams/{team_id}/"))
        )
    return int(adaptations or 0), int(pending or 0)


def _post_files(port: int, team: Any, paths: list[Path]) -> None:
    """An upload of many separate images (one object each, so the store phase takes a while)."""
    files = [("images", (path.name, path.read_bytes(), "image/jpeg")) for path in paths]
    data = {"class_names": json.dumps(["banded", "blotchy"])}
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"http://127.0.0.1:{port}/adaptations", headers=team.headers, data=data, files=files, timeout=60)


def test_api_killed_during_uploads_leaves_nothing_behind(
    make_service_settings: Callable[..., Settings],
    make_team: Any,
    processes: list[Process],
    dtd_images: Any,
    tmp_path: Path,
) -> None:
    settings = make_service_settings(sweep_interval_seconds=0.5, abandoned_upload_seconds=1.0)
    engine = create_db_engine(settings)
    sessions = create_session_factory(engine)
    store = create_store(settings)
    team = make_team(sessions)
    port = free_port()

    # 1. Killed while the body is still streaming in: nothing reached the database or the store.
    api = start_api(settings, port, tmp_path / "api-1.log")
    processes.append(api)
    boundary = "reliabilityboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="class_names"\r\n\r\n["a", "b"]\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="big.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"POST /adaptations HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {team.key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {200 * 1024 * 1024}\r\n\r\n".encode()
            + head
        )
        for _ in range(32):  # 8 MiB of a promised 200 MiB
            sock.sendall(b"\0" * 256 * 1024)
        api.kill()
    assert _counts(sessions, team.id) == (0, 0)
    assert store.list(f"teams/{team.id}/") == []

    # 2. Killed after validation, while the images are being copied to the store: the pending-upload row
    #    is the only trace, and it is what lets the next API process find and delete the objects.
    for attempt in range(3):
        api = start_api(settings, port, tmp_path / f"api-2-{attempt}.log")
        processes.append(api)
        upload = threading.Thread(target=_post_files, args=(port, team, dtd_images.paths(60)), daemon=True)
        upload.start()
        deadline = time.monotonic() + 60
        while _counts(sessions, team.id)[1] == 0 and upload.is_alive() and time.monotonic() < deadline:
            time.sleep(0.002)
        api.kill()
        upload.join(10)
        adaptations, pending = _counts(sessions, team.id)
        if pending:
            break
        assert adaptations == 1, "the upload either committed or left its pending row"  # lost the race; retry
        with sessions.begin() as session:
            session.execute(Adaptation.__table__.delete().where(Adaptation.team_id == team.id))
        store.delete_prefix(f"teams/{team.id}/")
    assert _counts(sessions, team.id) == (0, 1), "no half-created adaptation"

    # 3. The next API process's sweeper deletes the abandoned objects and forgets the upload.
    api = start_api(settings, port, tmp_path / "api-3.log")
    processes.append(api)
    wait_until(lambda: _counts(sessions, team.id)[1] == 0, 30, "the sweeper to reap the upload", 0.2)
    assert store.list(f"teams/{team.id}/") == [], "no orphan objects left"
    listed = httpx.get(f"http://127.0.0.1:{port}/adaptations", headers=team.headers, timeout=10)
    assert listed.status_code == 200 and listed.json()["data"] == []
    engine.dispose()


def test_database_outage_is_503_and_heals_by_itself(
    make_service_settings: Callable[..., Settings], make_team: Any
) -> None:
    settings = make_service_settings()
    real = make_url(settings.database_url)
    proxy = TcpProxy(free_port(), (real.host or "127.0.0.1", real.port or 5432))
    proxy.up()
    proxied = settings.model_copy(
        update={"database_url": real.set(port=proxy.port).render_as_string(hide_password=False)}
    )
    engine = create_db_engine(settings)
    team = make_team(create_session_factory(engine))
    try:
        with TestClient(create_app(proxied)) as client:
            assert client.get("/adaptations", headers=team.headers).status_code == 200
            assert client.get("/readyz").status_code == 200

            proxy.down()  # every pooled connection is cut and new ones are refused
            for _ in range(3):
                response = client.get("/adaptations", headers=team.headers)
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "unavailable"
                assert int(response.headers["Retry-After"]) > 0
            assert client.get("/readyz").status_code == 503
            assert client.get("/healthz").status_code == 200

            proxy.up()  # the database is back: no restart of the API needed
            wait_until(
                lambda: client.get("/adaptations", headers=team.headers).status_code == 200, 15, "the API to recover"
            )
            assert client.get("/readyz").status_code == 200
            assert client.get(f"/adaptations/ada_{'0' * 28}", headers=team.headers).status_code == 404
    finally:
        proxy.down()
        engine.dispose()
