#!/usr/bin/env bash
# The test command: installs what it needs, lints, then runs the whole suite (soak tests in bounded form).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check .
python -m pytest -q "$@"
