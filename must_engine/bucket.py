"""Label a whole bucket with the adapted model and with zero-shot, in batches, one row per image.

The paper's transductive setting: the images a model was adapted on are the images a team wants labels
for. Rows come out in the order of the images given (callers sort them by name, so pages are stable), and
only one batch of images is decoded at a time, so a bucket of a million images never sits in memory.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from PIL import Image

from must_engine.artifact import METADATA_FILE, read_metadata
from must_engine.base_models import FetchWeights
from must_engine.estimate import BucketEvidence
from must_engine.images import open_image
from must_engine.predictor import Prediction, Predictor, top_predictions
from must_engine.unknown import OOD_SCORE, SCORE_HISTOGRAM_BINS, THRESHOLD_METHODS, is_unknown, score_histogram

# Columns of the CSV form of a row: the top-1 of each model (the JSONL form carries the top-k lists).
CSV_COLUMNS = ("image", "label", "score", "zero_shot_label", "zero_shot_score", "changed", "ood_score", "unknown")
DEFAULT_TOP_K = 5

NamedPath = tuple[Path, str]  # a file on disk and the name its owner knows it by


@dataclass(frozen=True)
class LabelledBatch:
    """One batch of images with both models' full class probabilities (rows of (B, K)) and the adapted
    model's ood_score and unknown decision per image (must_engine/unknown.py)."""

    names: list[str]
    adapted: torch.Tensor
    zero_shot: torch.Tensor
    ood_scores: torch.Tensor
    unknown: torch.Tensor


@dataclass(frozen=True)
class BucketRow:
    image: str
    predictions: Prediction
    zero_shot: Prediction
    ood_score: float
    unknown: bool

    @property
    def changed(self) -> bool:
        return self.predictions[0][0] != self.zero_shot[0][0]

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "predictions": [{"label": label, "score": score} for label, score in self.predictions],
            "zero_shot": [{"label": label, "score": score} for label, score in self.zero_shot],
            "changed": self.changed,
            "ood_score": self.ood_score,
            "unknown": self.unknown,
        }


def label_bucket(
    images: Sequence[NamedPath], artifact_dir: Path, *, on_rows: Callable[[list[BucketRow]], None],
    device: str = "auto", batch_size: int = 256, top_k: int = DEFAULT_TOP_K, fetch_weights: FetchWeights | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Label every image with the artifact and with zero-shot; add the label-free report to its metadata.

    Rows reach `on_rows` sorted by image name (names must be unique). The zero-shot model is the
    artifact's base model with the artifact's class names and templates: the model adaptation started from.
    Returns the report, also written into the artifact's metadata.json under "report".
    """
    ordered = sorted(images, key=lambda item: item[1])
    if len({name for _, name in ordered}) != len(ordered):
        raise ValueError("image names must be unique to label a bucket")
    adapted = Predictor.load(artifact_dir, device=device)
    metadata = adapted.metadata
    zero_shot = zero_shot_of(adapted, device=device, fetch_weights=fetch_weights)
    evidence = BucketEvidence(adapted.class_names)
    flagged = 0
    histogram = torch.zeros(SCORE_HISTOGRAM_BINS, dtype=torch.long)
    for batch in label_batches(ordered, adapted, zero_shot, batch_size=batch_size, on_progress=on_progress):
        evidence.add(batch.adapted, batch.zero_shot)
        flagged += int(batch.unknown.sum())
        histogram += score_histogram(batch.ood_scores)
        on_rows(rows_of(batch, adapted.class_names, top_k))
    report = evidence.report(balanced_export=bool(metadata["config"].get("balance_classes")),
                             class_prior=tuple(metadata["config"].get("class_prior", ())),
                             training_metrics=metadata.get("metrics"))
    method = (metadata.get("unknown") or {}).get("method", "default")  # unknown.fit_threshold's
    report["unknown"] = {
        "threshold": adapted.unknown_threshold, "share": flagged / len(ordered) if ordered else 0.0,
        "score": OOD_SCORE, "histogram": histogram.tolist(),  # equal bins of [0, 1], lowest score first
        "method": method, "how": THRESHOLD_METHODS.get(method, ""),  # how the threshold was fitted, in words
    }
    write_report(artifact_dir, report)
    return report


def zero_shot_of(adapted: Predictor, *, device: str = "auto", fetch_weights: FetchWeights | None = None) -> Predictor:
    """The model an artifact started from: its base model, class names and prompt templates, zero-shot."""
    metadata = adapted.metadata
    return Predictor.zero_shot(metadata["base_model"], adapted.class_names, device=device,
                               templates=metadata["config"]["templates"], fetch_weights=fetch_weights)


def write_report(artifact_dir: Path, report: dict[str, Any]) -> None:
    """Add `report` to the artifact's metadata.json, atomically (the file marks a complete artifact)."""
    metadata = read_metadata(artifact_dir)
    metadata["report"] = report
    temporary = Path(artifact_dir) / (METADATA_FILE + ".tmp")
    temporary.write_text(json.dumps(metadata, indent=2))
    temporary.replace(Path(artifact_dir) / METADATA_FILE)


def label_batches(
    images: Sequence[NamedPath], adapted: Predictor, zero_shot: Predictor, *, batch_size: int = 256,
    on_progress: Callable[[int, int], None] | None = None,
) -> Iterator[LabelledBatch]:
    """Both models' probabilities for every image, `batch_size` images decoded at a time.

    Each image is decoded once and preprocessed by each predictor (their input sizes may differ). Decoding
    runs on a thread pool (PIL releases the GIL) one batch ahead, so the next batch decodes while the
    models run on this one; at most two batches of images are in memory.
    """
    if adapted.class_names != zero_shot.class_names:
        raise ValueError(f"class names differ: {adapted.class_names} vs {zero_shot.class_names}")
    draft = 2 * max(adapted.size, zero_shot.size)
    starts = range(0, len(images), batch_size)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="decode") as pool:

        def decode(start: int) -> list[Future[Image.Image]]:
            chunk = images[start : start + batch_size]
            return [pool.submit(open_image, path, filename=name, draft_size=draft) for path, name in chunk]

        pending = decode(0) if starts else []
        for start in starts:
            decoded = [future.result() for future in pending]
            if start + batch_size < len(images):
                pending = decode(start + batch_size)
            logits = adapted.logits(adapted.preprocess(decoded))
            scores = adapted.ood_scores(logits)
            yield LabelledBatch(
                names=[name for _, name in images[start : start + batch_size]],
                adapted=logits.softmax(dim=-1),
                zero_shot=zero_shot.probabilities(zero_shot.preprocess(decoded)),
                ood_scores=scores,
                unknown=is_unknown(scores, adapted.unknown_threshold),
            )
            if on_progress is not None:
                on_progress(start + len(decoded), len(images))


