"""The job's last stage before it succeeds: label the whole bucket with the exported model and zero-shot.

The engine (`label_bucket`) does the labelling and the label-free report; this module names the images
as the team knows them, writes the rows as predictions parts for the API, and reports progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.predictions import PredictionsWriter
from must_engine.base_models import FetchWeights
from must_engine.bucket import BucketRow, NamedPath, label_bucket

PROGRESS_SECONDS = 10.0


@dataclass(frozen=True)
class BucketEvidence:
    predictions_dir: Path
    report: dict[str, Any]


def bucket_names(images: list[Path], downloaded: Path, extracted: Path) -> list[NamedPath]:
    """Each image with a unique name: its key under the source prefix, or its path inside its zip.

    Zips of the source prefix are extracted to `extracted/archive-<i>` in sorted key order (see
    app.validation.images_in_directory). A member is named by its path in the zip when the prefix holds
    that one zip and nothing else (an upload), else by `<zip key>/<path in the zip>`.
    """
    archives = sorted(p for p in downloaded.rglob("*") if p.is_file() and p.suffix.lower() == ".zip")
    archive_keys = {f"archive-{i}": p.relative_to(downloaded).as_posix() for i, p in enumerate(archives)}
    loose = [path for path in images if path.is_relative_to(downloaded)]
    only_one_zip = len(archives) == 1 and not loose
    named = []
    for path in images:
        if path.is_relative_to(downloaded):
            named.append((path, path.relative_to(downloaded).as_posix()))
            continue
        archive, *member = path.relative_to(extracted).parts
        inside = "/".join(member)
        named.append((path, inside if only_one_zip else f"{archive_keys[archive]}/{inside}"))
    return named


def label_job_bucket(
    images: list[NamedPath], artifact_dir: Path, out_dir: Path, *, device: str, fetch_weights: FetchWeights,
    report_progress: Callable[[str, dict[str, Any]], None], check: Callable[[], None],
) -> BucketEvidence:
    """Predictions parts in out_dir and the report (also added to the artifact's metadata).

    `check` runs between batches and raises to stop (cancel, lost lease); `report_progress` gets a
    message every few seconds and at the end.
    """
    writer = PredictionsWriter(out_dir)
    last = 0.0

    def on_rows(rows: list[BucketRow]) -> None:
        check()
        writer.add(rows)

    def on_progress(done: int, total: int) -> None:
        nonlocal last
        if done == total or time.monotonic() - last >= PROGRESS_SECONDS:
            report_progress(f"labelled {done} of {total} images with the adapted model and zero-shot",
                            {"stage": "bucket_predictions", "done": done, "total": total})
            last = time.monotonic()

    report_progress(f"labelling {len(images)} images with the adapted model and zero-shot",
                    {"stage": "bucket_predictions", "done": 0, "total": len(images)})
    report = label_bucket(images, artifact_dir, on_rows=on_rows, device=device, fetch_weights=fetch_weights,
                          on_progress=on_progress)
    writer.close()
    return BucketEvidence(out_dir, report)
