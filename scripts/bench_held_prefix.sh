#!/usr/bin/env bash
# Reproduces issue #12's held-prefix handoff records (distilgpt2 shapes, seeded dummy weights, fp32, 1 prefill + 1
# decode worker with --local-prefill at the default threshold, 256): results/held_prefix_<transport>.{json,md,png}.
# Multi-turn conversations whose every new message is longer than the threshold (16 conversations x 3 turns, 4 at
# once, 300-token user turns, 32-token replies, ~1,000 tokens by the end, history as token ids), so each later turn
# is declined by the decode worker that holds its history and prefilled remotely: handed back whole
# (--no-handoff-held-prefix) vs without the blocks the decode worker holds, on the same workload in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
for transport in ${TRANSPORTS:-shared-memory relayed}; do
  disagg bench --model distilgpt2 --load-format dummy --baseline none --workload multi-turn --turns 3 \
    --conversations 16 --concurrency 4 --prompt-tokens 300 --output-tokens 32 --history tokens \
    --handoff-held-prefix both --kv-transport "$transport" --output "results/held_prefix_${transport//-/_}" \
    --name "held-prefix handoff: multi-turn, 300-token messages, $transport KV" "$@"
done
