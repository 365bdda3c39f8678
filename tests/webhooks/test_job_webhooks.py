"""Webhooks from real jobs: a real Celery worker trains tiny jobs; succeeded, failed and cancelled jobs
each reach the receiver once, recorded by the worker (or the API) in the transaction of the change."""

from __future__ import annotations

import io
import time
from collections import Counter
from typing import Any

import pytest

EVENTS = ["adaptation.running", "adaptation.succeeded", "adaptation.failed", "adaptation.cancelled"]


@pytest.fixture(scope="module")
def stack_overrides(webhook_overrides: dict[str, Any]) -> dict[str, Any]:
    return webhook_overrides


def test_succeeded_failed_and_cancelled_jobs_each_deliver_once(
    stack, team, make_receiver, dtd_images, source_bucket, tiny_config
) -> None:
    receiver = make_receiver()
    response = stack.client.post("/webhooks", headers=team.headers, json={"url": receiver.url, "events": EVENTS})
    assert response.status_code == 201, response.text
    receiver.secrets = [response.json()["secret"]]

    succeeding = stack.submit(team, dtd_images.zip(dtd_images.paths(16)))["id"]
    source = stack.store.for_bucket(source_bucket)
    prefix = f"{team.id}/broken/"
    for index, path in enumerate(dtd_images.paths(16)):
        source.put_stream(f"{prefix}{index:03d}.jpg", io.BytesIO(path.read_bytes()), path.stat().st_size)
    source.put_stream(f"{prefix}zzz.jpg", io.BytesIO(b"not an image"), 12)
    body = {
        "class_names": ["banded", "blotchy"],
        "base_model": stack.base_model,
        "source": {"bucket": source_bucket, "prefix": prefix},
    }
    failing = stack.client.post("/adaptations", headers=team.headers, json={**body, "config": tiny_config})
    assert failing.status_code == 202, failing.text
    failing_id = failing.json()["id"]
    long_job = {**tiny_config, "epochs": 200, "checkpoint_every": 50}
    cancelling = stack.submit(team, dtd_images.zip(dtd_images.paths(16)), config=long_job)["id"]

    assert stack.wait_final(team, succeeding)["status"] == "succeeded"
    assert stack.wait_final(team, failing_id)["status"] == "failed"
    stack.wait_for(team, cancelling, lambda job: job["status"] == "running")
    assert stack.client.post(f"/adaptations/{cancelling}/cancel", headers=team.headers).status_code == 200
    assert stack.wait_final(team, cancelling, timeout=60)["status"] == "cancelled"

    receiver.wait_for(5, timeout=30)  # running x2, succeeded, failed, cancelled
    time.sleep(2.0)  # room for duplicates to show up
    got = Counter((r.payload["data"]["id"], r.payload["type"]) for r in receiver.received)
    assert got == {
        (succeeding, "adaptation.running"): 1,
        (succeeding, "adaptation.succeeded"): 1,
        (failing_id, "adaptation.failed"): 1,  # failed while validating: it never ran
        (cancelling, "adaptation.running"): 1,
        (cancelling, "adaptation.cancelled"): 1,
    }
    assert all(r.verified for r in receiver.received)
    by_type = {(r.payload["data"]["id"], r.payload["type"]): r.payload["data"] for r in receiver.received}
    assert by_type[(succeeding, "adaptation.succeeded")]["model_id"]
    assert by_type[(failing_id, "adaptation.failed")]["error"]["code"] in ("unsupported_format", "corrupt_image")
    assert by_type[(cancelling, "adaptation.cancelled")]["model_id"] is None
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 5


def test_a_finished_audit_delivers_evaluation_succeeded_once(stack, team, make_receiver, dtd_images) -> None:
    receiver = make_receiver()
    response = stack.client.post("/webhooks", headers=team.headers,
                                 json={"url": receiver.url, "events": ["evaluation.succeeded"]})
    assert response.status_code == 201, response.text
    receiver.secrets = [response.json()["secret"]]
    job = stack.wait_final(team, stack.submit(team, dtd_images.zip(dtd_images.paths(16)))["id"])
    assert job["status"] == "succeeded"
    labelled = {"images": ("audit.zip", dtd_images.zip(dtd_images.paths(6)), "application/zip")}
    posted = stack.client.post(f"/models/{job['model_id']}/evaluations", headers=team.headers, files=labelled)
    assert posted.status_code in (200, 201, 202), posted.text
    evaluation = posted.json()["id"]

    receiver.wait_for(1, timeout=60)
    time.sleep(2.0)  # room for a duplicate to show up
    assert [(r.payload["type"], r.payload["data"]["id"]) for r in receiver.received] == [
        ("evaluation.succeeded", evaluation)
    ]
    data = receiver.received[0].payload["data"]
    assert receiver.received[0].verified and data["status"] == "succeeded" and data["n"] == 6
