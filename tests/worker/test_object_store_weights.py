"""Base-model weights named as `ARCH:s3://bucket/key`: fetched through the service's object-store client
by the worker and by zero-shot `/classify`, cached per URI, and only from buckets the service may read."""

from __future__ import annotations

import io
import json
import secrets
from pathlib import Path

import pytest

from app.settings import DEFAULT_BASE_MODEL_ARCHITECTURES
from app.weights import WEIGHTS_PREFIX, WeightsFetcher, WeightsUnavailable
from must_engine.base_models import SHIPPED_DIR

PROXY = SHIPPED_DIR / "proxy-cifar10-tiny"



@pytest.fixture(scope="module")
def stack_overrides(proxy_arch: str) -> dict[str, object]:
    """The deployment serves the registered proxy architecture (MUST_BASE_MODEL_ARCHITECTURES)."""
    return {"base_model_architectures": [*DEFAULT_BASE_MODEL_ARCHITECTURES, proxy_arch]}


@pytest.fixture(scope="module")
def weights_uri(stack, source_bucket: str) -> str:
    weights = PROXY / "open_clip_model.safetensors"
    key = f"weights/{secrets.token_hex(4)}/proxy.safetensors"
    stack.store.for_bucket(source_bucket).put_file(key, weights)
    return f"s3://{source_bucket}/{key}"


def _classify(stack, team, dtd_images, base_model: str):
    files = [("images", (path.name, path.read_bytes(), "image/jpeg")) for path in dtd_images.paths(4)]
    data = {"class_names": json.dumps(["banded", "blotchy"]), "base_model": base_model, "top_k": "2"}
    return stack.client.post("/classify", headers=team.headers, data=data, files=files)


def test_fetcher_caches_per_uri_and_refuses_other_buckets(stack, weights_uri: str, source_bucket: str) -> None:
    fetcher = WeightsFetcher(stack.store, stack.settings)
    first = fetcher(weights_uri)
    assert first == fetcher.path_for(weights_uri) and first.suffix == ".safetensors"
    assert first.read_bytes() == (PROXY / "open_clip_model.safetensors").read_bytes()
    assert first.is_relative_to(stack.settings.data_dir / "weights")

    # The cached file is reused: the object can vanish and the fetch still answers, without downloading.
    bucket, key = weights_uri.removeprefix("s3://").split("/", 1)
    copy_key = f"{key}.copy"
    source = stack.store.for_bucket(bucket)
    source.put_stream(copy_key, io.BytesIO(b"x" * 10), 10)
    copy_uri = f"s3://{bucket}/{copy_key}"
    cached = fetcher(copy_uri)
    source.delete_prefix(copy_key)
    assert fetcher(copy_uri) == cached and cached.read_bytes() == b"x" * 10

    own = stack.settings.s3_bucket
    for refused in (
        "s3://some-other-bucket/weights.safetensors",  # not a bucket the service may read
        f"s3://{own}/teams/t/models/m/model.safetensors",  # the service bucket outside base-models/
        f"s3://{source_bucket}/a/../../etc/passwd",  # traversal
        f"s3://{source_bucket}/",
    ):
        with pytest.raises(WeightsUnavailable):
            fetcher(refused)
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        fetcher(f"s3://{own}/{WEIGHTS_PREFIX}missing.safetensors")
    assert not list((stack.settings.data_dir / "weights").rglob("*.part")), "no partial downloads left"


def test_unreadable_weights_bucket_is_a_400(stack, team, dtd_images, proxy_arch: str) -> None:
    spec = f"{proxy_arch}:s3://some-other-bucket/proxy.safetensors"
    response = _classify(stack, team, dtd_images, spec)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "weights_unavailable"
    assert response.json()["error"]["param"] == "base_model"
    data = {"class_names": json.dumps(["banded", "blotchy"]), "base_model": spec}
    files = {"images": ("images.zip", dtd_images.zip(dtd_images.paths(16)), "application/zip")}
    created = stack.client.post("/adaptations", headers=team.headers, data=data, files=files)
    assert created.status_code == 400 and created.json()["error"]["code"] == "weights_unavailable"
    assert stack.client.get("/adaptations", headers=team.headers).json()["data"] == []


def test_job_and_zero_shot_use_object_store_weights(
    stack, team, dtd_images, tiny_config, proxy_arch: str, weights_uri: str
) -> None:
    spec = f"{proxy_arch}:{weights_uri}"
    # Zero-shot with the fetched weights equals zero-shot with the shipped proxy: the same weights were loaded.
    fetched = _classify(stack, team, dtd_images, spec)
    shipped = _classify(stack, team, dtd_images, "proxy-cifar10-tiny")
    assert fetched.status_code == 200, fetched.text
    for ours, reference in zip(fetched.json()["results"], shipped.json()["results"], strict=True):
        assert [p["label"] for p in ours["predictions"]] == [p["label"] for p in reference["predictions"]]
        for p, q in zip(ours["predictions"], reference["predictions"], strict=True):
            assert p["score"] == pytest.approx(q["score"], abs=1e-5)

    data = {"class_names": json.dumps(["banded", "blotchy"]), "base_model": spec, "config": json.dumps(tiny_config)}
    files = {"images": ("images.zip", dtd_images.zip(dtd_images.paths(16)), "application/zip")}
    response = stack.client.post("/adaptations", headers=team.headers, data=data, files=files)
    assert response.status_code == 202, response.text
    done = stack.wait_final(team, response.json()["id"], timeout=120)
    assert done["status"] == "succeeded", done
    model = stack.client.get(f"/models/{done['model_id']}", headers=team.headers).json()
    assert model["base_model"] == spec, "the model names the real source of its weights"
    assert Path(WeightsFetcher(stack.store, stack.settings).path_for(weights_uri)).is_file()
