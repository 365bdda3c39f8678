"""Every parameter a caller sends is used or refused: unknown or repeated query parameters, unknown or
repeated body fields and a `top_k` that disagrees between query and body answer 400 and write nothing."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Adaptation, Model
from app.storage import ObjectStore


def _operations(client: TestClient) -> list[tuple[str, str]]:
    paths = client.get("/openapi.json").json()["paths"]
    return [
        (method.upper(), path.replace("{adaptation_id}", "ada_x").replace("{model_id}", "mdl_x"))
        for path, operations in paths.items()
        for method in operations
    ]


def _refused(response: Any, code: str, param: str) -> None:
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code, response.json()
    assert response.json()["error"]["param"] == param


def test_every_route_refuses_an_unknown_query_parameter(client: TestClient, team) -> None:
    operations = _operations(client)
    assert len(operations) >= 14, operations
    for method, path in operations:
        for headers in (team.headers, {}):  # before authentication, too
            response = client.request(method, path, params={"colour": "blue"}, headers=headers)
            _refused(response, "unknown_parameter", "colour")
            assert "colour" in response.json()["error"]["message"], (method, path)


def test_declared_query_parameters_are_in_the_openapi_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]

    def query(path: str, method: str) -> set[str]:
        return {p["name"] for p in paths[path][method].get("parameters", []) if p["in"] == "query"}

    assert query("/adaptations", "get") == {"limit", "after"}
    assert query("/adaptations/{adaptation_id}/events", "get") == {"limit", "after"}
    assert query("/models", "get") == {"limit", "after"}
    assert query("/models/{model_id}/artifact", "get") == {"presign"}
    assert query("/adaptations/{adaptation_id}/images", "get") == {"name", "size"}
    assert query("/models/{model_id}/export", "get") == {"format"}
    assert query("/models/{model_id}/classify", "post") == {"top_k", "min_score"}
    assert query("/classify", "post") == {"top_k", "min_score"}
    assert query("/adaptations", "post") == set() and query("/healthz", "get") == set()


def test_a_repeated_query_parameter_is_refused(client: TestClient, team) -> None:
    response = client.get("/adaptations?limit=1&limit=50", headers=team.headers)
    _refused(response, "duplicate_parameter", "limit")


def test_listing_parameters_work(client: TestClient, team, upload) -> None:
    created = [upload(team, count=8).json()["id"] for _ in range(2)]
    page = client.get("/adaptations", headers=team.headers, params={"limit": 1}).json()
    assert [item["id"] for item in page["data"]] == [created[1]] and page["has_more"]
    page = client.get("/adaptations", headers=team.headers, params={"after": created[1]}).json()
    assert [item["id"] for item in page["data"]] == [created[0]] and not page["has_more"]
    client.post(f"/adaptations/{created[0]}/cancel", headers=team.headers)
    events = client.get(f"/adaptations/{created[0]}/events", headers=team.headers, params={"limit": 1}).json()
    assert len(events["data"]) == 1 and events["has_more"]
    after = {"after": events["data"][0]["id"]}
    rest = client.get(f"/adaptations/{created[0]}/events", headers=team.headers, params=after).json()
    assert [event["data"]["status"] for event in rest["data"]] == ["cancelled"]


@pytest.fixture
def models(session_factory: sessionmaker[Session], store: ObjectStore, team) -> list[str]:
    """Two model rows of the team, with artifact objects (no training needed to list, presign or delete)."""
    ids = []
    with session_factory.begin() as session:
        for index in range(2):
            adaptation = Adaptation(
                team_id=team.id,
                status="succeeded",
                request_sha256="0" * 64,
                class_names=["a", "b"],
                base_model="proxy-cifar10-tiny",
                config_request={},
                source_bucket="b",
                source_prefix="p/",
            )
            session.add(adaptation)
            session.flush()
            model = Model(
                team_id=team.id,
                adaptation_id=adaptation.id,
                class_names=["a", "b"],
                base_model="proxy-cifar10-tiny",
                artifact_prefix=f"teams/{team.id}/models/m{index}/",
            )
            session.add(model)
            session.flush()
            ids.append(model.id)
    for index in range(2):
        store.put_stream(f"teams/{team.id}/models/m{index}/metadata.json", io.BytesIO(b"{}"), 2)
    return ids


def test_model_parameters_work(client: TestClient, team, models: list[str]) -> None:
    page = client.get("/models", headers=team.headers, params={"limit": 1}).json()
    assert [item["id"] for item in page["data"]] == [models[1]] and page["has_more"]
    page = client.get("/models", headers=team.headers, params={"after": models[1]}).json()
    assert [item["id"] for item in page["data"]] == [models[0]]
    presigned = client.get(f"/models/{models[0]}/artifact", headers=team.headers, params={"presign": "true"})
    assert presigned.status_code == 200 and [file["name"] for file in presigned.json()["files"]] == ["metadata.json"]


def test_refused_parameters_write_nothing(
    client: TestClient, team, upload, models: list[str], session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    response = client.post(
        "/adaptations",
        headers=team.headers,
        params={"base_model": "proxy-cifar10-tiny"},
        data={"class_names": json.dumps(["banded", "blotchy"])},
        files={"images": ("a.jpg", b"x", "image/jpeg")},
    )
    _refused(response, "unknown_parameter", "base_model")
    with session_factory() as session:
        rows = select(func.count()).select_from(Adaptation).where(Adaptation.team_id == team.id)
        assert session.scalar(rows) == len(models), "only the models' own adaptations"

    adaptation_id = upload(team, count=8).json()["id"]
    _refused(
        client.post(f"/adaptations/{adaptation_id}/cancel", headers=team.headers, params={"force": "1"}),
        "unknown_parameter",
        "force",
    )
    assert client.get(f"/adaptations/{adaptation_id}", headers=team.headers).json()["status"] == "queued"

    _refused(
        client.delete(f"/models/{models[0]}", headers=team.headers, params={"keep_files": "1"}),
        "unknown_parameter",
        "keep_files",
    )
    assert client.get(f"/models/{models[0]}", headers=team.headers).status_code == 200
    assert store.list(f"teams/{team.id}/models/m0/")


def _image_files(dtd_images: Any, count: int = 2) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (path.name, path.read_bytes(), "image/jpeg")) for path in dtd_images.paths(count)]


def test_zero_shot_top_k_from_query_form_or_json(client: TestClient, team, dtd_images, base_model: str) -> None:
    names = ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered"]
    form = {"class_names": json.dumps(names), "base_model": base_model}
    images = [base64.b64encode(path.read_bytes()).decode() for path in dtd_images.paths(2)]
    as_json = {"images": images, "class_names": names, "base_model": base_model}

    def counts(response: Any) -> list[int]:
        assert response.status_code == 200, response.text
        return [len(result["predictions"]) for result in response.json()["results"]]

    files = _image_files(dtd_images)
    assert counts(client.post("/classify", headers=team.headers, data=form, files=files)) == [5, 5]
    assert counts(client.post("/classify?top_k=3", headers=team.headers, data=form, files=files)) == [3, 3]
    assert counts(client.post("/classify", headers=team.headers, data={**form, "top_k": "2"}, files=files)) == [2, 2]
    agreeing = client.post("/classify?top_k=2", headers=team.headers, data={**form, "top_k": "2"}, files=files)
    assert counts(agreeing) == [2, 2]
    assert counts(client.post("/classify?top_k=4", headers=team.headers, json=as_json)) == [4, 4]
    assert counts(client.post("/classify", headers=team.headers, json={**as_json, "top_k": 1})) == [1, 1]

    conflict = client.post("/classify?top_k=3", headers=team.headers, data={**form, "top_k": "2"}, files=files)
    _refused(conflict, "conflicting_parameter", "top_k")
    conflict = client.post("/classify?top_k=3", headers=team.headers, json={**as_json, "top_k": 5})
    _refused(conflict, "conflicting_parameter", "top_k")  # 5 sent explicitly is not the default
    _refused(client.post("/classify?top_k=0", headers=team.headers, json=as_json), "invalid_request", "top_k")
    _refused(client.post("/classify?top_k=x", headers=team.headers, json=as_json), "invalid_request", "top_k")


def test_zero_shot_min_score_from_query_form_or_json(client: TestClient, team, dtd_images, base_model: str) -> None:
    from must_engine.unknown import DEFAULT_MIN_SCORE

    names = ["banded", "blotchy", "braided"]
    form = {"class_names": json.dumps(names), "base_model": base_model}
    images = [base64.b64encode(path.read_bytes()).decode() for path in dtd_images.paths(2)]
    as_json = {"images": images, "class_names": names, "base_model": base_model}
    files = _image_files(dtd_images)

    def decisions(response: Any) -> tuple[float, list[bool]]:
        assert response.status_code == 200, response.text
        body = response.json()
        for result in body["results"]:
            assert 0.0 <= result["ood_score"] <= 1.0
            assert result["unknown"] == (1 - result["ood_score"] < body["min_score"])
        return body["min_score"], [result["unknown"] for result in body["results"]]

    default = decisions(client.post("/classify", headers=team.headers, data=form, files=files))[0]
    assert default == pytest.approx(DEFAULT_MIN_SCORE)
    assert decisions(client.post("/classify?min_score=1", headers=team.headers, data=form, files=files)) == (
        1.0, [True, True])
    assert decisions(client.post("/classify", headers=team.headers, data={**form, "min_score": "0"}, files=files)) == (
        0.0, [False, False])
    assert decisions(client.post("/classify", headers=team.headers, json={**as_json, "min_score": 1})) == (
        1.0, [True, True])
    agreeing = client.post("/classify?min_score=0.5", headers=team.headers, json={**as_json, "min_score": 0.5})
    assert decisions(agreeing)[0] == 0.5

    conflict = client.post("/classify?min_score=0.5", headers=team.headers, json={**as_json, "min_score": 0.7})
    _refused(conflict, "conflicting_parameter", "min_score")
    for bad in ("1.5", "-0.1", "nan"):
        _refused(client.post(f"/classify?min_score={bad}", headers=team.headers, json=as_json), "invalid_request",
                 "min_score")
    bad_form = client.post("/classify", headers=team.headers, data={**form, "min_score": "high"}, files=files)
    _refused(bad_form, "invalid_request", "min_score")


def test_unknown_and_repeated_body_fields_are_named(client: TestClient, team, dtd_images, base_model: str) -> None:
    form = {"class_names": json.dumps(["a", "b"]), "base_model": base_model}
    files = _image_files(dtd_images, 1)
    unknown = client.post("/classify", headers=team.headers, data={**form, "topk": "2"}, files=files)
    _refused(unknown, "unknown_field", "topk")
    repeated = client.post("/classify", headers=team.headers, data={**form, "top_k": ["2", "3"]}, files=files)
    _refused(repeated, "duplicate_parameter", "top_k")
    body = {"images": ["aGk="], "class_names": ["a", "b"], "topk": 2}
    _refused(client.post("/classify", headers=team.headers, json=body), "unknown_field", "topk")
    raw = b'{"images": ["aGk="], "class_names": ["a", "b"], "top_k": 1, "top_k": 7}'
    response = client.post("/classify", headers={**team.headers, "Content-Type": "application/json"}, content=raw)
    _refused(response, "duplicate_parameter", "top_k")
