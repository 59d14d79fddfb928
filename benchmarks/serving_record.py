"""The Markdown experiment record of a `disagg bench` run: one block per measured system, its notes saying what
that system was (read from its run key's fields), how it was batched and threaded, and where its prefills went."""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
from typing import TYPE_CHECKING

from benchmarks.report import ExperimentRecord, gpu_utilization, hardware, stats_line
from benchmarks.variants import Baseline, RunKey, Variant
from benchmarks.workloads import Workload
from disagg import config as cfg

if TYPE_CHECKING:
    from disagg.model.loading import LoadedModel


def _policy_text(args: argparse.Namespace, aggregated: bool = False) -> str:
    prefill, decode = cfg.role_defaults(cfg.BatchPolicy, "prefill"), cfg.role_defaults(cfg.BatchPolicy, "decode")

    def flag(extra: str, name: str, default: object) -> object:
        words = shlex.split(extra)
        return words[words.index(name) + 1] if name in words else default

    batch = (
        f"{flag(args.decode_args, '--max-batch-size', decode.max_batch_size)} / "
        f"{flag(args.decode_args, '--wait-window-ms', decode.wait_window_ms)} ms"
    )
    if aggregated:
        return (
            f"{args.workers} aggregated workers, each {batch} (prefill token budget per step "
            f"{flag(args.decode_args, '--token-budget', decode.token_budget)}, no chunked prefill)"
        )
    return (
        f"prefill {flag(args.prefill_args, '--max-batch-size', prefill.max_batch_size)} / "
        f"{flag(args.prefill_args, '--wait-window-ms', prefill.wait_window_ms)} ms "
        f"(token budget {flag(args.prefill_args, '--token-budget', prefill.token_budget)}); "
        f"decode {batch}; "
        f"generate() static batches: {args.concurrency} / none"
    )


def _threads_text(args: argparse.Namespace, aggregated: bool) -> str:
    """Who had which torch threads: the comparison is fair only at equal totals (README, aggregated vs
    disaggregated)."""
    transport = "as the gateway is configured" if args.address else args.kv_transport
    threads = args.threads or "auto (disagg up: each role's workers split the cores)"
    if aggregated:
        return f"{args.workers} aggregated workers --threads {threads} each (extra: '{args.decode_args}')"
    return (
        f"{args.prefill_workers} prefill + 1 decode worker(s) --threads {threads} each (extra: prefill "
        f"'{args.prefill_args}', decode '{args.decode_args}'), KV transport {transport}"
    )


def _cluster_notes(args: argparse.Namespace, variant: Variant, stats: dict) -> list[str]:
    """A disaggregated cluster's prefix cache, routing, conditional disaggregation and KV bytes, as measured."""
    prefix = "on" if variant.prefix_cache else "off (--prefix-cache-mb 0)"
    if args.address:
        prefix = "as the gateway's prefill workers are configured"
    notes = [
        f"prefix cache {prefix}: {stats['cached_prompt_tokens']} of {stats['prompt_tokens']} prompt tokens "
        f"cached (hit rate {stats['prefix_hit_rate']:.1%}, from usage.cached_prompt_tokens)"
    ]
    if not args.address:
        policy = "KV-aware" if variant.routing == "kv-aware" else "least-loaded (--no-prefix-routing)"
        notes.append(f"{args.prefill_workers} prefill worker(s), routing {policy}")
    routed = stats.get("routing", {})
    if variant.local_prefill:
        local = {k: v for k, v in routed.items() if k.startswith("local-prefill-")}
        outcomes = ", ".join(f"{k.removeprefix('local-prefill-')} {n:.0f}" for k, n in sorted(local.items()))
        held = {k: v for k, v in routed.items() if k.startswith("held-prefix-")}
        handed = ", ".join(f"{k.removeprefix('held-prefix-')} {n:.0f}" for k, n in sorted(held.items()))
        notes.append(
            f"conditional disaggregation (--local-prefill-tokens {args.local_prefill_tokens}): prompts "
            f"offered to the decode worker, warm-up included: {outcomes or 'none counted'}; handed back "
            f"without the blocks it held ({'on' if variant.held_prefix else 'off'}): "
            f"{handed or 'none'}"
        )
    if "kv-bytes-sent" in routed:
        notes.append(f"KV bytes the prefill workers sent, warm-up included: {routed['kv-bytes-sent']:.0f}")
    if counts := stats.get("routing"):  # (warm-up requests included)
        skip = ("local-prefill-", "held-prefix-", "kv-bytes-")
        counts = {k: n for k, n in counts.items() if not k.startswith(skip)}
        by_index = ", ".join(f"{k} {n:.0f}" for k, n in sorted(counts.items()) if not k.startswith("prefill-"))
        by_worker = ", ".join(f"{k} {n:.0f}" for k, n in sorted(counts.items()) if k.startswith("prefill-"))
        notes.append(
            f"prefill requests, warm-up included: by the index that chose the worker {by_index or 'none'}; "
            f"per worker {by_worker}"
        )
    return notes