def rows_of(batch: LabelledBatch, class_names: Sequence[str], k: int = DEFAULT_TOP_K) -> list[BucketRow]:
    adapted = top_predictions(batch.adapted, class_names, k)
    zero_shot = top_predictions(batch.zero_shot, class_names, k)
    return [BucketRow(*row) for row in zip(batch.names, adapted, zero_shot, batch.ood_scores.tolist(),
                                            batch.unknown.tolist(), strict=True)]


def jsonl_line(row: dict[str, Any]) -> str:
    return json.dumps(row, separators=(",", ":"), ensure_ascii=False) + "\n"


def csv_header() -> str:
    return _csv_line(CSV_COLUMNS)


def csv_line(row: dict[str, Any]) -> str:
    """A row's JSON form (as stored in predictions.jsonl) as one CSV line: both models' top-1, the unknown
    decision (rows stored before it existed leave its two cells empty)."""
    best, zero = row["predictions"][0], row["zero_shot"][0]
    ood = f"{row['ood_score']:.6f}" if "ood_score" in row else ""
    unknown = ("true" if row["unknown"] else "false") if "unknown" in row else ""
    return _csv_line((row["image"], best["label"], f"{best['score']:.6f}", zero["label"],
                      f"{zero['score']:.6f}", "true" if row["changed"] else "false", ood, unknown))


class RowsFile:
    """Rows written to a `.jsonl` or `.csv` file (by suffix) as they arrive; use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.suffix = path.suffix.lower()
        if self.suffix not in (".csv", ".jsonl"):
            raise ValueError(f"{path}: predictions are written as .csv or .jsonl")
        self.path = path
        self.count = 0
        self._sink: TextIO | None = None

    def __enter__(self) -> RowsFile:
        self._sink = self.path.open("w", encoding="utf-8", newline="")
        if self.suffix == ".csv":
            self._sink.write(csv_header())
        return self

    def __exit__(self, *_: object) -> None:
        if self._sink is not None:
            self._sink.close()

    def write(self, rows: list[BucketRow]) -> None:
        assert self._sink is not None, "use RowsFile as a context manager"
        for row in rows:
            data = row.to_json()
            self._sink.write(csv_line(data) if self.suffix == ".csv" else jsonl_line(data))
        self.count += len(rows)


def _csv_line(values: Sequence[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()
