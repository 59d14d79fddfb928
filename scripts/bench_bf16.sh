#!/usr/bin/env bash
# bfloat16 (issue #14): the cluster in bf16 against generate() in bf16 in the same invocation (concurrency 32, as
# results/bench_c32 in fp32), and greedy agreement with fp32 on the bundled real model. Worth it where the CPU has
# AMX or AVX512-BF16 (lscpu: amx_bf16, avx512_bf16); elsewhere bf16 matrix products are emulated and slower.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
disagg bench --model distilgpt2 --load-format dummy --dtype bfloat16 --prompt-tokens 128 --ignore-eos \
  --output-tokens 64 --concurrency 32 --num-requests 64 --baseline static --repeats 2 \
  --output results/bench_c32_bf16 --name "concurrency 32, bfloat16"
disagg bench dtype --dtypes bfloat16 --new-tokens 32 --out results/bf16_agreement
