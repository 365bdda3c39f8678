"""The serving cache: concurrent requests share forward passes, and the cache stays within its bound."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from app.predictors import BatchingPredictor, ModelLoadsBusy, PredictorCache, predictor_bytes
from app.storage import LocalStore
from must_engine import Predictor, open_image

NAMES = ["banded", "blotchy", "braided"]


@pytest.fixture(scope="module")
def predictor(base_model: str) -> Predictor:
    return Predictor.zero_shot(base_model, NAMES, device="cpu")


def test_concurrent_requests_are_batched_and_answered_separately(predictor: Predictor, dtd_images) -> None:
    images = [open_image(path) for path in dtd_images.paths(6, classes=3)]
    expected = predictor.classify_images(images, top_k=3)
    passes: list[int] = []
    original = predictor.classify_images

    def counting(batch, top_k=5, min_score=None):
        passes.append(len(batch))
        return original(batch, top_k=top_k, min_score=min_score)

    predictor.classify_images = counting  # type: ignore[method-assign]
    batcher = BatchingPredictor(predictor, max_batch_images=64, wait_seconds=0.2)
    # each request's own min_score decides `unknown` for its images, though they share one forward pass
    min_scores = [None, 0.0, 1.0, None, 0.0, 1.0]
    try:
        start = threading.Barrier(6)
        results: dict[int, list] = {}

        def request(index: int) -> None:
            start.wait()
            results[index] = batcher.submit([images[index]], top_k=1 + index % 3,
                                            min_score=min_scores[index]).result(timeout=60)

        threads = [threading.Thread(target=request, args=(index,)) for index in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        batcher.close()
        predictor.classify_images = original  # type: ignore[method-assign]

    assert sum(passes) == 6 and len(passes) < 6, passes
    for index in range(6):
        top_k = 1 + index % 3
        (result,) = results[index]
        assert [label for label, _ in result.predictions] == [label for label, _ in expected[index].predictions[:top_k]]
        assert result.ood_score == pytest.approx(expected[index].ood_score)
        want = {None: expected[index].unknown, 0.0: False, 1.0: True}[min_scores[index]]
        assert result.unknown is want


def test_errors_reach_the_caller(predictor: Predictor) -> None:
    batcher = BatchingPredictor(predictor, max_batch_images=8, wait_seconds=0.0)
    try:
        with pytest.raises(Exception):  # noqa: B017 - whatever the model raises on a non-image
            batcher.submit(["not an image"], top_k=1).result(timeout=30)  # type: ignore[list-item]
    finally:
        batcher.close()


def test_cache_is_bounded_and_loads_once(base_model: str, tmp_path: Path) -> None:
    cache = PredictorCache(
        LocalStore(tmp_path / "objects", "b"),
        tmp_path / "cache",
        capacity=1,
        device="cpu",
        max_batch_images=8,
        wait_seconds=0.0,
    )
    first = cache.zero_shot(base_model, ["a", "b"])
    assert cache.zero_shot(base_model, ["a", "b"]) is first and cache.size == 1
    second = cache.zero_shot(base_model, ["c", "d"])
    assert second is not first and cache.size == 1
    assert cache.zero_shot(base_model, ["a", "b"]) is not first  # evicted, loaded again
    cache.clear()
    assert cache.size == 0


def _cache(tmp_path: Path, **bounds: object) -> PredictorCache:
    return PredictorCache(
        LocalStore(tmp_path / "objects", "b"),
        tmp_path / "cache",
        device="cpu",
        max_batch_images=8,
        wait_seconds=0.0,
        **bounds,  # type: ignore[arg-type]
    )


def test_cache_is_bounded_by_estimated_bytes(base_model: str, predictor: Predictor, tmp_path: Path) -> None:
    one = predictor_bytes(predictor)
    assert one > 1_000_000, "parameters and buffers of the image tower are counted"
    cache = _cache(tmp_path, capacity=10, max_bytes=int(one * 1.5))
    first = cache.zero_shot(base_model, ["a", "b"])
    second = cache.zero_shot(base_model, ["c", "d"])
    assert cache.size == 1 and cache.bytes <= int(one * 1.5), "the count allowed 10; the byte budget allows 1"
    assert cache.zero_shot(base_model, ["c", "d"]) is second
    assert cache.zero_shot(base_model, ["a", "b"]) is not first  # evicted by the budget, loaded again
    cache.clear()

    tiny = _cache(tmp_path, capacity=10, max_bytes=1)
    assert tiny.zero_shot(base_model, ["a", "b"]).submit([Image.new("RGB", (32, 32))], 1).result(timeout=60)
    assert tiny.size == 1, "the entry just loaded is kept even alone over the budget"
    tiny.clear()


def test_model_loads_are_capped_and_a_waiting_request_gives_up(
    base_model: str, predictor: Predictor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    loading: list[list[str]] = []

    def slow_zero_shot(spec: str, names: list[str], **kwargs: object) -> Predictor:
        loading.append(names)
        release.wait(60)
        return predictor

    monkeypatch.setattr(Predictor, "zero_shot", staticmethod(slow_zero_shot))
    cache = _cache(tmp_path, capacity=4, max_loads=1, load_wait_seconds=0.3)
    holder = threading.Thread(target=cache.zero_shot, args=(base_model, ["a", "b"]))
    holder.start()
    while not loading:
        time.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(ModelLoadsBusy):
        cache.zero_shot(base_model, ["c", "d"])
    assert 0.25 <= time.monotonic() - started < 5
    assert loading == [["a", "b"]], "the second build never started while the slot was taken"
    release.set()
    holder.join(60)
    assert cache.zero_shot(base_model, ["c", "d"]) and loading == [["a", "b"], ["c", "d"]]
    cache.clear()


def test_busy_model_loads_answer_503(
    make_client, team, dtd_images, predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    started = threading.Event()

    def slow_zero_shot(spec: str, names: list[str], **kwargs: object) -> Predictor:
        started.set()
        release.wait(60)
        return predictor

    monkeypatch.setattr(Predictor, "zero_shot", staticmethod(slow_zero_shot))
    image = base64.b64encode(dtd_images.paths(1)[0].read_bytes()).decode()

    def body(names: list[str]) -> dict[str, object]:
        return {"images": [image], "class_names": names}

    with make_client(max_concurrent_model_loads=1, model_load_wait_seconds=0.3) as client:
        first: list[int] = []
        holder = threading.Thread(
            target=lambda: first.append(client.post("/classify", headers=team.headers, json=body(NAMES)).status_code)
        )
        holder.start()
        assert started.wait(60)
        busy = client.post("/classify", headers=team.headers, json=body(["x", "y"]))
        release.set()
        holder.join(60)
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "busy", busy.text
    assert busy.headers["Retry-After"] == "5"
    assert first == [200]
