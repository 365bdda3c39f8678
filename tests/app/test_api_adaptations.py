"""Creating, listing, reading, cancelling adaptations over HTTP (no worker: jobs stay queued)."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Adaptation, PendingUpload
from app.storage import ObjectStore


def test_zip_upload_is_accepted_queued_and_stored(
    client: TestClient, team, upload, store: ObjectStore, session_factory: sessionmaker[Session]
) -> None:
    response = upload(team, metadata=json.dumps({"project": "x"}), config=json.dumps({"preset": "dtd", "epochs": 1}))
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued"
    assert body["class_names"] == ["banded", "blotchy"]
    assert body["num_images"] == 10
    assert body["metadata"] == {"project": "x"}
    assert body["config"]["epochs"] == 1 and body["config"]["templates"] == "dtd"
    assert body["progress"]["fraction"] == 0 and body["model_id"] is None and body["error"] is None
    keys = [info.key for info in store.list(f"teams/{team.id}/adaptations/{body['id']}/")]
    assert keys == [f"teams/{team.id}/adaptations/{body['id']}/upload/images.zip"]
    with session_factory() as session:
        row = session.get_one(Adaptation, body["id"])
        assert row.team_id == team.id and row.source_bucket == store.bucket
        assert session.get(PendingUpload, row.source_prefix) is None, "a committed upload is no longer pending"

    events = client.get(f"/adaptations/{body['id']}/events", headers=team.headers).json()
    assert [(event["type"], event["data"]) for event in events["data"]] == [("status", {"status": "queued"})]
    assert client.get(f"/adaptations/{body['id']}", headers=team.headers).json()["id"] == body["id"]


def test_a_class_prior_by_name_is_resolved_to_shares_in_class_order(client: TestClient, team, upload) -> None:
    response = upload(team, config=json.dumps({"class_prior": {"Blotchy": 1, "banded": 3}}))
    assert response.status_code == 202, response.text
    config = response.json()["config"]
    assert config["class_prior"] == [0.75, 0.25] and config["balance_classes"]
    assert client.get(f"/adaptations/{response.json()['id']}", headers=team.headers).json()["config"] == config


def test_many_image_files_and_repeated_class_name_fields(
    client: TestClient, team, dtd_images, store, base_model: str
) -> None:
    paths = dtd_images.paths(9)
    files = [("images", (path.name, path.read_bytes(), "image/jpeg")) for path in paths]
    data = {"class_names": ["banded", "  Blotchy  ", "braided"], "base_model": base_model}
    response = client.post("/adaptations", headers=team.headers, data=data, files=files)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["class_names"] == ["banded", "Blotchy", "braided"]
    assert body["num_images"] == 9
    stored = store.list(f"teams/{team.id}/adaptations/{body['id']}/upload/")
    assert len(stored) == 9
    # Objects are named by position, never by the client's filename.
    assert all(info.key.rsplit("/", 1)[1].split(".")[0].isdigit() for info in stored)


def test_list_is_paginated_newest_first(client: TestClient, team, upload) -> None:
    created = [upload(team, count=8).json()["id"] for _ in range(5)]
    seen: list[str] = []
    after = None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/adaptations", headers=team.headers, params=params).json()
        seen += [item["id"] for item in page["data"]]
        assert len(page["data"]) <= 2
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == list(reversed(created))


def test_list_rejects_bad_paging_parameters(client: TestClient, team) -> None:
    for params in ({"limit": 0}, {"limit": 101}, {"after": "not-an-id"}, {"limit": "x"}):
        response = client.get("/adaptations", headers=team.headers, params=params)
        assert response.status_code == 400, params
        assert response.json()["error"]["param"] in ("limit", "after")


def test_cancel_queued_then_409(client: TestClient, team, upload) -> None:
    adaptation_id = upload(team, count=8).json()["id"]
    response = client.post(f"/adaptations/{adaptation_id}/cancel", headers=team.headers)
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"] is not None
    again = client.post(f"/adaptations/{adaptation_id}/cancel", headers=team.headers)
    assert again.status_code == 409 and again.json()["error"]["code"] == "adaptation_finished"
    statuses = [
        event["data"]["status"]
        for event in client.get(f"/adaptations/{adaptation_id}/events", headers=team.headers).json()["data"]
        if event["type"] == "status"
    ]
    assert statuses == ["queued", "cancelled"]


def test_events_cursor(client: TestClient, team, upload) -> None:
    adaptation_id = upload(team, count=8).json()["id"]
    client.post(f"/adaptations/{adaptation_id}/cancel", headers=team.headers)
    events = client.get(f"/adaptations/{adaptation_id}/events", headers=team.headers).json()["data"]
    assert len(events) == 2 and events[0]["id"] < events[1]["id"]
    later = client.get(
        f"/adaptations/{adaptation_id}/events", headers=team.headers, params={"after": events[0]["id"]}
    ).json()
    assert [event["id"] for event in later["data"]] == [events[1]["id"]] and not later["has_more"]


def test_idempotency_key_replays_and_conflicts(
    client: TestClient, team, upload, session_factory: sessionmaker[Session]
) -> None:
    key = {"Idempotency-Key": "retry-me-1"}
    first = upload(team, count=8, headers=key)
    second = upload(team, count=8, headers=key)
    assert first.status_code == second.status_code == 202
    assert second.json()["id"] == first.json()["id"]
    assert second.headers.get("Idempotent-Replayed") == "true"
    different = upload(team, count=9, headers=key)
    assert different.status_code == 409
    assert different.json()["error"]["code"] == "idempotency_key_reused"
    with session_factory() as session:
        rows = session.scalars(
            select(Adaptation).where(Adaptation.team_id == team.id, Adaptation.idempotency_key == "retry-me-1")
        ).all()
        assert len(rows) == 1


def test_idempotency_keys_are_per_team(team, other_team, upload) -> None:
    key = {"Idempotency-Key": "shared-name"}
    mine = upload(team, count=8, headers=key).json()["id"]
    theirs = upload(other_team, count=8, headers=key).json()["id"]
    assert mine != theirs


def test_source_form_is_queued_without_image_validation(
    client: TestClient, team, source_bucket: str, base_model: str
) -> None:
    body = {
        "class_names": ["banded", "blotchy"],
        "base_model": base_model,
        "source": {"bucket": source_bucket, "prefix": "some/where"},
        "config": {"epochs": 2},
    }
    response = client.post("/adaptations", headers=team.headers, json=body)
    assert response.status_code == 202, response.text
    assert response.json()["num_images"] is None and response.json()["status"] == "queued"


def test_source_form_refuses_buckets_not_allowed(client: TestClient, team, store: ObjectStore, base_model: str) -> None:
    for bucket, code in ((store.bucket, "source_not_allowed"), ("elsewhere", "source_not_allowed")):
        body = {"class_names": ["a", "b"], "source": {"bucket": bucket, "prefix": ""}, "base_model": base_model}
        response = client.post("/adaptations", headers=team.headers, json=body)
        assert response.status_code == 400 and response.json()["error"]["code"] == code


def test_source_form_refuses_escaping_prefix(client: TestClient, team, source_bucket: str, base_model: str) -> None:
    body = {
        "class_names": ["a", "b"],
        "source": {"bucket": source_bucket, "prefix": "a/../../b"},
        "base_model": base_model,
    }
    response = client.post("/adaptations", headers=team.headers, json=body)
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "invalid_source",
        "message": "prefix must not contain '.' or '..' segments",
        "param": "source.prefix",
    }


def test_active_job_limit_answers_429(make_client, team, upload) -> None:
    with make_client(max_active_jobs_per_team=2) as limited:
        assert upload(team, count=8, via=limited).status_code == 202
        assert upload(team, count=8, via=limited).status_code == 202
        response = upload(team, count=8, via=limited)
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "too_many_active_jobs"
        assert int(response.headers["Retry-After"]) > 0
        # A finished job frees its slot.
        first = limited.get("/adaptations", headers=team.headers).json()["data"][0]["id"]
        limited.post(f"/adaptations/{first}/cancel", headers=team.headers)
        assert upload(team, count=8, via=limited).status_code == 202


def test_concurrent_requests_with_one_idempotency_key_create_one_adaptation(
    client: TestClient, team, upload, store: ObjectStore, session_factory: sessionmaker[Session]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: upload(team, count=8, headers={"Idempotency-Key": "race"}), range(4)))
    assert {response.status_code for response in responses} == {202}
    ids = {response.json()["id"] for response in responses}
    assert len(ids) == 1
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Adaptation).where(Adaptation.team_id == team.id)) == 1
        assert session.scalars(select(PendingUpload.prefix).where(PendingUpload.prefix.contains(team.id))).all() == []
    prefixes = {info.key.split("/upload/")[0] for info in store.list(f"teams/{team.id}/")}
    assert prefixes == {f"teams/{team.id}/adaptations/{ids.pop()}"}, "the losers' uploads were deleted"
