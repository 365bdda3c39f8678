"""Evidence for the team, end to end on PostgreSQL, Redis, the S3 server and a real Celery worker: the
bucket's predictions (pages, filters, CSV and JSONL), the label-free report, and audits against zero-shot
whose numbers are `must eval`'s; another team sees none of it."""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from app.db.models import Adaptation
from app.queue import enqueue_adaptation
from must_engine.cli import main as must

CLASSES = ["banded", "blotchy"]


@pytest.fixture(scope="module")
def adapted(stack, make_team, dtd_images) -> dict:
    team = make_team(stack.session_factory)
    paths = dtd_images.paths(16)
    created = stack.submit(team, dtd_images.zip(paths))
    done = stack.wait_final(team, created["id"])
    assert done["status"] == "succeeded", done
    names = sorted(f"{path.parent.name}/{path.name}" for path in paths)  # their paths in the uploaded zip
    return {"team": team, "adaptation_id": done["id"], "model_id": done["model_id"], "names": names}


def _get(stack, adapted, **params) -> dict:
    response = stack.client.get(f"/adaptations/{adapted['adaptation_id']}/predictions",
                                headers=adapted["team"].headers, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _all_pages(stack, adapted, **params) -> list[dict]:
    rows: list[dict] = []
    after = None
    while True:
        page = _get(stack, adapted, limit=5, **params, **({"after": after} if after else {}))
        rows += page["data"]
        if not page["has_more"]:
            return rows
        after = page["data"][-1]["image"]


def test_every_image_of_the_upload_is_labelled_by_both_models(stack, adapted) -> None:
    rows = _all_pages(stack, adapted)
    assert [row["image"] for row in rows] == adapted["names"]
    for row in rows:
        for side in ("predictions", "zero_shot"):
            scores = [p["score"] for p in row[side]]
            assert sorted(p["label"] for p in row[side]) == CLASSES and scores == sorted(scores, reverse=True)
        assert row["changed"] == (row["predictions"][0]["label"] != row["zero_shot"][0]["label"])

    events = stack.events(adapted["team"], adapted["adaptation_id"])
    stages = [e["data"] for e in events if e["type"] == "progress" and e["data"].get("stage") == "bucket_predictions"]
    assert stages[0]["done"] == 0 and stages[-1] == {"stage": "bucket_predictions", "done": 16, "total": 16}


def test_csv_and_jsonl_stream_every_row(stack, adapted) -> None:
    headers, path = adapted["team"].headers, f"/adaptations/{adapted['adaptation_id']}/predictions"
    rows = _all_pages(stack, adapted)
    as_csv = stack.client.get(path, headers=headers, params={"format": "csv"})
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [r["image"] for r in table] == adapted["names"]
    assert [r["label"] for r in table] == [r["predictions"][0]["label"] for r in rows]
    as_jsonl = stack.client.get(path, headers=headers, params={"format": "jsonl"})
    assert [json.loads(line) for line in as_jsonl.text.splitlines()] == rows

    changed = stack.client.get(path, headers=headers, params={"format": "jsonl", "changed": "true"})
    assert [json.loads(line) for line in changed.text.splitlines()] == [r for r in rows if r["changed"]]
    banded = stack.client.get(path, headers=headers, params={"format": "csv", "label": "Banded"})
    assert [r["image"] for r in csv.DictReader(io.StringIO(banded.text))] == [
        r["image"] for r in rows if r["predictions"][0]["label"] == "banded"]


def test_filters_page_over_matching_rows(stack, adapted) -> None:
    rows = _all_pages(stack, adapted)
    for label in CLASSES:
        assert _all_pages(stack, adapted, label=label) == [r for r in rows if r["predictions"][0]["label"] == label]
    median = sorted(r["predictions"][0]["score"] for r in rows)[8]
    high = _all_pages(stack, adapted, score_min=median)
    assert high == [r for r in rows if r["predictions"][0]["score"] >= median] and 0 < len(high) < 16
    assert _all_pages(stack, adapted, changed=False) == [r for r in rows if not r["changed"]]
    assert _all_pages(stack, adapted, zero_shot_label="blotchy") == [
        r for r in rows if r["zero_shot"][0]["label"] == "blotchy"]

    path, headers = f"/adaptations/{adapted['adaptation_id']}/predictions", adapted["team"].headers
    for params, code in (({"label": "zigzag"}, "unknown_class"), ({"score_min": 0.9, "score_max": 0.1}, None),
                         ({"score_min": 2}, None), ({"format": "xml"}, None), ({"format": "csv", "after": "a"}, None),
                         ({"format": "jsonl", "limit": 5}, None)):
        response = stack.client.get(path, headers=headers, params=params)
        assert response.status_code == 400, (params, response.text)
        if code:
            assert response.json()["error"]["code"] == code


def test_report_in_the_model_and_its_artifact(stack, adapted) -> None:
    team, model_id = adapted["team"], adapted["model_id"]
    report = stack.client.get(f"/models/{model_id}", headers=team.headers).json()["report"]
    rows = _all_pages(stack, adapted)
    assert report["num_images"] == 16
    assert report["changed_from_zero_shot"] == pytest.approx(sum(r["changed"] for r in rows) / 16)
    assert report["class_histogram"]["adapted"] == {
        label: sum(r["predictions"][0]["label"] == label for r in rows) for label in CLASSES}
    assert report["mean_top1_score"]["zero_shot"] == pytest.approx(
        sum(r["zero_shot"][0]["score"] for r in rows) / 16, abs=1e-5)
    estimate = report["estimated_top1"]
    assert {"adapted", "zero_shot", "estimator", "assumes", "measured_error"} <= set(estimate)
    skewed = report["estimated_top1_if_skewed"]  # the other hypothesis: classes divide as zero-shot's labels do
    zero_shot_labels = [r["zero_shot"][0]["label"] for r in rows]
    assert skewed["class_shares"] == {label: pytest.approx((zero_shot_labels.count(label) + 1) / (16 + len(CLASSES)))
                                      for label in CLASSES}
    beyond = report["beyond_balancing"]  # on every image of a bucket this small: shares of 16
    assert beyond["images"] == 16
    assert all(16 * beyond[share] == pytest.approx(round(16 * beyond[share])) for share in
               ("class_balancing", "adapted_differs"))
    archive = stack.client.get(f"/models/{model_id}/artifact", headers=team.headers)
    with zipfile.ZipFile(io.BytesIO(archive.content)) as files:
        assert json.loads(files.read(f"{model_id}/metadata.json"))["report"] == report


def _labelled_zip(paths: list[Path], folder=lambda path: path.parent.name) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in paths:
            archive.write(path, f"{folder(path)}/{path.name}" if folder(path) else path.name)
    return buffer.getvalue()


def _post_audit(stack, team, model_id: str, data: bytes):
    return stack.client.post(f"/models/{model_id}/evaluations", headers=team.headers,
                             files={"images": ("audit.zip", data, "application/zip")})


def test_audit_equals_must_eval_on_the_same_folder(
    stack, adapted, dtd_images, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    team, model_id = adapted["team"], adapted["model_id"]
    paths = dtd_images.paths(40)[16:]  # labelled images the model was not adapted on
    created = _post_audit(stack, team, model_id, _labelled_zip(paths))
    assert created.status_code == 202, created.text
    body = created.json()
    assert body["status"] == "queued" and body["n"] == 24 and body["adapted"] is None
    deadline = time.monotonic() + 120
    while (body := stack.client.get(f"/models/{model_id}/evaluations/{body['id']}", headers=team.headers).json())[
        "status"
    ] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, body
        time.sleep(0.25)
    assert body["status"] == "succeeded" and body["progress"]["fraction"] == 1.0, body
    assert stack.store.list(f"teams/{team.id}/evaluations/") == [], "audit images are deleted once scored"

    folder = tmp_path / "labelled"
    for path in paths:
        (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.parent.name / path.name)
    archive = stack.client.get(f"/models/{model_id}/artifact", headers=team.headers)
    zipfile.ZipFile(io.BytesIO(archive.content)).extractall(tmp_path)
    capsys.readouterr()
    for side, model_args in (("adapted", [str(tmp_path / model_id)]),
                             ("zero_shot", [stack.base_model, "--classes", ",".join(CLASSES)])):
        assert must(["eval", "--model", *model_args, "--data", str(folder), "--device", "cpu", "--json"]) == 0
        expected = json.loads(capsys.readouterr().out)
        assert body[side] == expected, side
        assert sum(map(sum, body[side]["confusion"])) == 24

    listed = stack.client.get(f"/models/{model_id}/evaluations", headers=team.headers).json()
    assert [e["id"] for e in listed["data"]] == [body["id"]] and listed["has_more"] is False

    # A second delivery of the same message finds the audit finished and changes nothing.
    from worker.evaluations import EvaluationRunner

    assert EvaluationRunner(stack.settings, stack.session_factory, stack.store, body["id"]).run().startswith("skipped")
    assert stack.client.get(f"/models/{model_id}/evaluations/{body['id']}", headers=team.headers).json() == body


def test_bad_audits_answer_400_and_write_nothing(stack, adapted, dtd_images) -> None:
    team, model_id = adapted["team"], adapted["model_id"]
    paths = dtd_images.paths(4)
    traversal = io.BytesIO()
    with zipfile.ZipFile(traversal, "w") as archive:
        archive.writestr("../banded/evil.png", paths[0].read_bytes())
    cases = [
        (_labelled_zip(paths, lambda p: "zigzag" if p.parent.name == "banded" else p.parent.name), "unknown_class"),
        (_labelled_zip(paths, lambda p: ""), "missing_class_folder"),
        (_labelled_zip(paths[:1]), "too_few_images"),
        (traversal.getvalue(), "unsafe_archive"),
        (_labelled_zip(paths[:2]).replace(b"JFIF", b"XXXX", 1)[:-200], "corrupt_archive"),
    ]
    for data, code in cases:
        response = _post_audit(stack, team, model_id, data)
        assert response.status_code == 400, (code, response.text)
        assert response.json()["error"]["code"] == code, response.text
    unknown = _post_audit(stack, team, model_id, cases[0][0]).json()["error"]
    assert "zigzag" in unknown["message"]
    not_zip = stack.client.post(f"/models/{model_id}/evaluations", headers=team.headers,
                                files={"images": ("a.jpg", paths[0].read_bytes(), "image/jpeg")})
    assert not_zip.status_code == 400 and not_zip.json()["error"]["code"] == "missing_field"
    listed = stack.client.get(f"/models/{model_id}/evaluations", headers=team.headers).json()["data"]
    assert all(e["status"] == "succeeded" for e in listed)  # only the good audit of the test above, if any
    assert stack.store.list(f"teams/{team.id}/evaluations/") == []


def test_a_failed_job_has_no_predictions(stack, adapted) -> None:
    team = adapted["team"]
    with stack.session_factory.begin() as session:
        row = Adaptation(team_id=team.id, request_sha256="0" * 64, class_names=CLASSES, base_model=stack.base_model,
                         config_request={}, source_bucket="no-such-bucket-here", source_prefix="")
        session.add(row)
        session.flush()
        adaptation_id = row.id
    enqueue_adaptation(stack.celery, adaptation_id)
    assert stack.wait_final(team, adaptation_id, timeout=60)["status"] == "failed"
    response = stack.client.get(f"/adaptations/{adaptation_id}/predictions", headers=team.headers)
    assert response.status_code == 409 and response.json()["error"]["code"] == "predictions_unavailable"
    assert stack.store.list(f"teams/{team.id}/adaptations/{adaptation_id}/predictions/") == []


def test_another_team_sees_no_evidence(stack, adapted, make_team, dtd_images) -> None:
    outsider = make_team(stack.session_factory)
    adaptation_id, model_id = adapted["adaptation_id"], adapted["model_id"]
    audits = stack.client.get(f"/models/{model_id}/evaluations", headers=adapted["team"].headers).json()["data"]
    probes = [f"/adaptations/{adaptation_id}/predictions", f"/adaptations/{adaptation_id}/predictions?format=csv",
              f"/models/{model_id}/evaluations"] + [f"/models/{model_id}/evaluations/{e['id']}" for e in audits]
    for path in probes:
        response = stack.client.get(path, headers=outsider.headers)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", path
    posted = _post_audit(stack, outsider, model_id, _labelled_zip(dtd_images.paths(4)))
    assert posted.status_code == 404


def test_deleting_the_model_deletes_its_audits(stack, adapted, dtd_images) -> None:
    """Last in this module: the shared model goes away. Its labels stay with the adaptation."""
    team, model_id = adapted["team"], adapted["model_id"]
    assert _post_audit(stack, team, model_id, _labelled_zip(dtd_images.paths(4))).status_code == 202
    assert stack.client.delete(f"/models/{model_id}", headers=team.headers).status_code == 204
    assert stack.client.get(f"/models/{model_id}/evaluations", headers=team.headers).status_code == 404
    deadline = time.monotonic() + 30  # a worker already scoring it deletes the images when it ends
    while stack.store.list(f"teams/{team.id}/evaluations/"):
        assert time.monotonic() < deadline, "audit images left behind"
        time.sleep(0.25)
    assert len(_all_pages(stack, adapted)) == 16
