#!/usr/bin/env bash
# gRPC vs OpenAI-compatible HTTP front on the same local cluster (alternating), at concurrency 1 and 64, and the
# stream interval 1 vs 8 tokens at concurrency 64. Writes results/openai_vs_grpc_*.{json,md,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
# The prefix cache off: the repeated rounds would otherwise hit it, and the order of the fronts would matter.
common=(--model distilgpt2 --load-format dummy --prompt-tokens 128 --output-tokens 64 --api both --baseline none
        --prefill-args "--prefix-cache-mb 0"
        --repeats "${REPEATS:-2}")
disagg bench "${common[@]}" --concurrency 1 --num-requests 16 --name "gRPC vs HTTP, concurrency 1" \
  --output results/openai_vs_grpc_c1
disagg bench "${common[@]}" --concurrency 64 --num-requests 64 --name "gRPC vs HTTP, concurrency 64" \
  --output results/openai_vs_grpc_c64
disagg bench "${common[@]}" --concurrency 64 --num-requests 64 --gateway-args "--stream-interval-tokens 8" \
  --name "gRPC vs HTTP, concurrency 64, stream interval 8 tokens" --output results/openai_vs_grpc_c64_interval8
