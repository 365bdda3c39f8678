"""Predictions parts in the object store: cursors across part boundaries, streams, a missing index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.predictions import PredictionsWriter, predictions_prefix, read_index, rows_after, stream_lines
from app.storage import LocalStore, upload_directory
from must_engine.bucket import BucketRow


@pytest.fixture
def stored(tmp_path: Path) -> tuple[LocalStore, str, list[str]]:
    names = sorted(f"{cls}/{i:03d}.png" for cls in ("a", "b") for i in range(12))
    writer = PredictionsWriter(tmp_path / "out", rows_per_part=5)
    for start in range(0, len(names), 7):  # batches that do not line up with parts
        writer.add([BucketRow(name, [("x", 0.9), ("y", 0.1)], [("y", 0.6), ("x", 0.4)], 0.1, False)
                    for name in names[start : start + 7]])
    writer.close()
    store = LocalStore(tmp_path / "objects", "bucket")
    store.ensure_bucket()
    prefix = predictions_prefix("team_1", "ada_1")
    upload_directory(store, tmp_path / "out", prefix)
    return store, prefix, names


def test_every_cursor_resumes_right_after_its_row(stored: tuple[LocalStore, str, list[str]]) -> None:
    store, prefix, names = stored
    index = read_index(store, prefix)
    assert index is not None and index["count"] == 24 and len(index["parts"]) == 5
    assert [part["first"] for part in index["parts"]] == names[::5]
    assert [row["image"] for row in rows_after(store, prefix, index, None)] == names
    for i, name in enumerate(names):
        assert [row["image"] for row in rows_after(store, prefix, index, name)] == names[i + 1 :]
    assert [row["image"] for row in rows_after(store, prefix, index, "a/")] == names  # before the first
    assert list(rows_after(store, prefix, index, "zzz")) == []


def test_streamed_lines_are_the_rows_in_order(stored: tuple[LocalStore, str, list[str]]) -> None:
    store, prefix, names = stored
    index = read_index(store, prefix)
    assert index is not None
    lines = list(stream_lines(store, prefix, index))
    assert all(line.endswith(b"\n") for line in lines)
    assert [json.loads(line)["image"] for line in lines] == names
    assert json.loads(lines[0])["changed"] is True


def test_no_index_means_no_predictions(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, "bucket")
    store.ensure_bucket()
    assert read_index(store, predictions_prefix("team_1", "ada_2")) is None
