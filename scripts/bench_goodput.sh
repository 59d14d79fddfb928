#!/usr/bin/env bash
# Aggregated vs disaggregated under SLOs (issue #14): one `disagg bench` invocation that, at each Poisson request
# rate, runs the same mixed workload against a local disaggregated cluster (1 prefill + 1 decode worker) and then a
# local aggregated one (2 aggregated workers), one cluster up at a time. Writes
# results/goodput_aggregated_vs_disaggregated.{json,md,png}: a table per (mode, rate) and a plot of p99 ITL and
# goodput against the rate. Estimated from short runs at about 10-12 minutes on the 2-core CPU (the 0.5/s rate's
# 100 s of arrivals per mode are the largest part; each cluster start takes ~10 s, two per rate).
#
# Workload: distilgpt2 shapes with seeded dummy weights, fp32; 20% of the prompts 1000 tokens long (cut to 960 so
# that prompt + 64 output tokens fit distilgpt2's 1024 positions), the rest 64; 64 output tokens, ignore_eos; open
# loop (no concurrency cap), so the rate alone shapes the load. The lowest rate is easy, the highest saturates.
# Cores: each cluster in its default configuration on the same 2 cores: the disaggregated one's prefill and decode
# worker 2 torch threads each (disagg up's rule: each role's workers split the cores; they mostly take turns, and
# spin only briefly in OpenMP), the 2 aggregated workers 1 thread each (replicas of one role split the cores, as data-parallel
# replicas of vLLM would be; DistServe compares the same way).
# The prefix cache is off (the default with --mode both): aggregated workers have none.
# SLOs: TTFT <= 2 s and TPOT <= 150 ms per request; the overrides are for a quick smoke run, e.g.
#   NUM_REQUESTS=5 RATES=0.5 OUTPUT=/tmp/goodput_smoke bash scripts/bench_goodput.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v disagg >/dev/null || . .venv/bin/activate
export HF_HUB_OFFLINE=1
disagg bench --model distilgpt2 --load-format dummy --dtype float32 --seed 0 \
  --workload mixed --prompt-tokens 64 --long-prompt-tokens 1000 --long-fraction 0.2 --output-tokens 64 --ignore-eos \
  --num-requests "${NUM_REQUESTS:-50}" --request-rates "${RATES:-0.5,1,2,4}" \
  --mode both --workers 2 --goodput ttft:2000 tpot:150 --baseline none \
  --name "aggregated vs disaggregated under SLOs" --output "${OUTPUT:-results/goodput_aggregated_vs_disaggregated}"
