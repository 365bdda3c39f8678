"""Serving-side model cache: a bounded LRU of loaded predictors, each with a micro-batcher.

Adapted models are downloaded from the object store once and kept loaded (on the GPU when there is
one); zero-shot predictors are cached by (base model, class names). Concurrent classify requests for
the same model are merged into one forward pass by the predictor's batcher thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from PIL.Image import Image

from app.storage import ObjectStore, download_prefix
from must_engine import Predictor
from must_engine.predictor import Classification
from must_engine.unknown import threshold_from_min_score

log = logging.getLogger(__name__)

Predictions = list[Classification]


@dataclass
class _Request:
    images: Sequence[Image]
    top_k: int
    min_score: float | None
    future: Future[Predictions] = field(default_factory=Future)


class BatchingPredictor:
    """Runs one predictor on a daemon thread, merging queued requests into batches.

    Waiting up to `wait_seconds` after a batch's first request lets concurrent requests join its forward
    pass; results are computed at the largest requested k and cut back per request, and a request's
    `min_score` decides its own images' `unknown` from their ood_score.
    """

    def __init__(self, predictor: Predictor, *, max_batch_images: int, wait_seconds: float) -> None:
        self.predictor = predictor
        self.max_batch_images = max_batch_images
        self.wait_seconds = wait_seconds
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="predictor-batcher", daemon=True)
        self._thread.start()

    @property
    def class_names(self) -> list[str]:
        return self.predictor.class_names

    @property
    def min_score(self) -> float:
        """The top-1 score below which an image is unknown when a request does not say: the model's threshold."""
        return 1.0 - self.predictor.unknown_threshold

    def submit(self, images: Sequence[Image], top_k: int, min_score: float | None = None) -> Future[Predictions]:
        request = _Request(images, top_k, min_score)
        self._queue.put(request)
        return request.future

    def close(self) -> None:
        self._queue.put(None)

    def _serve(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            size = len(first.images)
            stop = False
            # One window per batch, from its first request: waiting `wait_seconds` after *each* arrival let
            # a trickle of requests (a busy event loop hands them over one by one) hold the forward back for
            # up to max_batch_images windows while the model sat idle. What is queued is always taken.
            deadline = time.monotonic() + self.wait_seconds
            while size < self.max_batch_images:
                remaining = deadline - time.monotonic()
                try:
                    request = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if request is None:
                    stop = True
                    break
                batch.append(request)
                size += len(request.images)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[_Request]) -> None:
        images = [image for request in batch for image in request.images]
        try:
            predictions = self.predictor.classify_images(images, top_k=max(request.top_k for request in batch))
        except Exception as exc:
            for request in batch:
                request.future.set_exception(exc)
            return
        start = 0
        for request in batch:
            rows = predictions[start : start + len(request.images)]
            request.future.set_result([_for_request(row, request) for row in rows])
            start += len(request.images)


def _for_request(result: Classification, request: _Request) -> Classification:
    unknown = result.unknown if request.min_score is None else (
        result.ood_score > threshold_from_min_score(request.min_score))
    return Classification(result.predictions[: request.top_k], result.ood_score, unknown)


def _zero_shot_key(base_model: str, class_names: list[str]) -> str:
    return "zero-shot:" + hashlib.sha256(json.dumps([base_model, class_names]).encode()).hexdigest()


class ModelLoadsBusy(Exception):
    """Every model-load slot stayed taken for the whole wait: the API answers 503 instead of piling up builds."""


