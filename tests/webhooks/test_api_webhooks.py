"""`/webhooks` over HTTP: secrets shown once and encrypted at rest, hostile URLs refused with a specific
code and nothing written, team isolation, deletion, rotation, limits."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import func, select

from app.db.models import Webhook
from app.webhooks import urls
from app.webhooks.signing import SecretBox, SecretUnreadable

EVENTS = ["adaptation.succeeded", "adaptation.failed"]


def _count(sessions, team) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Webhook).where(Webhook.team_id == team.id))


def test_create_shows_the_secret_once_and_stores_it_encrypted(
    webhook_client, webhook_settings, webhook_sessions, hook_team
) -> None:
    response = webhook_client.post(
        "/webhooks", headers=hook_team.headers, json={"url": "http://127.0.0.1:9/hooks", "events": EVENTS}
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["id"].startswith("wh_") and created["events"] == EVENTS
    assert created["secret"].startswith("whsec_")
    assert len(base64.b64decode(created["secret"].removeprefix("whsec_"))) == 32

    listed = webhook_client.get("/webhooks", headers=hook_team.headers).json()
    assert [hook["id"] for hook in listed["data"]] == [created["id"]] and listed["has_more"] is False
    assert "secret" not in listed["data"][0]
    assert "secret" not in webhook_client.get(f"/webhooks/{created['id']}", headers=hook_team.headers).json()

    with webhook_sessions() as session:
        row = session.get_one(Webhook, created["id"])
    secret_bytes = created["secret"].removeprefix("whsec_")
    assert secret_bytes not in row.secret_encrypted and created["secret"] not in row.secret_encrypted
    assert SecretBox.from_settings(webhook_settings).decrypt(row.secret_encrypted) == created["secret"]
    with pytest.raises(SecretUnreadable):  # without the server key the row is useless
        SecretBox([Fernet.generate_key()]).decrypt(row.secret_encrypted)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://hooks.example.com/x",
        "http://hooks.example.com/x",  # plain http to a host that is not allowed
        "https://127.0.0.2/x",  # loopback, but not the allowed 127.0.0.1
        "https://[::1]:8443/x",
        "https://169.254.169.254/latest/meta-data/",
        "https://10.1.2.3/x",
        "https://user:pw@hooks.example.com/x",
    ],
)
def test_hostile_urls_are_refused_and_nothing_is_written(webhook_client, webhook_sessions, hook_team, url) -> None:
    response = webhook_client.post("/webhooks", headers=hook_team.headers, json={"url": url, "events": EVENTS})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "webhook_url_not_allowed"
    assert response.json()["error"]["param"] == "url"
    assert _count(webhook_sessions, hook_team) == 0


@pytest.mark.parametrize("answers", [["10.0.0.5"], ["169.254.169.254"], ["fd00::1"], ["93.184.216.34", "10.0.0.5"]])
def test_names_that_resolve_inside_are_refused(
    webhook_client, webhook_sessions, hook_team, monkeypatch: pytest.MonkeyPatch, answers
) -> None:
    monkeypatch.setattr(urls, "resolve", lambda host, port: [ipaddress.ip_address(a) for a in answers])
    body = {"url": "https://hooks.example.com/x", "events": EVENTS}
    response = webhook_client.post("/webhooks", headers=hook_team.headers, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "webhook_url_not_allowed"
    assert _count(webhook_sessions, hook_team) == 0


def test_public_https_url_is_accepted_without_connecting(
    webhook_client, hook_team, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(urls, "resolve", lambda host, port: [ipaddress.ip_address("93.184.216.34")])
    body = {"url": "https://hooks.example.com/x", "events": EVENTS}
    response = webhook_client.post("/webhooks", headers=hook_team.headers, json=body)
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"url": "http://127.0.0.1:9/x", "events": []}, "invalid_webhook_events", "events"),
        ({"url": "http://127.0.0.1:9/x", "events": ["adaptation.exploded"]}, "unknown_webhook_event", "events.0"),
        ({"url": "http://127.0.0.1:9/x", "events": EVENTS + EVENTS[:1]}, "invalid_webhook_events", "events"),
        ({"url": "http://127.0.0.1:9/x"}, "invalid_request", "events"),
        ({"url": "http://127.0.0.1:9/x", "events": EVENTS, "secret": "mine"}, "invalid_request", "secret"),
        ({"url": 5, "events": EVENTS}, "invalid_request", "url"),
        ({"url": "https:///x", "events": EVENTS}, "invalid_webhook_url", "url"),
    ],
)
def test_bad_bodies_are_refused_with_specific_codes(
    webhook_client, webhook_sessions, hook_team, body, code, param
) -> None:
    response = webhook_client.post("/webhooks", headers=hook_team.headers, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code and response.json()["error"]["param"] == param
    assert _count(webhook_sessions, hook_team) == 0


def test_unresolvable_host_is_refused(webhook_client, hook_team, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(host: str, port: int) -> list:
        raise urls.WebhookUrlError("webhook_url_unresolvable", f"cannot resolve {host}")

    monkeypatch.setattr(urls, "resolve", fail)
    body = {"url": "https://nowhere.example.com/x", "events": EVENTS}
    response = webhook_client.post("/webhooks", headers=hook_team.headers, json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "webhook_url_unresolvable"


def test_malformed_json_is_refused(webhook_client, hook_team) -> None:
    response = webhook_client.post(
        "/webhooks", headers={**hook_team.headers, "content-type": "application/json"}, content=b"{not json"
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "malformed_json"


def test_other_teams_see_nothing(webhook_client, hook_team, hook_other_team) -> None:
    created = webhook_client.post(
        "/webhooks", headers=hook_team.headers, json={"url": "http://127.0.0.1:9/x", "events": EVENTS}
    ).json()
    hook_id = created["id"]
    other = hook_other_team.headers
    assert webhook_client.get("/webhooks", headers=other).json()["data"] == []
    for method, path in [
        ("GET", f"/webhooks/{hook_id}"),
        ("DELETE", f"/webhooks/{hook_id}"),
        ("POST", f"/webhooks/{hook_id}/rotate-secret"),
        ("GET", f"/webhooks/{hook_id}/deliveries"),
    ]:
        response = webhook_client.request(method, path, headers=other)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", (method, path)
    assert webhook_client.get(f"/webhooks/{hook_id}", headers=hook_team.headers).status_code == 200
    assert webhook_client.get("/webhooks").status_code == 401


def test_delete_and_rotate(webhook_client, webhook_settings, webhook_sessions, hook_team) -> None:
    created = webhook_client.post(
        "/webhooks", headers=hook_team.headers, json={"url": "http://127.0.0.1:9/x", "events": EVENTS}
    ).json()
    rotated = webhook_client.post(f"/webhooks/{created['id']}/rotate-secret", headers=hook_team.headers)
    assert rotated.status_code == 200
    new_secret = rotated.json()["secret"]
    assert new_secret.startswith("whsec_") and new_secret != created["secret"]
    box = SecretBox.from_settings(webhook_settings)
    with webhook_sessions() as session:
        row = session.get_one(Webhook, created["id"])
        assert box.decrypt(row.secret_encrypted) == new_secret
        assert row.previous_secret_encrypted is not None
        assert box.decrypt(row.previous_secret_encrypted) == created["secret"]

    assert webhook_client.delete(f"/webhooks/{created['id']}", headers=hook_team.headers).status_code == 204
    assert webhook_client.get(f"/webhooks/{created['id']}", headers=hook_team.headers).status_code == 404
    assert webhook_client.delete(f"/webhooks/{created['id']}", headers=hook_team.headers).status_code == 404
    assert _count(webhook_sessions, hook_team) == 0


def test_endpoints_per_team_are_limited(webhook_client, webhook_settings, hook_team) -> None:
    body = {"url": "http://127.0.0.1:9/x", "events": EVENTS}
    for _ in range(webhook_settings.max_webhooks_per_team):
        assert webhook_client.post("/webhooks", headers=hook_team.headers, json=body).status_code == 201
    refused = webhook_client.post("/webhooks", headers=hook_team.headers, json=body)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "too_many_webhooks"


def test_list_pages_and_rejects_foreign_cursors(webhook_client, hook_team) -> None:
    body = {"url": "http://127.0.0.1:9/x", "events": EVENTS}
    ids = [webhook_client.post("/webhooks", headers=hook_team.headers, json=body).json()["id"] for _ in range(3)]
    first = webhook_client.get("/webhooks", headers=hook_team.headers, params={"limit": 2}).json()
    assert [hook["id"] for hook in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    rest = webhook_client.get("/webhooks", headers=hook_team.headers, params={"limit": 2, "after": ids[1]}).json()
    assert [hook["id"] for hook in rest["data"]] == [ids[0]] and rest["has_more"] is False
    bad = webhook_client.get("/webhooks", headers=hook_team.headers, params={"after": "ada_" + "0" * 28})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cursor"
