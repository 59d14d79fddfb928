"""The runs of one `disagg bench` invocation: rounds that alternate the in-process baselines (no cluster
computing) with every cluster variant of the schedule, one local cluster up at a time.

Order matters on a small CPU: the `generate()` baselines run before a local cluster starts (or while a remote one
is idle), so they never share cores with the workers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shlex
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from benchmarks.baselines import generate_sequential, generate_static_batches
from benchmarks.drivers import run_against_gateway, run_against_openai, run_conversations
from benchmarks.stats import RunResult
from benchmarks.variants import Baseline, RunKey, Variant, schedule
from benchmarks.workloads import BenchPrompts, Workload, round_prompts
from disagg.tools.client import scrape_metrics
from disagg.tools.cluster import Cluster, free_port, worker_args

if TYPE_CHECKING:
    from tqdm import tqdm

    from disagg.model.loading import LoadedModel


def _progress(total: int, desc: str) -> tqdm:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)


def cluster_for(args: argparse.Namespace, variant: Variant) -> tuple[Cluster, str]:
    """The local cluster of `variant` (not started) and its HTTP front's address ("" with --api grpc)."""
    gateway_args = ["--kv-transport", args.kv_transport, *shlex.split(args.gateway_args)]
    gateway_args += [] if variant.routing == "kv-aware" else ["--no-prefix-routing"]
    gateway_args += [] if variant.held_prefix else ["--no-handoff-held-prefix"]
    http = ""
    if args.api != "grpc":
        port = free_port()
        gateway_args += ["--http-port", str(port), "--served-model-name", args.model]
        http = f"127.0.0.1:{port}"
    both_roles = ([] if variant.prefix_cache else ["--prefix-cache-mb", "0"]) + (
        [] if variant.greedy_screen else ["--greedy-screen", "off"]
    )
    cluster = Cluster(
        worker_args(args, variant.kv_cache),
        gateway_args,
        prefill_workers=args.prefill_workers,
        prefill_args=shlex.split(args.prefill_args) + both_roles,
        decode_args=shlex.split(args.decode_args) + both_roles,
        aggregated_workers=args.workers if variant.aggregated else 0,
        local_prefill_tokens=args.local_prefill_tokens if variant.local_prefill else 0,
    )
    return cluster, http


async def _cluster_run(
    args: argparse.Namespace, address: str, workload: Workload, prompts: BenchPrompts, key: RunKey
) -> RunResult:
    def run(target: Workload, texts: list[str], on_done: Callable[[], None] = lambda: None) -> Awaitable[RunResult]:
        if key.api == "openai":  # address: the gateway's HTTP host:port
            return run_against_openai(f"http://{address}/v1", target, texts, args.model, on_done=on_done)
        return run_against_gateway(address, target, texts, on_done=on_done)

    if args.warmup_requests:
        warm = Workload(
            args.warmup_requests,
            workload.prompt_tokens,
            min(8, workload.output_tokens),
            concurrency=args.warmup_requests,
        )
        await run(warm, prompts.warmup)
    bar = _progress(workload.num_requests, key.label)
    if workload.kind == "multi-turn":
        result = await run_conversations(address, workload, prompts.conversations, bar.update)
    else:
        result = await run(workload, prompts.texts, bar.update)
    bar.close()
    result.name = key.label
    return result


def _baselines(
    args: argparse.Namespace, lm: LoadedModel, prompt_ids: list[list[int]], workload: Workload, first_round: bool
) -> list[tuple[Baseline, RunResult]]:
    """One round of the in-process baselines; the one-at-a-time one runs in the first round only when it is not
    the comparison that matters (concurrency > 1)."""
    runs = []
    if first_round:
        generate_sequential(lm, prompt_ids[:1], Workload(1, workload.prompt_tokens, 4))  # warm-up, not counted
    if args.baseline in ("all", "sequential") and (first_round or workload.concurrency == 1):
        seq = Workload(
            min(args.baseline_requests, workload.num_requests),
            workload.prompt_tokens,
            workload.output_tokens,
            1,
            ignore_eos=workload.ignore_eos,
        )
        bar = _progress(seq.num_requests, "generate() one at a time")
        runs.append((Baseline(static_batches=False), generate_sequential(lm, prompt_ids, seq, on_done=bar.update)))
        bar.close()
    if args.baseline in ("all", "static") and workload.concurrency > 1:
        bar = _progress(workload.num_requests, f"generate() static batches of {workload.concurrency}")
        batches = generate_static_batches(lm, prompt_ids, workload, on_done=bar.update)
        runs.append((Baseline(static_batches=True), batches))
        bar.close()
    return runs


