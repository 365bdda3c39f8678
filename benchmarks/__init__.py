"""Benchmarks and the proxy tools. They read the shared datasets in place, beside the checkout."""

from pathlib import Path

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
