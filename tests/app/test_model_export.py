"""`GET /models/{id}/export?format=onnx`: the team's adapted model as one ONNX file that classifies as the
service does; other teams' models stay hidden and unknown formats are refused by name."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Adaptation, Model
from app.db.session import transaction
from app.storage import ObjectStore
from must_engine import DEFAULT_BASE_MODEL, open_image
from must_engine.artifact import save_artifact
from must_engine.base_models import load_base_model
from must_engine.onnx_export import INPUT_NAME, pixels_for_onnx
from must_engine.predictor import Predictor

ort = pytest.importorskip("onnxruntime")
CLASSES = ["banded", "blotchy", "braided"]


@pytest.fixture
def stored_model(session_factory: sessionmaker[Session], store: ObjectStore, team, tmp_path: Path) -> str:
    """A real artifact (the proxy's zero-shot head) in the object store, with its rows."""
    predictor = Predictor.zero_shot(DEFAULT_BASE_MODEL, CLASSES, device="cpu")
    directory = tmp_path / "artifact"
    save_artifact(
        directory, predictor.classifier, class_names=CLASSES, base_model=DEFAULT_BASE_MODEL,
        model_cfg=load_base_model(DEFAULT_BASE_MODEL).model_cfg, preprocess=predictor.preprocess_config,
        config={}, metrics={}, exported="teacher",
    )  # fmt: skip
    with transaction(session_factory) as session:
        adaptation = Adaptation(
            team_id=team.id, status="succeeded", request_sha256="0" * 64, class_names=CLASSES,
            base_model=DEFAULT_BASE_MODEL, config_request={}, source_bucket="b", source_prefix="p/",
        )  # fmt: skip
        session.add(adaptation)
        session.flush()
        prefix = f"teams/{team.id}/models/{adaptation.id}/"
        model = Model(
            team_id=team.id, adaptation_id=adaptation.id, class_names=CLASSES, base_model=DEFAULT_BASE_MODEL,
            artifact_prefix=prefix,
        )  # fmt: skip
        session.add(model)
        session.flush()
        model_id = model.id
    for path in directory.iterdir():
        store.put_stream(prefix + path.name, io.BytesIO(path.read_bytes()), path.stat().st_size)
    return model_id


def test_export_is_an_onnx_file_that_classifies_as_the_service(
    client: TestClient, team, stored_model: str, dtd_images
) -> None:
    response = client.get(f"/models/{stored_model}/export", headers=team.headers, params={"format": "onnx"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/onnx"
    assert f"{stored_model}.onnx" in response.headers["content-disposition"]
    session = ort.InferenceSession(response.content, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["must.class_names"]) == CLASSES
    assert json.loads(meta["must.metadata"])["model_id"] == stored_model
    photo = dtd_images.paths(1)[0]
    (probs,) = session.run(
        None, {INPUT_NAME: pixels_for_onnx([open_image(photo)], json.loads(meta["must.preprocess"])["size"])}
    )
    served = client.post(
        f"/models/{stored_model}/classify", headers=team.headers, files={"images": (photo.name, photo.read_bytes())},
        data={"top_k": "3"},
    ).json()["results"][0]["predictions"]  # fmt: skip
    by_label = {row["label"]: row["score"] for row in served}
    np.testing.assert_allclose(
        [probs[0][CLASSES.index(label)] for label in by_label], list(by_label.values()), rtol=0, atol=2e-6
    )


def test_export_refuses_other_formats_and_other_teams(client: TestClient, team, other_team, stored_model: str) -> None:
    refused = client.get(f"/models/{stored_model}/export", headers=team.headers, params={"format": "tflite"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "format"
    hidden = client.get(f"/models/{stored_model}/export", headers=other_team.headers)
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found"
