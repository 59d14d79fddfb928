#!/usr/bin/env bash
# The A/B of issue #14's default-configuration changes, each against the static-batch generate() ceiling measured
# in the same invocation (compare the ratios): concurrency 32, 64 requests, then concurrency 1. The configurations:
#   old-up:    what `disagg up` ran before (2 threads each, OpenMP spinning, KV relayed through the gateway);
#   short-spin: the same with GOMP_SPINCOUNT=10000 in the workers (now their default);
#   new:       short spin + the shared-memory KV transport = `disagg up`'s defaults now (results/bench_c32, bench_c1);
#   old-bench: what the committed records used (1 thread each, spinning, relayed).
# GOMP_SPINCOUNT="" removes the variable in the workers (disagg/tools/launch.py): OpenMP's own default.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
COMMON=(--model distilgpt2 --load-format dummy --dtype float32 --prompt-tokens 128 --ignore-eos --output-tokens 64)
C32=(--concurrency 32 --num-requests 64 --baseline static)
GOMP_SPINCOUNT="" disagg bench "${COMMON[@]}" "${C32[@]}" --threads 2 --kv-transport relayed \
  --output results/threads_c32_old_up --name "c32: old disagg up defaults (spin, relayed)"
disagg bench "${COMMON[@]}" "${C32[@]}" --threads 2 --kv-transport relayed \
  --output results/threads_c32_short_spin --name "c32: short OpenMP spin, relayed"
GOMP_SPINCOUNT="" disagg bench "${COMMON[@]}" "${C32[@]}" --threads 1 --kv-transport relayed \
  --output results/threads_c32_old_bench --name "c32: 1 thread each (spin, relayed)"
GOMP_SPINCOUNT="" disagg bench "${COMMON[@]}" --concurrency 1 --num-requests 6 --baseline sequential \
  --baseline-requests 6 --threads 2 --kv-transport relayed --output results/threads_c1_old_up \
  --name "c1: old disagg up defaults (spin, relayed)"
