#!/usr/bin/env bash
# The test command: installs what it needs (skipped when nothing changed), checks lint, format and types, then
# runs the whole suite (soak tests in bounded form): the fast tier first, so a broken unit fails in minutes, then
# the tests that start processes. Arguments go to pytest instead, e.g. the fast tier alone:
#   bash scripts/test.sh -m "not cluster and not soak"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check .
ruff format --check .
mypy
if [ $# -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
python -m pytest -q -m "not cluster and not soak"
python -m pytest -q -m "cluster or soak"
