"""Deliveries to a real receiver on 127.0.0.1 that verifies every signature with `standardwebhooks`:
once per event, retried with the same webhook-id, surviving a receiver outage and an API restart,
never following redirects, and re-checking the address before each attempt (DNS rebinding)."""

from __future__ import annotations

import ipaddress
import itertools
import json
import time
from datetime import datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from app.db.models import WebhookDelivery, utcnow
from app.db.session import create_db_engine, create_session_factory, transaction
from app.main import create_app
from app.webhooks import dispatcher, urls
from app.webhooks.outbox import claim_due


def _register(client, team, url: str, events: list[str]) -> dict:
    response = client.post("/webhooks", headers=team.headers, json={"url": url, "events": events})
    assert response.status_code == 201, response.text
    return response.json()


def _queued_adaptation(client, team, dtd_images, base_model: str) -> str:
    """An adaptation no worker will take (this world has none): it stays queued until cancelled."""
    files = {"images": ("images.zip", dtd_images.zip(dtd_images.paths(8)), "application/zip")}
    data = {"class_names": json.dumps(["banded", "blotchy"]), "base_model": base_model}
    response = client.post("/adaptations", headers=team.headers, data=data, files=files)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _cancel(client, team, adaptation_id: str) -> dict:
    response = client.post(f"/adaptations/{adaptation_id}/cancel", headers=team.headers)
    assert response.status_code == 200 and response.json()["status"] == "cancelled", response.text
    return response.json()


def _deliveries(client, team, hook_id: str) -> list[dict]:
    response = client.get(f"/webhooks/{hook_id}/deliveries", headers=team.headers)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def _wait_delivery(client, team, hook_id: str, done, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        rows = _deliveries(client, team, hook_id)
        if rows and done(rows[0]):
            return rows[0]
        assert time.monotonic() < deadline, f"delivery log: {rows}"
        time.sleep(0.05)


def test_cancelled_job_is_delivered_once_signed_and_filtered(
    webhook_client, hook_team, make_receiver, dtd_images, base_model
) -> None:
    receiver = make_receiver()
    hook = _register(webhook_client, hook_team, receiver.url, ["adaptation.cancelled"])
    receiver.secrets = [hook["secret"]]
    deaf = make_receiver()  # subscribed to another event only: must receive nothing
    _register(webhook_client, hook_team, deaf.url, ["adaptation.succeeded"])

    adaptation_id = _queued_adaptation(webhook_client, hook_team, dtd_images, base_model)
    cancelled = _cancel(webhook_client, hook_team, adaptation_id)
    (got,) = receiver.wait_for(1)
    time.sleep(1.0)  # room for a duplicate to show up
    assert len(receiver.received) == 1 and deaf.received == []
    assert got.verified, got.headers
    assert got.headers["webhook-id"].startswith("msg_")
    assert got.headers["content-type"] == "application/json"
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60
    assert got.payload["type"] == "adaptation.cancelled"
    assert got.payload["data"]["id"] == adaptation_id and got.payload["data"]["status"] == "cancelled"
    sent_finished = datetime.fromisoformat(got.payload["data"]["finished_at"])
    assert sent_finished == datetime.fromisoformat(cancelled["finished_at"])
    assert got.payload["timestamp"].endswith("Z")

    (logged,) = _deliveries(webhook_client, hook_team, hook["id"])
    assert logged["status"] == "delivered" and logged["attempts"] == 1 and logged["last_status_code"] == 200
    assert logged["event_id"] == got.headers["webhook-id"] and logged["event_type"] == "adaptation.cancelled"
    assert logged["next_attempt_at"] is None and logged["last_error"] is None and logged["response_excerpt"] == "ok"


def test_a_receiver_answering_500_twice_gets_the_third_try_with_the_same_id(
    webhook_client, hook_team, make_receiver, dtd_images, base_model
) -> None:
    receiver = make_receiver(answers=[500, 500])
    hook = _register(webhook_client, hook_team, receiver.url, ["adaptation.cancelled"])
    receiver.secrets = [hook["secret"]]
    _cancel(webhook_client, hook_team, _queued_adaptation(webhook_client, hook_team, dtd_images, base_model))

    tries = receiver.wait_for(3)
    logged = _wait_delivery(webhook_client, hook_team, hook["id"], lambda row: row["status"] == "delivered")
    time.sleep(1.0)
    assert len(receiver.received) == 3
    assert all(attempt.verified for attempt in tries)
    assert len({attempt.headers["webhook-id"] for attempt in tries}) == 1
    assert len({attempt.body for attempt in tries}) == 1
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(tries)]
    assert all(gap >= 0.3 * 0.8 - 0.05 for gap in gaps), gaps  # the backoff, not a tight loop
    assert logged["attempts"] == 3 and logged["last_status_code"] == 200


def test_a_receiver_down_for_a_while_gets_the_event_when_it_comes_back(
    webhook_client, hook_team, make_receiver, dtd_images, base_model
) -> None:
    receiver = make_receiver(start=False)
    hook = _register(webhook_client, hook_team, receiver.url, ["adaptation.cancelled"])
    receiver.secrets = [hook["secret"]]
    _cancel(webhook_client, hook_team, _queued_adaptation(webhook_client, hook_team, dtd_images, base_model))

    failing = _wait_delivery(webhook_client, hook_team, hook["id"], lambda row: row["attempts"] >= 2)
    assert failing["status"] == "pending" and failing["last_error"]["code"] == "connection_failed"
    assert failing["next_attempt_at"] is not None
    receiver.start()
    (got,) = receiver.wait_for(1)
    assert got.verified and got.headers["webhook-id"] == failing["event_id"]
    logged = _wait_delivery(webhook_client, hook_team, hook["id"], lambda row: row["status"] == "delivered")
    assert logged["attempts"] >= 3


