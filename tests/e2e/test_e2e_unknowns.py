"""A bucket with images of no known class, end to end on PostgreSQL, Redis, the S3 server and a real Celery
worker: every bucket prediction carries `ood_score` and `unknown` under the threshold fitted on that bucket,
the `unknown` filter and the CSV agree with the rows, the artifact keeps the threshold, and classifying the
same image with the adapted model gives the same decision unless `min_score` overrides it."""

from __future__ import annotations

import csv
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

CLASSES = ["banded", "blotchy"]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _unknown_images() -> dict[str, bytes]:
    """Flat colours and noise: no texture class at all (PNG, so every decoder sees the same pixels)."""
    rng = np.random.default_rng(0)
    images = {f"other/flat-{i}.png": _png(np.full((64, 64, 3), rng.integers(0, 256, 3))) for i in range(4)}
    images |= {f"other/noise-{i}.png": _png(rng.integers(0, 256, (64, 64, 3))) for i in range(4)}
    return images


@pytest.fixture(scope="module")
def adapted(stack, make_team, dtd_images) -> dict:
    team = make_team(stack.session_factory)
    unknown = _unknown_images()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in dtd_images.paths(16):
            archive.write(path, f"{path.parent.name}/{path.name}")
        for name, data in unknown.items():
            archive.writestr(name, data)
    created = stack.submit(team, buffer.getvalue())
    done = stack.wait_final(team, created["id"])
    assert done["status"] == "succeeded", done
    return {"team": team, "adaptation_id": done["id"], "model_id": done["model_id"], "unknown": unknown}


def _rows(stack, adapted, **params) -> list[dict]:
    response = stack.client.get(f"/adaptations/{adapted['adaptation_id']}/predictions",
                                headers=adapted["team"].headers, params={"format": "jsonl", **params})
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def test_bucket_rows_carry_the_decision_under_the_bucket_threshold(stack, adapted) -> None:
    team, model_id = adapted["team"], adapted["model_id"]
    rows = _rows(stack, adapted)
    assert len(rows) == 24
    report = stack.client.get(f"/models/{model_id}", headers=team.headers).json()["report"]
    threshold = report["unknown"]["threshold"]
    for row in rows:
        assert 0.0 <= row["ood_score"] <= 1.0
        assert row["unknown"] == (row["ood_score"] > threshold)
    assert report["unknown"]["share"] == pytest.approx(sum(r["unknown"] for r in rows) / 24)
    bins = [min(int(r["ood_score"] * 20), 19) for r in rows]  # the report's 20 equal bins of [0, 1]
    assert report["unknown"]["histogram"] == [bins.count(i) for i in range(20)]
    assert any(r["unknown"] for r in rows), "a fitted threshold flags at least the top 1% of its bucket"

    # the threshold is the one fitted at adaptation time and stored in the artifact's metadata
    archive = stack.client.get(f"/models/{model_id}/artifact", headers=team.headers)
    with zipfile.ZipFile(io.BytesIO(archive.content)) as files:
        metadata = json.loads(files.read(f"{model_id}/metadata.json"))
    assert metadata["unknown"]["threshold"] == threshold and metadata["unknown"]["score"] == "entropy"

    # the filter and the CSV say the same as the rows
    assert _rows(stack, adapted, unknown="true") == [r for r in rows if r["unknown"]]
    assert _rows(stack, adapted, unknown="false") == [r for r in rows if not r["unknown"]]
    page = stack.client.get(f"/adaptations/{adapted['adaptation_id']}/predictions", headers=team.headers,
                            params={"unknown": "false", "limit": 100}).json()
    assert page["data"] == [r for r in rows if not r["unknown"]]
    table = stack.client.get(f"/adaptations/{adapted['adaptation_id']}/predictions", headers=team.headers,
                             params={"format": "csv"})
    parsed = list(csv.DictReader(io.StringIO(table.text)))
    assert [(r["image"], r["unknown"]) for r in parsed] == [(r["image"], str(r["unknown"]).lower()) for r in rows]
    assert [float(r["ood_score"]) for r in parsed] == pytest.approx([r["ood_score"] for r in rows], abs=1e-6)


def test_classify_gives_the_bucket_decision_and_min_score_overrides_it(stack, adapted) -> None:
    team, model_id = adapted["team"], adapted["model_id"]
    rows = {row["image"]: row for row in _rows(stack, adapted)}
    names = sorted(adapted["unknown"])
    files = [("images", (name.split("/")[-1], adapted["unknown"][name], "image/png")) for name in names]
    served = stack.client.post(f"/models/{model_id}/classify", headers=team.headers, files=files)
    assert served.status_code == 200, served.text
    body = served.json()
    threshold = stack.client.get(f"/models/{model_id}", headers=team.headers).json()["report"]["unknown"]["threshold"]
    assert body["min_score"] == pytest.approx(1 - threshold)
    for name, result in zip(names, body["results"], strict=True):
        assert result["ood_score"] == pytest.approx(rows[name]["ood_score"], abs=1e-5)
        assert result["unknown"] == rows[name]["unknown"]

    everything = stack.client.post(f"/models/{model_id}/classify?min_score=1", headers=team.headers, files=files)
    assert [r["unknown"] for r in everything.json()["results"]] == [True] * len(names)
    nothing = stack.client.post(f"/models/{model_id}/classify", headers=team.headers, files=files,
                                data={"min_score": "0"})
    assert [r["unknown"] for r in nothing.json()["results"]] == [False] * len(names)
    assert [r["ood_score"] for r in nothing.json()["results"]] == [r["ood_score"] for r in body["results"]]
