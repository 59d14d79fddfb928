"""The ratios a `disagg bench` record reports, each between two runs of the same invocation paired by their fields:
the reference cluster (`variants.reference`: the invocation's settings, gRPC front, no sweep) against the in-process
baselines, its HTTP front, and each variant that departs from it in one setting (the A/Bs of --kv-cache,
--prefix-cache, --routing, --local-prefill, --handoff-held-prefix and --greedy-screen both).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from benchmarks.variants import DEFAULT_VARIANT, Baseline, RunKey, Variant

BASELINES = (Baseline(static_batches=False), Baseline(static_batches=True))


def _ratio(a: dict, b: dict, metric: str, stat: str) -> float:
    return a[metric][stat] / b[metric][stat]


def _throughput(a: dict, b: dict) -> float:
    return a["output_token_throughput"] / b["output_token_throughput"]


def comparison(results: Mapping[RunKey, dict], reference: Variant = DEFAULT_VARIANT) -> dict[str, float]:
    """The ratios between the runs present in `results` (run key -> `RunResult.stats`); none without the
    `reference` cluster."""
    cluster = results.get(RunKey(reference, "grpc"))
    if cluster is None:
        return {}

    def departing(**changes: Any) -> dict | None:
        """The run of the reference cluster with `changes` (its gRPC front), if the invocation measured it; None
        where a change is no departure from the reference, or makes no cluster (held prefix without local
        prefill)."""
        if any(getattr(reference, name) == value for name, value in changes.items()):
            return None
        try:
            return results.get(RunKey(dataclasses.replace(reference, **changes), "grpc"))
        except ValueError:
            return None

    ratios: dict[str, float] = {}
    for baseline in BASELINES:
        if base := results.get(RunKey(baseline)):
            ratios[f"throughput_vs_{baseline.name}"] = _throughput(cluster, base)
            ratios[f"e2e_mean_vs_{baseline.name}"] = _ratio(cluster, base, "e2e_s", "mean")
            ratios[f"ttft_mean_vs_{baseline.name}"] = _ratio(cluster, base, "ttft_s", "mean")
    if (http := results.get(RunKey(reference, "openai"))) is not None:  # the HTTP front against the gRPC one
        ratios["openai_throughput_vs_grpc"] = _throughput(http, cluster)
        ratios["openai_ttft_mean_vs_grpc"] = _ratio(http, cluster, "ttft_s", "mean")
    if (least := departing(routing="least-loaded")) is not None:  # the same trace, KV-aware vs least-loaded
        aware, plain = cluster["prefix_hit_rate"], least["prefix_hit_rate"]
        ratios["kv_aware_hit_rate_vs_least_loaded"] = aware / plain if plain else float("inf")
    if (off := departing(prefix_cache=False)) is not None:  # the same workload, prefix cache on vs off
        ratios["prefix_off_ttft_p50_vs_on"] = _ratio(off, cluster, "ttft_s", "p50")
        ratios["prefix_off_ttft_p99_vs_on"] = _ratio(off, cluster, "ttft_s", "p99")
        ratios["prefix_off_e2e_p50_vs_on"] = _ratio(off, cluster, "e2e_s", "p50")
    if (remote := departing(local_prefill=False)) is not None:  # conditional disaggregation off vs on
        ratios["local_prefill_off_ttft_p50_vs_on"] = _ratio(remote, cluster, "ttft_s", "p50")
        ratios["local_prefill_off_e2e_p50_vs_on"] = _ratio(remote, cluster, "e2e_s", "p50")
    if (whole := departing(held_prefix=False)) is not None:  # handoffs back to a decode worker, whole
        ratios["whole_handoff_ttft_p50_vs_on"] = _ratio(whole, cluster, "ttft_s", "p50")
        ratios["whole_handoff_e2e_p50_vs_on"] = _ratio(whole, cluster, "e2e_s", "p50")
        sent = cluster.get("routing", {}).get("kv-bytes-sent")
        sent_whole = whole.get("routing", {}).get("kv-bytes-sent")
        if sent and sent_whole:
            ratios["whole_handoff_kv_bytes_vs_on"] = sent_whole / sent
    if (plain_head := departing(greedy_screen=False)) is not None:  # the decode step's A/B: float32 logits vs screen
        ratios["greedy_screen_throughput_vs_float32_head"] = _throughput(cluster, plain_head)
        ratios["greedy_screen_tpot_mean_vs_float32_head"] = _ratio(cluster, plain_head, "tpot_s", "mean")
        for baseline in BASELINES:
            if base := results.get(RunKey(baseline)):
                ratios[f"float32_head_throughput_vs_{baseline.name}"] = _throughput(plain_head, base)
    if (neither := departing(prefix_cache=False, local_prefill=False)) is not None:  # no cache, no local prefill
        ratios["neither_ttft_p50_vs_both"] = _ratio(neither, cluster, "ttft_s", "p50")
        ratios["neither_ttft_p99_vs_both"] = _ratio(neither, cluster, "ttft_s", "p99")
    if (kv_off := departing(kv_cache=False)) is not None:  # the decode worker recomputing every step
        ratios["kv_off_e2e_vs_on"] = _ratio(kv_off, cluster, "e2e_s", "mean")
        ratios["kv_off_tpot_vs_on"] = _ratio(kv_off, cluster, "tpot_s", "mean")
        ratios["kv_off_throughput_vs_on"] = _throughput(kv_off, cluster)
    return ratios
