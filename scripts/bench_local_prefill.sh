#!/usr/bin/env bash
# Reproduces issue #12's conditional-disaggregation records (distilgpt2 shapes, seeded dummy weights, fp32, 1 prefill
# + 1 decode worker, shared-memory KV):
#  - results/local_prefill_threshold_L*.{json,md,png}: cold random prompts of L tokens, prefix caches off, 4 in
#    flight, each length on a cluster without and with --local-prefill (threshold above L, no cached share
#    required): TTFT, TPOT and E2E of a cold prompt prefilled inside the decode loop vs on the prefill worker.
#  - results/local_prefill_multi_turn{,_tokens}.{json,md,png}: the multi-turn workload (8 conversations of 6 turns,
#    4 at once, 64-token user turns, 96-token replies, ~960 tokens at the end), the history re-sent as text and as
#    token ids, with the prefix caches off and on, each without and with conditional disaggregation at the default
#    threshold (the decode worker keeps each reply's KV).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
common=(--model distilgpt2 --load-format dummy --baseline none)
if [[ "${SKIP_THRESHOLD:-0}" != 1 ]]; then
  for length in ${LENGTHS:-64 256 512}; do
    disagg bench "${common[@]}" --workload random --prompt-tokens "$length" --output-tokens 64 --num-requests 24 \
      --concurrency 4 --prefix-cache off --local-prefill both --local-prefill-tokens 1024 \
      --gateway-args "--local-prefill-min-cached 0" \
      --output "results/local_prefill_threshold_L$length" --name "conditional disaggregation: $length-token prompts"
  done
fi
for history in ${HISTORIES:-text tokens}; do
  suffix=$([[ $history == tokens ]] && echo _tokens || true)
  disagg bench "${common[@]}" --workload multi-turn --conversations 8 --concurrency 4 --prefix-cache both \
    --local-prefill both --history "$history" --output "results/local_prefill_multi_turn$suffix" \
    --name "conditional disaggregation: multi-turn, history as $history" "$@"
done
