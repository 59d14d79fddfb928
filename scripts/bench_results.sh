#!/usr/bin/env bash
# Reproduces the committed benchmark records of the cluster against generate() (issues #6 and #14), one
# `disagg bench` per record, with `disagg up`'s default flags: each worker role gets the host's cores (2 threads
# each on 2 cores), workers spin only briefly in OpenMP, the KV cache goes through shared memory, the prefix cache is
# on (the prompts are distinct; warm-up prompts are their own). distilgpt2 shapes with seeded dummy weights, fp32,
# 128-token prompts, ignore_eos. Each invocation runs the in-process generate() baselines (default torch settings,
# all cores) while the cluster is idle, alternating with the cluster for --repeats rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
COMMON=(--model distilgpt2 --load-format dummy --dtype float32 --prompt-tokens 128 --ignore-eos --output-tokens 64)

disagg bench "${COMMON[@]}" --concurrency 1 --num-requests 6 --baseline sequential --baseline-requests 6 \
  --repeats 2 --output results/bench_c1 --name "concurrency 1"
disagg bench "${COMMON[@]}" --concurrency 32 --num-requests 64 --baseline static --repeats 2 \
  --output results/bench_c32 --name "concurrency 32"
disagg bench "${COMMON[@]}" --concurrency 64 --num-requests 64 --baseline static --repeats 2 \
  --output results/bench_c64 --name "concurrency 64"
# The same concurrency-1 workload with conditional disaggregation off and on (the default) in one run: prompts
# prefilled on the prefill worker vs on the decode worker (issue #14's defaults, issue #12's threshold)
disagg bench "${COMMON[@]}" --concurrency 1 --num-requests 8 --baseline sequential --baseline-requests 8 \
  --repeats 2 --local-prefill both --output results/bench_c1_local_prefill --name "concurrency 1, local prefill off/on"
# The decode step's A/B at concurrency 32: greedy tokens from float32 logits vs the exact bf16 screen of the
# vocabulary (--greedy-screen, decode workers' default auto), the same workload on a cluster of each, one run
disagg bench "${COMMON[@]}" --concurrency 32 --num-requests 64 --baseline static --repeats 2 --greedy-screen both \
  --output results/bench_c32_greedy_screen --name "concurrency 32, float32 head vs greedy screen"