def record_blocks(
    args: argparse.Namespace,
    lm: LoadedModel,
    workloads: dict[RunKey, Workload],
    prompt: str,
    results: dict[RunKey, dict],
    ratios: dict[str, float],
    load_before: tuple[float, ...],
    repeats: dict[RunKey, list[float]],
) -> list[str]:
    """One experiment record per result (keyed as `results`; `workloads` says what each one ran)."""
    busy = f"load average before the run {load_before[0]:.2f} (1 min) on {os.cpu_count()} cores" + (
        "; the machine was shared with other work, timings are noisy" if load_before[0] > 0.5 else ""
    )
    ratio_text = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
    model = f"{lm.name}" + (" (dummy seeded weights)" if args.load_format == "dummy" else "")
    blocks = []
    for key, stats in results.items():
        workload, system = workloads[key], key.system
        cluster = system if isinstance(system, Variant) else None
        one_at_a_time = isinstance(system, Baseline) and not system.static_batches
        aggregated = cluster is not None and cluster.aggregated
        threads = (
            _threads_text(args, aggregated)
            if cluster is not None
            else f"baseline torch threads {args.baseline_threads or os.cpu_count()}"
        )
        notes = [
            f"{stats['completed'] if one_at_a_time else workload.num_requests} "
            f"requests, concurrency {1 if one_at_a_time else workload.concurrency}, "
            + (f"{arrivals_text(workload)}, " if cluster is not None else "")
            + f"{workload_text(workload)}, {workload.output_tokens} output tokens, ignore_eos={workload.ignore_eos}",
            threads,
            busy,
        ]
        if cluster is not None and not cluster.aggregated:
            notes += _cluster_notes(args, cluster, stats)
        if len(repeats.get(key, [])) > 1:
            notes.append(f"best of {len(repeats[key])} alternating rounds (output tokens/s of each: {repeats[key]})")
        if cluster is not None:
            notes.append(f"ratios: {ratio_text}" if ratio_text else "no baseline in this run")
        if args.notes:
            notes.append(args.notes)
        goodput = ""
        if "goodput" in stats:
            slos = ", ".join(f"{k} <= {v:g} ms" for k, v in stats["slos_ms"].items())
            goodput = (
                f"; goodput {stats['goodput']:.2f} requests/s ({stats['good_requests']} of {stats['completed']} ok "
                f"within {slos})"
            )
        metrics = {
            "load_model": f"{lm.load_model_seconds:.2f} s (load_model in the bench process; workers load the same way)",
            "load_tokenizer": f"{lm.load_tokenizer_seconds * 1000:.0f} ms",
            "prefill": f"TTFT {stats_line(stats['ttft_s'])}",
            "decode_loop": f"TPOT {stats_line(stats['tpot_s'])}; ITL {stats_line(stats['itl_s'])}; "
            f"E2E {stats_line(stats['e2e_s'])}",
            "token/s": f"{stats['output_token_throughput']:.1f} output tokens/s, "
            f"{stats['request_throughput']:.2f} requests/s ({stats['completed']} ok, {stats['failed']} "
            f"failed, {stats['duration_s']:.1f} s wall){goodput}",
            "GPU Utilization": gpu_utilization(args.device),
            "Notes": "; ".join(notes),
        }
        record = ExperimentRecord(
            name=f"{args.name or 'bench'}: {key.label}",
            date=datetime.date.today().isoformat(),
            hardware=hardware(),
            model=model,
            dtype=args.dtype,
            prompt=prompt,
            kv_cache=cluster.kv_cache if cluster is not None else True,
            batch_policy=_policy_text(args, aggregated)
            if cluster is not None
            else ("1 / none (one at a time)" if one_at_a_time else f"{workload.concurrency} / none (static batches)"),
            metrics=metrics,
        )
        blocks.append(record.render())
    return blocks


def arrivals_text(workload: Workload) -> str:
    if workload.request_rate == float("inf"):
        return "all at once"
    return f"Poisson arrivals at {workload.request_rate:g} requests/s"


def workload_text(workload: Workload) -> str:
    """The workload in words, for the record's notes and the plot's title."""
    if workload.kind == "shared-system-prompt":
        return (
            f"shared-system-prompt: {workload.system_prompts} system prompts of {workload.system_tokens} tokens, "
            f"each request one of them + a distinct user turn of {workload.prompt_tokens} tokens"
        )
    if workload.kind == "multi-turn":
        starts = "all at once" if workload.request_rate == float("inf") else f"{workload.request_rate:g}/s Poisson"
        return (
            f"multi-turn: {workload.num_requests // workload.turns} conversations of {workload.turns} turns, each "
            f"re-sending the history (as {'token ids' if workload.history == 'tokens' else 'text'}) + a user "
            f"turn of {workload.prompt_tokens} tokens, conversations starting {starts}"
        )
    if workload.kind == "mixed":
        long = round(workload.num_requests * workload.long_fraction)
        return (
            f"mixed: {long} of {workload.num_requests} prompts {workload.long_prompt_tokens} tokens long, the rest "
            f"{workload.prompt_tokens} (seed {workload.seed})"
        )
    return f"{workload.prompt_tokens} prompt tokens"