class _OneCluster:
    """At most one local cluster up: `use` starts the variant's, stopping the one up before (so two clusters never
    share the cores, idle or not), and keeps it while the same variant is asked for again."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.up: tuple[Variant, Cluster, str, str] | None = None  # variant, cluster, gRPC and HTTP addresses

    async def use(self, variant: Variant) -> tuple[str, str]:
        """The (gRPC, HTTP) addresses to load: --address's, or the variant's local cluster's."""
        if self.args.address:
            return self.args.address, self.args.http_address
        if self.up is None or self.up[0] != variant:
            await self.stop()
            cluster, http = cluster_for(self.args, variant)
            self.up = (variant, cluster, await cluster.start(self.args.start_timeout), http)
        return self.up[2], self.up[3]

    def metrics_addresses(self) -> list[str]:
        """The gateway's and each prefill worker's /metrics of the cluster up (empty: none, or --address)."""
        cluster = self.up[1] if self.up is not None else None
        if cluster is None or cluster.gateway is None:
            return []
        return [cluster.gateway.metrics_address, *(c.metrics_address for c in cluster.prefill)]

    async def stop(self) -> None:
        if self.up is not None:
            cluster, self.up = self.up[1], None
            await asyncio.to_thread(cluster.stop)


async def all_runs(
    args: argparse.Namespace, lm: LoadedModel, first: BenchPrompts, workload: Workload
) -> dict[RunKey, list[RunResult]]:
    """Alternate rounds: the baselines (no cluster computing), then the schedule's cluster runs, one cluster up at
    a time (a single variant keeps its cluster for every rate and round)."""
    runs: dict[RunKey, list[RunResult]] = {}
    clusters = _OneCluster(args)
    apis = {"grpc": ["grpc"], "openai": ["openai"], "both": ["grpc", "openai"]}[args.api]
    try:
        for round_index in range(args.repeats):
            prompts = round_prompts(args, lm.tokenizer, first, round_index)
            if args.baseline != "none":
                for baseline, run in _baselines(args, lm, prompts.ids, workload, first_round=round_index == 0):
                    runs.setdefault(RunKey(baseline), []).append(run)
            for variant, rate in schedule(args):
                grpc_address, http_address = await clusters.use(variant)
                at_rate = dataclasses.replace(workload, request_rate=rate)
                for api in apis:
                    key = RunKey(variant, api, rate if args.request_rates else None)
                    address = grpc_address if api == "grpc" else http_address
                    before = _routing_counts(clusters.metrics_addresses())
                    run = await _cluster_run(args, address, at_rate, prompts, key)
                    after = _routing_counts(clusters.metrics_addresses())
                    run.routing = {where: n - before.get(where, 0.0) for where, n in after.items()}
                    runs.setdefault(key, []).append(run)
        return runs
    finally:
        await clusters.stop()


def _routing_counts(metrics_addresses: list[str]) -> dict[str, float]:
    """Where prefills went so far, from /metrics (the gateway's, then each prefill worker's): the gateway's choices
    by the index that made them ("exact", "approximate", "none") and the requests each worker prefilled
    ("prefill-0", ...). Empty without metrics (a remote cluster)."""
    if not metrics_addresses or not all(metrics_addresses):
        return {}
    gateway, *workers = (scrape_metrics(address) for address in metrics_addresses)
    counts = {
        dict(labels)["source"]: n
        for (name, labels), n in gateway.items()
        if name == "disagg_prefix_routing_decisions_total"
    }
    for (name, labels), n in gateway.items():
        if name == "disagg_local_prefill_total":
            counts["local-prefill-" + dict(labels)["outcome"]] = n
        if name == "disagg_held_prefix_handoffs_total":
            counts["held-prefix-" + dict(labels)["outcome"]] = n
    for i, samples in enumerate(workers):
        counts[f"prefill-{i}"] = samples.get(("disagg_prefill_forward_seconds_count", frozenset()), 0.0)
        counts["kv-bytes-sent"] = counts.get("kv-bytes-sent", 0.0) + samples.get(
            ("disagg_kv_transferred_bytes_total", frozenset()), 0.0
        )
    return counts
