"""The serving cache: concurrent requests share forward passes, and the cache stays within its bound."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from app.predictors import BatchingPredictor, PredictorCache
from app.storage import LocalStore
from must_engine import Predictor, open_image

NAMES = ["banded", "blotchy", "braided"]


@pytest.fixture(scope="module")
def predictor(base_model: str) -> Predictor:
    return Predictor.zero_shot(base_model, NAMES, device="cpu")


def test_concurrent_requests_are_batched_and_answered_separately(predictor: Predictor, dtd_images) -> None:
    images = [open_image(path) for path in dtd_images.paths(6, classes=3)]
    expected = predictor.classify(images, top_k=3)
    passes: list[int] = []
    original = predictor.classify

    def counting(batch, top_k=5):
        passes.append(len(batch))
        return original(batch, top_k=top_k)

    predictor.classify = counting  # type: ignore[method-assign]
    batcher = BatchingPredictor(predictor, max_batch_images=64, wait_seconds=0.2)
    try:
        start = threading.Barrier(6)
        results: dict[int, list] = {}

        def request(index: int) -> None:
            start.wait()
            results[index] = batcher.submit([images[index]], top_k=1 + index % 3).result(timeout=60)

        threads = [threading.Thread(target=request, args=(index,)) for index in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        batcher.close()
        predictor.classify = original  # type: ignore[method-assign]

    assert sum(passes) == 6 and len(passes) < 6, passes
    for index in range(6):
        top_k = 1 + index % 3
        assert [label for label, _ in results[index][0]] == [label for label, _ in expected[index][:top_k]]


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
