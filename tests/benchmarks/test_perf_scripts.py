"""The performance scripts still run end to end (tiny model, CPU) and print their tables.

They time the engine's own MustStep, dataset and Predictor, so an engine change can break them silently;
one already did. Speed is not asserted here: figures belong in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

COMMANDS = {
    "train_step": (["benchmarks/perf_train_step.py", "--arch", "tiny", "--batch", "4", "--steps", "2", "--warmup",
                    "1", "--variants", "fp32-eager,bf16-eager", "--device", "cpu"], "| bf16-eager | 4 |"),
    "input_pipeline": (["benchmarks/perf_input_pipeline.py", "--arch", "tiny", "--batch", "4", "--num-workers", "1",
                        "--batches", "2", "--warmup", "1", "--device", "cpu", "--breakdown", "4"],
                       "| loader + MUST step |"),
    "classify": (["benchmarks/perf_classify.py", "--arch", "tiny", "--device", "cpu", "--batch-sizes", "1,8",
                  "--iters", "1", "--warmup", "0", "--preprocess-threads", "2", "--onnx"], "| 8 |"),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_perf_script_prints_its_table(name: str) -> None:
    args, expected_row = COMMANDS[name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(expected_row)]
    assert rows, result.stdout
    assert "nan" not in rows[0].lower()
