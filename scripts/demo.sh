#!/usr/bin/env bash
# The main job: install, start a local cluster (gateway + prefill + decode), stream one completion, stop.
# Runs the bundled real model (SmolLM2-135M-Instruct) since no model hub is needed for it; set MODEL=distilgpt2
# on a machine that reaches the hub to serve distilgpt2 instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
MODEL=${MODEL:-smollm2-135m-instruct}
PROMPT=${PROMPT:-Explain why batching improves GPU utilization.}
CHAT=--chat
[ "$MODEL" = smollm2-135m-instruct ] || CHAT=
PORT=${PORT:-50051}
disagg up --model "$MODEL" --port "$PORT" &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP' EXIT
echo "--- prompt: $PROMPT"
disagg generate $CHAT --wait-ready 600 --address "127.0.0.1:$PORT" --max-new-tokens 80 "$PROMPT"
