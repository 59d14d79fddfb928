#!/usr/bin/env bash
# The test command: installs what it needs (skipped when nothing changed), checks lint, format, types and the
# layering, then runs the whole suite (soak tests in bounded form). Arguments go to pytest, e.g. the fast tier:
#   bash scripts/test.sh -m "not cluster and not soak"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check .
ruff format --check .
mypy
python -m pytest -q "$@"
