"""`benchmarks/serving.py` runs end to end against a real `must serve` (a tiny adaptation, seconds of load)
and prints its table with every request answered: its raw-socket client is hand-written, so it is run here.
Speed is not asserted: figures belong in docs/BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DTD = REPO.parent / "shared" / "datasets" / "dtd10"


def test_serving_benchmark_prints_in_process_and_http_rows(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    args = ["--duration", "2", "--clients", "1,3", "--in-process-seconds", "1", "--jpegs", "4", "--batch", "4"]
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.serving", *args, "--images", str(DTD), "--json", str(out)],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads(out.read_text())["http"]
    assert [row["clients"] for row in rows] == [1, 3]
    for row in rows:
        assert row["ok"] > 0 and row["errors"] == 0 and row["refused_429_503"] == 0
        assert row["in_process_images_per_s"] > 0 and row["server_cpu_ms_per_image"] > 0
    assert "| 3 |" in result.stdout and "in process:" in result.stdout
