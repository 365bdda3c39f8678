#!/usr/bin/env bash
# One command from a fresh clone to a running service on embedded defaults
# (SQLite, a local object-store directory, an in-process broker, the shipped offline base model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/must serve "$@"