def predictor_bytes(predictor: Predictor) -> int:
    """Estimated resident size of a loaded predictor: its parameters and buffers."""
    tensors = [*predictor.classifier.parameters(), *predictor.classifier.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class PredictorCache:
    """Loaded predictors, bounded by count (`capacity`) and by estimated bytes (`max_bytes`), LRU first.

    Building a predictor holds a whole CLIP model (both towers) in memory, so at most `max_loads` are
    built at once; a request that finds every slot taken for `load_wait_seconds` gets ModelLoadsBusy.
    The entry just loaded is always kept, even alone over `max_bytes`, so its request can be served.
    """

    def __init__(
        self,
        store: ObjectStore,
        cache_dir: Path,
        *,
        capacity: int,
        device: str,
        max_batch_images: int,
        wait_seconds: float,
        max_bytes: int | None = None,
        max_loads: int = 1,
        load_wait_seconds: float = 30.0,
        fetch_weights: Callable[[str], Path] | None = None,
    ) -> None:
        self.store = store
        self.fetch_weights = fetch_weights
        self.cache_dir = cache_dir
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.device = device
        self.max_batch_images = max_batch_images
        self.wait_seconds = wait_seconds
        self.load_wait_seconds = load_wait_seconds
        self._entries: OrderedDict[str, tuple[BatchingPredictor, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._load_slots = threading.BoundedSemaphore(max_loads)

    @property
    def size(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Estimated bytes of every cached predictor."""
        with self._lock:
            return sum(nbytes for _, nbytes in self._entries.values())

    def for_model(self, model_id: str, artifact_prefix: str) -> BatchingPredictor:
        return self._get(f"model:{model_id}", lambda: self._load_artifact(artifact_prefix))

    def zero_shot(self, base_model: str, class_names: list[str]) -> BatchingPredictor:
        return self._get(
            _zero_shot_key(base_model, class_names),
            lambda: Predictor.zero_shot(base_model, class_names, device=self.device, fetch_weights=self.fetch_weights),
        )

    def loaded_model(self, model_id: str) -> BatchingPredictor | None:
        """The model's predictor if it is already loaded: never blocks, so the event loop may call it."""
        return self._peek(f"model:{model_id}")

    def loaded_zero_shot(self, base_model: str, class_names: list[str]) -> BatchingPredictor | None:
        return self._peek(_zero_shot_key(base_model, class_names))

    @contextlib.contextmanager
    def load_slot(self) -> Iterator[None]:
        """One of the `max_loads` slots, for other work that holds a whole model in memory (ONNX export)."""
        if not self._load_slots.acquire(timeout=self.load_wait_seconds):
            raise ModelLoadsBusy(f"no model-load slot freed within {self.load_wait_seconds:g} s")
        try:
            yield
        finally:
            self._load_slots.release()

    def _peek(self, key: str) -> BatchingPredictor | None:
        with self._lock:  # held only for dictionary updates, never across a load
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def evict_model(self, model_id: str) -> None:
        with self._lock:
            entry = self._entries.pop(f"model:{model_id}", None)
        if entry is not None:
            entry[0].close()

    def clear(self) -> None:
        with self._lock:
            entries = [batcher for batcher, _ in self._entries.values()]
            self._entries.clear()
        for entry in entries:
            entry.close()

    def _get(self, key: str, load: Callable[[], Predictor]) -> BatchingPredictor:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:  # one load per key, however many requests wait for it
            with self._lock:
                if key in self._entries:
                    return self._entries[key][0]
            with self.load_slot():
                predictor = load()
            entry = BatchingPredictor(predictor, max_batch_images=self.max_batch_images, wait_seconds=self.wait_seconds)
            with self._lock:
                self._entries[key] = (entry, predictor_bytes(predictor))
                self._loading.pop(key, None)
                evicted = []
                while len(self._entries) > 1 and self._over_bounds():
                    evicted.append(self._entries.popitem(last=False)[1][0])
        for old in evicted:
            old.close()
        return entry

    def _over_bounds(self) -> bool:
        """Called with the lock held."""
        if len(self._entries) > self.capacity:
            return True
        return self.max_bytes is not None and sum(nbytes for _, nbytes in self._entries.values()) > self.max_bytes

    def _load_artifact(self, artifact_prefix: str) -> Predictor:
        """Download the artifact, load it, and drop the files (the weights now live in memory)."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="model-", dir=self.cache_dir) as directory:
            download_prefix(self.store, artifact_prefix, Path(directory))
            return Predictor.load(Path(directory), device=self.device)
