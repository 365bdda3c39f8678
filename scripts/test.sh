#!/usr/bin/env bash
# One command from a fresh clone to a full test run: install, start local services, lint, test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
export HF_HUB_OFFLINE=1
# PyTorch's spinning OpenMP threads slow a shared 2-core machine 3-5x; passive waiting changes no result.
export OMP_WAIT_POLICY=PASSIVE
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
