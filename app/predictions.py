"""Bucket predictions in the object store: JSONL parts sorted by image name, plus a small index.

The worker writes them (`PredictionsWriter`) and the API reads them (`read_index`, `rows_after`,
`stream_lines`). Parts of `ROWS_PER_PART` rows let a page start at the right part instead of reading the
bucket from the top, and every read streams line by line, so a million-image bucket is never in memory.
They live under the adaptation, not the model's artifact prefix: the artifact download and the
predictor cache fetch that prefix whole, and should not carry a million rows.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from app.storage import ObjectStore, object_key
from must_engine.bucket import BucketRow, jsonl_line

FORMAT = "must-predictions/1"
INDEX_FILE = "index.json"
ROWS_PER_PART = 10_000


def predictions_prefix(team_id: str, adaptation_id: str) -> str:
    return object_key("teams", team_id, "adaptations", adaptation_id, "predictions") + "/"


class PredictionsWriter:
    """Receives rows in name order (the engine's `label_bucket` sorts them) and writes parts to a directory."""

    def __init__(self, directory: Path, rows_per_part: int = ROWS_PER_PART) -> None:
        self.directory = directory
        self.rows_per_part = rows_per_part
        self.parts: list[dict[str, Any]] = []
        self.count = 0
        self._sink: TextIO | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, rows: list[BucketRow]) -> None:
        for row in rows:
            if self._sink is None or self.parts[-1]["rows"] >= self.rows_per_part:
                self._next_part(row.image)
            assert self._sink is not None
            self._sink.write(jsonl_line(row.to_json()))
            self.parts[-1]["rows"] += 1
            self.count += 1

    def _next_part(self, first: str) -> None:
        if self._sink is not None:
            self._sink.close()
        self.parts.append({"name": f"part-{len(self.parts):05d}.jsonl", "first": first, "rows": 0})
        self._sink = (self.directory / self.parts[-1]["name"]).open("w", encoding="utf-8")

    def close(self) -> Path:
        """Write the index last: its presence marks complete predictions."""
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        index = {"format": FORMAT, "count": self.count, "parts": self.parts}
        path = self.directory / INDEX_FILE
        path.write_text(json.dumps(index))
        return path


def read_index(store: ObjectStore, prefix: str) -> dict[str, Any] | None:
    """The index, or None when there are no predictions (a model trained before they existed)."""
    if not store.exists(prefix + INDEX_FILE):
        return None
    index: dict[str, Any] = json.loads(b"".join(store.stream(prefix + INDEX_FILE)))
    return index


def stream_lines(store: ObjectStore, prefix: str, index: dict[str, Any], start_part: int = 0) -> Iterator[bytes]:
    """Every stored line (with its newline) from `start_part` on, reading one chunk at a time."""
    for part in index["parts"][start_part:]:
        pending = b""
        for chunk in store.stream(prefix + part["name"]):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line + b"\n"
        if pending:
            yield pending + b"\n"


def rows_after(store: ObjectStore, prefix: str, index: dict[str, Any], after: str | None) -> Iterator[dict[str, Any]]:
    """Rows whose image name sorts after `after` (all rows when None), in order."""
    start = 0
    if after is not None:
        firsts = [part["first"] for part in index["parts"]]
        start = max(0, bisect.bisect_right(firsts, after) - 1)
    for line in stream_lines(store, prefix, index, start):
        row: dict[str, Any] = json.loads(line)
        if after is None or row["image"] > after:
            yield row
