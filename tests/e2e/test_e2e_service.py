"""End to end over HTTP on PostgreSQL, Redis, the S3 server and a real Celery worker: a team uploads real
DTD photos, the job trains, the team classifies, downloads and deletes the model; another team sees none
of it on any route."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import pytest

from must_engine import Predictor


@pytest.fixture(scope="module")
def adapted(stack, make_team, dtd_images) -> dict:
    """One finished adaptation shared by the tests of this module (training once keeps CI fast)."""
    team = make_team(stack.session_factory)
    created = stack.submit(team, dtd_images.zip(dtd_images.paths(16)), metadata=json.dumps({"ticket": "T-1"}))
    done = stack.wait_final(team, created["id"])
    assert done["status"] == "succeeded", done
    return {"team": team, "adaptation": done, "model_id": done["model_id"]}


def test_classify_with_the_adapted_model(stack, adapted, dtd_images) -> None:
    team, model_id = adapted["team"], adapted["model_id"]
    paths = dtd_images.paths(3, classes=3)
    files = [("images", (path.name, path.read_bytes(), "image/jpeg")) for path in paths]
    response = stack.client.post(f"/models/{model_id}/classify", headers=team.headers, files=files, data={"top_k": "2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == model_id
    assert [result["index"] for result in body["results"]] == [0, 1, 2]
    assert [result["filename"] for result in body["results"]] == [path.name for path in paths]
    for result in body["results"]:
        scores = [prediction["score"] for prediction in result["predictions"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True)
        assert {prediction["label"] for prediction in result["predictions"]} == {"banded", "blotchy"}
        assert 0.99 < sum(scores) <= 1.0001

    encoded = [base64.b64encode(path.read_bytes()).decode() for path in paths]
    as_json = stack.client.post(
        f"/models/{model_id}/classify", headers=team.headers, json={"images": encoded, "top_k": 1}
    ).json()
    assert [len(result["predictions"]) for result in as_json["results"]] == [1, 1, 1]
    assert [result["predictions"][0]["label"] for result in as_json["results"]] == [
        result["predictions"][0]["label"] for result in body["results"]
    ]
    assert all(result["filename"] is None for result in as_json["results"])

    # top_k in the query string works too (it used to be dropped, answering the default); a body disagreeing is refused.
    url = f"/models/{model_id}/classify?top_k=1"
    from_query = stack.client.post(url, headers=team.headers, files=files).json()
    assert [len(result["predictions"]) for result in from_query["results"]] == [1, 1, 1]
    conflict = stack.client.post(url, headers=team.headers, files=files, data={"top_k": "2"})
    assert conflict.status_code == 400 and conflict.json()["error"]["code"] == "conflicting_parameter"


def test_cancel_after_success_is_409(stack, adapted) -> None:
    team, adaptation = adapted["team"], adapted["adaptation"]
    response = stack.client.post(f"/adaptations/{adaptation['id']}/cancel", headers=team.headers)
    assert response.status_code == 409 and response.json()["error"]["code"] == "adaptation_finished"
    assert stack.client.get(f"/adaptations/{adaptation['id']}", headers=team.headers).json()["status"] == "succeeded"


def test_classify_rejects_bad_images_and_top_k(stack, adapted) -> None:
    team, model_id = adapted["team"], adapted["model_id"]
    bad = stack.client.post(
        f"/models/{model_id}/classify",
        headers=team.headers,
        json={"images": [base64.b64encode(b"not an image").decode()]},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "images.0"
    assert bad.json()["error"]["code"] == "unsupported_format"
    not_base64 = stack.client.post(f"/models/{model_id}/classify", headers=team.headers, json={"images": ["%%%"]})
    assert not_base64.json()["error"]["code"] == "invalid_base64"
    for top_k in (0, 1000):
        response = stack.client.post(
            f"/models/{model_id}/classify",
            headers=team.headers,
            json={"images": [base64.b64encode(b"x").decode()], "top_k": top_k},
        )
        assert response.status_code == 400 and response.json()["error"]["param"] == "top_k"


def test_zero_shot_baseline(stack, adapted, dtd_images) -> None:
    team = adapted["team"]
    path = dtd_images.paths(1)[0]
    response = stack.client.post(
        "/classify",
        headers=team.headers,
        files=[("images", (path.name, path.read_bytes(), "image/jpeg"))],
        data={"class_names": json.dumps(["banded", "blotchy", "braided"]), "base_model": stack.base_model},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] is None and body["base_model"] == stack.base_model
    assert {p["label"] for p in body["results"][0]["predictions"]} == {"banded", "blotchy", "braided"}
    unknown = stack.client.post(
        "/classify",
        headers=team.headers,
        json={
            "images": [base64.b64encode(path.read_bytes()).decode()],
            "class_names": ["a", "b"],
            "base_model": "nope",
        },
    )
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_base_model"


def test_artifact_download_is_a_loadable_model(stack, adapted, tmp_path: Path, dtd_images) -> None:
    team, model_id = adapted["team"], adapted["model_id"]
    response = stack.client.get(f"/models/{model_id}/artifact", headers=team.headers)
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert sorted(archive.namelist()) == [f"{model_id}/metadata.json", f"{model_id}/model.safetensors"]
        archive.extractall(tmp_path)
    predictor = Predictor.load(tmp_path / model_id, device="cpu")
    assert predictor.class_names == ["banded", "blotchy"]
    from must_engine import open_image

    assert len(predictor.classify([open_image(dtd_images.paths(1)[0])], top_k=1)[0]) == 1

    presigned = stack.client.get(f"/models/{model_id}/artifact", headers=team.headers, params={"presign": True})
    assert presigned.status_code == 200
    files = {item["name"]: item["url"] for item in presigned.json()["files"]}
    assert set(files) == {"metadata.json", "model.safetensors"}
    import httpx

    metadata = httpx.get(files["metadata.json"]).json()
    assert metadata["class_names"] == ["banded", "blotchy"]


def test_another_team_sees_nothing(stack, adapted, make_team, dtd_images) -> None:
    owner, outsider = adapted["team"], make_team(stack.session_factory)
    adaptation_id, model_id = adapted["adaptation"]["id"], adapted["model_id"]
    image = dtd_images.paths(1)[0]
    upload = {"files": [("images", (image.name, image.read_bytes(), "image/jpeg"))]}
    probes = [
        ("GET", f"/adaptations/{adaptation_id}", {}),
        ("GET", f"/adaptations/{adaptation_id}/events", {}),
        ("POST", f"/adaptations/{adaptation_id}/cancel", {}),
        ("GET", f"/models/{model_id}", {}),
        ("GET", f"/models/{model_id}/artifact", {}),
        ("GET", f"/models/{model_id}/artifact?presign=true", {}),
        ("POST", f"/models/{model_id}/classify", upload),
        ("DELETE", f"/models/{model_id}", {}),
    ]
    for method, path, extra in probes:
        response = stack.client.request(method, path, headers=outsider.headers, **extra)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"
    for listing in ("/adaptations", "/models"):
        assert stack.client.get(listing, headers=outsider.headers).json()["data"] == []
    # ...and the owner still has everything.
    assert stack.client.get(f"/models/{model_id}", headers=owner.headers).status_code == 200


def test_models_list_and_delete(stack, adapted, dtd_images) -> None:
    team, model_id = adapted["team"], adapted["model_id"]
    listed = stack.client.get("/models", headers=team.headers).json()
    assert [model["id"] for model in listed["data"]] == [model_id] and listed["has_more"] is False
    prefix = f"teams/{team.id}/models/{model_id}/"
    assert stack.store.list(prefix)
    assert stack.client.delete(f"/models/{model_id}", headers=team.headers).status_code == 204
    assert stack.store.list(prefix) == []
    assert stack.client.get(f"/models/{model_id}", headers=team.headers).status_code == 404
    path = dtd_images.paths(1)[0]
    gone = stack.client.post(
        f"/models/{model_id}/classify",
        headers=team.headers,
        files=[("images", (path.name, path.read_bytes(), "image/jpeg"))],
    )
    assert gone.status_code == 404
    # The adaptation keeps its history.
    assert (
        stack.client.get(f"/adaptations/{adapted['adaptation']['id']}", headers=team.headers).json()["model_id"]
        == model_id
    )
