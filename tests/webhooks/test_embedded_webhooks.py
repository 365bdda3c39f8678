"""Webhooks on embedded defaults (SQLite, local object store, file-system broker, a generated key file):
the same delivery path as on the real services."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db.models import Webhook
from app.db.session import create_db_engine, create_session_factory
from app.main import create_app
from app.prestart import migrate
from app.settings import Settings
from app.webhooks.signing import KEY_FILE, SecretBox


def test_embedded_mode_delivers_a_signed_event(
    tmp_path: Path, webhook_overrides: dict[str, Any], make_team, make_receiver, dtd_images, base_model
) -> None:
    settings = Settings(data_dir=tmp_path, **webhook_overrides)
    assert settings.uses_sqlite and not settings.uses_s3 and settings.broker_url == "filesystem://"
    migrate(settings)
    engine = create_db_engine(settings)
    team = make_team(create_session_factory(engine))
    receiver = make_receiver()
    with TestClient(create_app(settings)) as client:
        created = client.post(
            "/webhooks", headers=team.headers, json={"url": receiver.url, "events": ["adaptation.cancelled"]}
        )
        assert created.status_code == 201, created.text
        receiver.secrets = [created.json()["secret"]]
        files = {"images": ("images.zip", dtd_images.zip(dtd_images.paths(16)), "application/zip")}
        data = {"class_names": json.dumps(["banded", "blotchy"]), "base_model": base_model}
        adaptation = client.post("/adaptations", headers=team.headers, data=data, files=files)
        assert adaptation.status_code == 202, adaptation.text
        adaptation_id = adaptation.json()["id"]
        assert client.post(f"/adaptations/{adaptation_id}/cancel", headers=team.headers).status_code == 200
        (got,) = receiver.wait_for(1)
        assert got.verified and got.payload["type"] == "adaptation.cancelled"
        assert got.payload["data"]["id"] == adaptation_id

    key_file = tmp_path / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with create_session_factory(engine)() as session:
        stored = session.scalars(select(Webhook.secret_encrypted)).one()
    # Another process on the same data directory reads the same key file and can sign.
    assert SecretBox.from_settings(Settings(data_dir=tmp_path)).decrypt(stored) == created.json()["secret"]
    engine.dispose()
