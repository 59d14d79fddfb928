#!/usr/bin/env bash
# Reproduces results/prefix_routing_hit_rate.{json,md,png} (issue #12): the same multi-turn trace (16
# conversations of 6 turns, each turn re-sending the history; 64-token user turns, 96-token replies, ~960 tokens
# by the end) on two local clusters of 2 prefill workers + 1 decode worker, one routing KV-aware (the gateway's
# default: the workers' cache events), one least-loaded (--no-prefix-routing). The prefix hit rate of each is
# cached prompt tokens / prompt tokens, from usage. distilgpt2 shapes with seeded dummy weights, fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
disagg bench --model distilgpt2 --load-format dummy --workload multi-turn --conversations 16 --concurrency 16 \
  --prompt-tokens 64 --output-tokens 96 --prefill-workers 2 --routing both --baseline none \
  --output results/prefix_routing_hit_rate --name "prefix routing: KV-aware vs least-loaded, multi-turn" "$@"
