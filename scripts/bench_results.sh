#!/usr/bin/env bash
# Reproduces the committed benchmark records in results/ (issue #6's must-show), one `disagg bench` per record.
# distilgpt2 shapes with seeded dummy weights, fp32, 128-token prompts, ignore_eos. Each invocation runs the
# in-process generate() baselines while the cluster is idle, alternating with the cluster for --repeats rounds.
# Threads: at concurrency 1 prefill and decode never overlap, so each worker takes both cores (--threads 2); under
# concurrency they overlap, so each takes one (--threads 1) and the two never oversubscribe the 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
COMMON=(--model distilgpt2 --load-format dummy --dtype float32 --prompt-tokens 128 --ignore-eos)

disagg bench "${COMMON[@]}" --output-tokens 64 --concurrency 1 --num-requests 6 --baseline-requests 6 \
  --threads 2 --repeats 2 --output results/bench_c1 --name "concurrency 1"
disagg bench "${COMMON[@]}" --output-tokens 64 --concurrency 32 --num-requests 64 --baseline-requests 3 \
  --threads 1 --repeats 1 --output results/bench_c32 --name "concurrency 32"
disagg bench "${COMMON[@]}" --output-tokens 64 --concurrency 64 --num-requests 64 --baseline-requests 2 \
  --threads 1 --repeats 1 --output results/bench_c64 --name "concurrency 64"
disagg bench "${COMMON[@]}" --output-tokens 256 --concurrency 1 --num-requests 1 --baseline sequential \
  --baseline-requests 1 --kv-cache both --threads 2 --output results/kv_off_vs_on_c1 --name "KV cache off vs on"
# The same at concurrency 32 and 64 with the decode worker on both cores (prefill keeps one): decode is most of the
# work, and prefill is idle most of the time.
disagg bench "${COMMON[@]}" --output-tokens 64 --concurrency 32 --num-requests 64 --baseline-requests 2 \
  --threads 1 --decode-args "--threads 2" --repeats 2 --output results/bench_c32_decode_2threads \
  --name "concurrency 32, decode 2 threads"
disagg bench "${COMMON[@]}" --output-tokens 64 --concurrency 64 --num-requests 64 --baseline-requests 2 \
  --threads 1 --decode-args "--threads 2" --repeats 2 --output results/bench_c64_decode_2threads \
  --name "concurrency 64, decode 2 threads"