def test_redirects_are_not_followed_and_the_delivery_is_given_up_after_the_schedule(
    webhook_client, webhook_settings, hook_team, make_receiver, dtd_images, base_model
) -> None:
    target = make_receiver()  # where the redirect points: loopback, and it must never be reached
    redirecting = make_receiver(redirect_to=f"http://127.0.0.1:{target.port}/steal")
    hook = _register(webhook_client, hook_team, redirecting.url, ["adaptation.cancelled"])
    _cancel(webhook_client, hook_team, _queued_adaptation(webhook_client, hook_team, dtd_images, base_model))

    logged = _wait_delivery(webhook_client, hook_team, hook["id"], lambda row: row["status"] == "failed", timeout=30)
    assert target.received == []
    assert logged["attempts"] == len(webhook_settings.webhook_retry_delays) + 1
    assert len(redirecting.received) == logged["attempts"]
    assert logged["last_status_code"] == 302 and logged["last_error"]["code"] == "redirect_not_followed"
    assert logged["next_attempt_at"] is None


def test_a_name_that_rebinds_inside_is_refused_before_any_connection(
    webhook_client, hook_team, dtd_images, base_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(urls, "resolve", lambda host, port: [ipaddress.ip_address("93.184.216.34")])
    hook = _register(webhook_client, hook_team, "https://hooks.example.com/x", ["adaptation.cancelled"])
    # The name now answers with the metadata address; the sender must never be called.
    monkeypatch.setattr(urls, "resolve", lambda host, port: [ipaddress.ip_address("169.254.169.254")])
    sent: list[object] = []
    monkeypatch.setattr(dispatcher, "post", lambda *args: sent.append(args))
    _cancel(webhook_client, hook_team, _queued_adaptation(webhook_client, hook_team, dtd_images, base_model))

    logged = _wait_delivery(webhook_client, hook_team, hook["id"], lambda row: row["attempts"] >= 2)
    assert sent == []
    assert logged["status"] == "pending" and logged["last_error"]["code"] == "webhook_url_not_allowed"
    assert "169.254.169.254" in logged["last_error"]["message"] and logged["last_status_code"] is None


def test_rotation_signs_with_both_secrets_during_the_grace_period(
    webhook_client, hook_team, make_receiver, dtd_images, base_model
) -> None:
    receiver = make_receiver()
    hook = _register(webhook_client, hook_team, receiver.url, ["adaptation.cancelled"])
    new = webhook_client.post(f"/webhooks/{hook['id']}/rotate-secret", headers=hook_team.headers).json()["secret"]
    _cancel(webhook_client, hook_team, _queued_adaptation(webhook_client, hook_team, dtd_images, base_model))
    (got,) = receiver.wait_for(1)
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    for secret in (hook["secret"], new):
        receiver.secrets = [secret]
        assert receiver.verify(got.body, got.headers), secret
    receiver.secrets = ["whsec_" + "A" * 44]
    assert not receiver.verify(got.body, got.headers)


def test_an_api_restart_between_commit_and_send_loses_nothing(
    make_webhook_settings, make_team, make_receiver, dtd_images, base_model
) -> None:
    """The first API process commits the cancel and dies before sending; a sender that had claimed the
    row died too. The next API process delivers it once the dead claim expires, exactly once.

    A world of its own, so no other API process's dispatcher can send in between."""
    settings = make_webhook_settings()
    engine = create_db_engine(settings)
    sessions = create_session_factory(engine)
    hook_team = make_team(sessions)
    receiver = make_receiver()
    with TestClient(create_app(settings)) as first:
        first.app.state.webhook_dispatcher.stop()  # this process will never send again
        hook = _register(first, hook_team, receiver.url, ["adaptation.cancelled"])
        receiver.secrets = [hook["secret"]]
        _cancel(first, hook_team, _queued_adaptation(first, hook_team, dtd_images, base_model))
        (pending,) = _deliveries(first, hook_team, hook["id"])
    assert pending["status"] == "pending" and pending["attempts"] == 0 and receiver.received == []

    claim_seconds = 2.0
    with transaction(sessions) as session:  # a sender that claimed it, then died mid-request
        assert pending["id"] in claim_due(session, "ghost:1:dead", claim_seconds, limit=1000)
        claimed_until = session.get_one(WebhookDelivery, pending["id"]).claimed_until
    assert claimed_until is not None and claimed_until > utcnow() + timedelta(seconds=1)

    with TestClient(create_app(settings)) as second:
        (got,) = receiver.wait_for(1, timeout=30)
        assert utcnow() >= claimed_until - timedelta(seconds=0.2), "sent while a live claim held it"
        assert got.verified and got.headers["webhook-id"] == pending["event_id"]
        logged = _wait_delivery(second, hook_team, hook["id"], lambda row: row["status"] == "delivered")
        time.sleep(1.0)
    engine.dispose()
    assert len(receiver.received) == 1 and logged["attempts"] == 1
