"""The `disagg bench` command: baselines first (on an otherwise idle machine), then the cluster, then the report.

Order matters on a small CPU: the in-process `generate()` baselines run before the local cluster starts (or while
a remote one is idle), so they never share cores with the workers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from disagg import config as cfg

if TYPE_CHECKING:  # the flags are built for every `disagg` command; the heavy imports wait for `bench` itself
    from tqdm import tqdm
    from transformers import PreTrainedTokenizerBase

    from disagg.model.loading import LoadedModel
    from disagg.tools.bench import RunResult, Workload
    from disagg.tools.cluster import Cluster


def add_bench_flags(parser: argparse.ArgumentParser) -> None:
    cfg.add_model_flags(parser)
    parser.set_defaults(load_format="dummy", threads=1)
    w = parser.add_argument_group("workload")
    w.add_argument("--num-requests", type=int, default=64)
    w.add_argument("--concurrency", type=int, default=1, help="most requests in flight")
    w.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Poisson arrivals per second (default inf: all at once, limited by --concurrency); multi-turn: "
        "conversation starts per second",
    )
    w.add_argument(
        "--workload",
        default="random",
        choices=["random", "shared-system-prompt", "multi-turn"],
        help="random: distinct prompts; shared-system-prompt: one of --system-prompts system prompts of "
        "--system-tokens + a distinct user turn of --prompt-tokens; multi-turn: conversations of --turns turns, each "
        "re-sending the history (user turns and replies) + a new user turn of --prompt-tokens",
    )
    w.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        help="prompt tokens (random, default 128), or of each user turn (the other workloads, default 64)",
    )
    w.add_argument(
        "--output-tokens", type=int, default=None, help="tokens generated per request (default 64; multi-turn 96)"
    )
    w.add_argument("--system-prompts", type=int, default=4, help="shared-system-prompt: distinct system prompts")
    w.add_argument("--system-tokens", type=int, default=512, help="shared-system-prompt: tokens of each")
    w.add_argument("--turns", type=int, default=6, help="multi-turn: turns per conversation")
    w.add_argument(
        "--conversations",
        type=int,
        default=0,
        help="multi-turn: conversations (default --num-requests / --turns); the run sends conversations x turns",
    )
    w.add_argument("--ignore-eos", default=True, action=argparse.BooleanOptionalAction)
    w.add_argument("--warmup-requests", type=int, default=2, help="sent before timing starts (not counted)")
    c = parser.add_argument_group("cluster")
    c.add_argument("--address", default="", help="benchmark this gateway instead of starting a local cluster")
    c.add_argument(
        "--kv-cache",
        default="on",
        choices=["on", "off", "both"],
        help="'both' runs the cluster twice (KV cache on, then off) for the comparison",
    )
    c.add_argument(
        "--prefix-cache",
        default="on",
        choices=["on", "off", "both"],
        help="the prefill workers' prefix cache ('off' passes --prefix-cache-mb 0); 'both' runs the same workload "
        "on a cluster with it on and one with it off",
    )
    c.add_argument("--prefill-workers", type=int, default=1, help="prefill workers of the local cluster")
    c.add_argument(
        "--routing",
        default="kv-aware",
        choices=["kv-aware", "least-loaded", "both"],
        help="the gateway's choice of prefill worker (matters with --prefill-workers > 1): kv-aware (its default: "
        "the workers' cache events, else its own routing decisions), least-loaded (--no-prefix-routing); 'both' "
        "runs the same workload on a cluster of each",
    )
    c.add_argument(
        "--kv-transport",
        default="relayed",
        choices=cfg.KV_TRANSPORTS,
        help="how the local cluster's KV cache reaches the decode worker",
    )
    c.add_argument(
        "--api",
        default="grpc",
        choices=["grpc", "openai", "both"],
        help="which front to load: the gRPC Generate, the OpenAI-compatible HTTP API (local cluster: its gateway "
        "gets --http-port; with --address, --http-address), or both in alternation on the same cluster",
    )
    c.add_argument("--http-address", default="", help="with --address: the gateway's HTTP API, e.g. host:8000")
    c.add_argument("--gateway-args", default="", help="extra flags for the gateway, e.g. '--stream-interval-tokens 8'")
    c.add_argument("--prefill-args", default="", help="extra flags for the prefill worker, e.g. '--threads 2'")
    c.add_argument("--decode-args", default="", help="extra flags for the decode worker")
    c.add_argument("--start-timeout", type=float, default=300.0)
    c.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="alternate baseline and cluster rounds this many times; the best round of each is reported",
    )
    b = parser.add_argument_group("baselines")
    b.add_argument("--baseline", default="all", choices=["all", "sequential", "static", "none"])
    b.add_argument(
        "--baseline-requests",
        type=int,
        default=8,
        help="requests of the one-at-a-time baseline (each costs a full generate(); stats are per request)",
    )
    b.add_argument("--baseline-threads", type=int, default=0, help="torch threads of the baselines (0 = all cores)")
    o = parser.add_argument_group("output")
    o.add_argument("--output", default="", help="path prefix: writes PREFIX.json, PREFIX.md and PREFIX.png")
    o.add_argument("--name", default="", help="experiment name in the record")
    o.add_argument("--notes", default="", help="free text for the record's Notes (e.g. 'machine busy')")


def _progress(total: int, desc: str) -> tqdm:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)


def _worker_args(args: argparse.Namespace, kv_on: bool) -> list[str]:
    from disagg.tools.cluster import worker_args

    return worker_args(args, kv_on)


@dataclasses.dataclass
class BenchPrompts:
    """What the drivers send: token ids (for the baselines), their texts, the multi-turn conversations' user turns
    (texts), and the warm-up prompts (distinct from the workload's where a cache could remember them)."""

    ids: list[list[int]]
    texts: list[str]
    conversations: list[list[str]]
    warmup: list[str]


def resolve_workload_defaults(args: argparse.Namespace) -> None:
    """The defaults that depend on --workload: 128 prompt tokens for random, 64-token user turns otherwise (the
    issue's 512 + 64 shape); 96 output tokens for multi-turn: 6 x 64 + 5 x 96 = 864 prompt tokens at the last turn,
    + 96 generated = 960, under GPT-2's 1,024 positions (128 would reach 1,152: past them, the decode worker fails)."""
    if args.prompt_tokens is None:
        args.prompt_tokens = 128 if args.workload == "random" else 64
    if args.output_tokens is None:
        args.output_tokens = 96 if args.workload == "multi-turn" else 64
    if args.workload == "multi-turn":
        args.conversations = args.conversations or max(1, args.num_requests // args.turns)
        args.num_requests = args.conversations * args.turns


def build_prompts(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> BenchPrompts:
    from disagg.tools.bench import make_conversations, make_prompts, make_shared_system_prompts

    def text(ids: list[int]) -> str:
        return cast(str, tokenizer.decode(ids))  # (one list of ids decodes to one str)

    conversations: list[list[str]] = []
    if args.workload == "shared-system-prompt":
        ids = make_shared_system_prompts(
            tokenizer, args.num_requests, args.system_prompts, args.system_tokens, args.prompt_tokens, args.seed
        )
    elif args.workload == "multi-turn":
        turns = make_conversations(tokenizer, args.conversations, args.turns, args.prompt_tokens, args.seed)
        conversations = [[text(t) for t in conv] for conv in turns]
        ids = [conv[0] for conv in turns]  # first turns: what the warm-up length and the record's prompt show
    else:
        ids = make_prompts(tokenizer, args.num_requests, args.prompt_tokens, args.seed)
    texts = [text(i) for i in ids]
    if args.workload == "random":
        warmup = texts  # as before: the first prompts of the workload
    else:  # prompts of their own, so that warming up does not fill the prefix cache with the workload's
        length = len(ids[0])
        warmup = [text(i) for i in make_prompts(tokenizer, max(1, args.warmup_requests), length, args.seed + 7919)]
    return BenchPrompts(ids, texts, conversations, warmup)


def cluster_name(kv_on: bool, prefix_on: bool, kv_aware: bool = True) -> str:
    return (
        "cluster"
        + ("" if kv_on else "_kv_off")
        + ("" if prefix_on else "_prefix_off")
        + ("" if kv_aware else "_least_loaded")
    )


async def _start_cluster(
    args: argparse.Namespace, kv_on: bool, prefix_on: bool = True, kv_aware: bool = True
) -> tuple[Cluster, str, str]:
    from disagg.tools.cluster import Cluster, free_port

    gateway_args = ["--kv-transport", args.kv_transport, *shlex.split(args.gateway_args)]
    gateway_args += [] if kv_aware else ["--no-prefix-routing"]
    http = ""
    if args.api != "grpc":
        port = free_port()
        gateway_args += ["--http-port", str(port), "--served-model-name", args.model]
        http = f"127.0.0.1:{port}"
    prefill_args = shlex.split(args.prefill_args) + ([] if prefix_on else ["--prefix-cache-mb", "0"])
    cluster = Cluster(
        _worker_args(args, kv_on),
        gateway_args,
        prefill_workers=args.prefill_workers,
        prefill_args=prefill_args,
        decode_args=shlex.split(args.decode_args),
    )
    return cluster, await cluster.start(args.start_timeout), http


async def _cluster_run(
    args: argparse.Namespace, address: str, workload: Workload, prompts: BenchPrompts, name: str
) -> RunResult:
    from disagg.tools.bench import Workload, run_against_gateway, run_against_openai, run_conversations

    def run(target: Workload, texts: list[str], on_done: Callable[[], None] = lambda: None) -> Awaitable[RunResult]:
        if name.endswith("_openai"):  # address: the gateway's HTTP host:port
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
    bar = _progress(workload.num_requests, name)
    if workload.kind == "multi-turn":
        result = await run_conversations(address, workload, prompts.conversations, bar.update)
    else:
        result = await run(workload, prompts.texts, bar.update)
    bar.close()
    result.name = name
    return result


def _baselines(
    args: argparse.Namespace, lm: LoadedModel, prompt_ids: list[list[int]], workload: Workload, first_round: bool
) -> list[RunResult]:
    """One round of the in-process baselines; the one-at-a-time one runs in the first round only when it is not
    the comparison that matters (concurrency > 1)."""
    from disagg.tools.bench import Workload
    from disagg.tools.bench_baseline import generate_sequential, generate_static_batches

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
        runs.append(generate_sequential(lm, prompt_ids, seq, on_done=bar.update))
        bar.close()
    if args.baseline in ("all", "static") and workload.concurrency > 1:
        bar = _progress(workload.num_requests, f"generate() static batches of {workload.concurrency}")
        runs.append(generate_static_batches(lm, prompt_ids, workload, on_done=bar.update))
        bar.close()
    return runs


async def _all_runs(
    args: argparse.Namespace, lm: LoadedModel, prompts: BenchPrompts, workload: Workload
) -> dict[str, list[RunResult]]:
    """Start the cluster(s), then alternate rounds: baselines (cluster idle), then each cluster under load."""
    modes = {"on": [True], "off": [False], "both": [True, False]}
    routings = {"kv-aware": [True], "least-loaded": [False], "both": [True, False]}[args.routing]
    clusters, addresses, metrics = [], {}, {}
    prompt_ids = prompts.ids
    try:
        for kv_on, prefix_on, kv_aware in [
            (k, p, r) for k in modes[args.kv_cache] for p in modes[args.prefix_cache] for r in routings
        ]:
            name = cluster_name(kv_on, prefix_on, kv_aware)
            if args.address:
                grpc_address, http_address = args.address, args.http_address
            else:
                cluster, grpc_address, http_address = await _start_cluster(args, kv_on, prefix_on, kv_aware)
                clusters.append(cluster)
                assert cluster.gateway is not None  # (started)
                metrics[name] = [cluster.gateway.metrics_address, *(c.metrics_address for c in cluster.prefill)]
            if args.api in ("grpc", "both"):
                addresses[name] = grpc_address
            if args.api in ("openai", "both"):
                if not http_address:
                    raise SystemExit("--api openai with --address needs --http-address")
                addresses[name + "_openai"] = http_address
        runs: dict[str, list[RunResult]] = {}
        for round_index in range(args.repeats):
            if args.baseline != "none":
                for run in _baselines(args, lm, prompt_ids, workload, first_round=round_index == 0):
                    runs.setdefault(run.name, []).append(run)
            for name, address in addresses.items():
                before = _routing_counts(metrics.get(name, []))
                run = await _cluster_run(args, address, workload, prompts, name)
                after = _routing_counts(metrics.get(name, []))
                run.routing = {key: n - before.get(key, 0.0) for key, n in after.items()}
                runs.setdefault(name, []).append(run)
        return runs
    finally:
        for cluster in clusters:
            await asyncio.to_thread(cluster.stop)


def _routing_counts(metrics_addresses: list[str]) -> dict[str, float]:
    """Where prefills went so far, from /metrics (the gateway's, then each prefill worker's): the gateway's choices
    by the index that made them ("exact", "approximate", "none") and the requests each worker prefilled
    ("prefill-0", ...). Empty without metrics (a remote cluster)."""
    from disagg.tools.client import scrape_metrics

    if not metrics_addresses or not all(metrics_addresses):
        return {}
    gateway, *workers = (scrape_metrics(address) for address in metrics_addresses)
    counts = {
        dict(labels)["source"]: n
        for (name, labels), n in gateway.items()
        if name == "disagg_prefix_routing_decisions_total"
    }
    for i, samples in enumerate(workers):
        counts[f"prefill-{i}"] = samples.get(("disagg_prefill_forward_seconds_count", frozenset()), 0.0)
    return counts


def _policy_text(args: argparse.Namespace) -> str:
    prefill, decode = cfg.BatchPolicy(max_batch_size=16), cfg.BatchPolicy()

    def flag(extra: str, name: str, default: object) -> object:
        words = shlex.split(extra)
        return words[words.index(name) + 1] if name in words else default

    return (
        f"prefill {flag(args.prefill_args, '--max-batch-size', prefill.max_batch_size)} / "
        f"{flag(args.prefill_args, '--wait-window-ms', prefill.wait_window_ms)} ms "
        f"(token budget {flag(args.prefill_args, '--token-budget', prefill.token_budget)}); "
        f"decode {flag(args.decode_args, '--max-batch-size', decode.max_batch_size)} / "
        f"{flag(args.decode_args, '--wait-window-ms', decode.wait_window_ms)} ms; "
        f"generate() static batches: {args.concurrency} / none"
    )


def _records(
    args: argparse.Namespace,
    lm: LoadedModel,
    workload: Workload,
    prompt: str,
    results: dict[str, dict],
    ratios: dict[str, float],
    load_before: tuple[float, ...],
    command: str,
    repeats: dict[str, list[float]],
) -> str:
    from disagg.tools.bench import format_table
    from disagg.tools.experiment_record import ExperimentRecord, gpu_utilization, hardware, stats_line

    transport = "as the gateway is configured" if args.address else args.kv_transport
    threads = (
        f"cluster workers --threads {args.threads} each (extra: prefill '{args.prefill_args}', decode "
        f"'{args.decode_args}'), KV transport {transport}; "
        f"baseline torch threads {args.baseline_threads or os.cpu_count()}"
    )
    busy = f"load average before the run {load_before[0]:.2f} (1 min) on {os.cpu_count()} cores" + (
        "; the machine was shared with other work, timings are noisy" if load_before[0] > 0.5 else ""
    )
    ratio_text = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
    model = f"{lm.name}" + (" (dummy seeded weights)" if args.load_format == "dummy" else "")
    blocks = []
    for name, stats in results.items():
        kv_on = "kv_off" not in name
        notes = [
            f"{workload.num_requests if name.startswith('cluster') or 'static' in name else stats['completed']} "
            f"requests, concurrency {1 if name == 'generate_sequential' else workload.concurrency}, "
            f"{_workload_text(workload)}, {workload.output_tokens} output tokens, "
            f"ignore_eos={workload.ignore_eos}",
            threads,
            busy,
        ]
        if name.startswith("cluster"):
            prefix = "off (--prefix-cache-mb 0)" if "prefix_off" in name else "on"
            if args.address:
                prefix = "as the gateway's prefill workers are configured"
            notes.append(
                f"prefix cache {prefix}: {stats['cached_prompt_tokens']} of {stats['prompt_tokens']} prompt tokens "
                f"cached (hit rate {stats['prefix_hit_rate']:.1%}, from usage.cached_prompt_tokens)"
            )
            if not args.address:
                policy = "least-loaded (--no-prefix-routing)" if "least_loaded" in name else "KV-aware"
                notes.append(f"{args.prefill_workers} prefill worker(s), routing {policy}")
            if counts := stats.get("routing"):  # (warm-up requests included)
                by_index = ", ".join(f"{k} {n:.0f}" for k, n in sorted(counts.items()) if not k.startswith("prefill-"))
                by_worker = ", ".join(f"{k} {n:.0f}" for k, n in sorted(counts.items()) if k.startswith("prefill-"))
                notes.append(
                    f"prefill requests, warm-up included: by the index that chose the worker {by_index or 'none'}; "
                    f"per worker {by_worker}"
                )
        if len(repeats.get(name, [])) > 1:
            notes.append(f"best of {len(repeats[name])} alternating rounds (output tokens/s of each: {repeats[name]})")
        if name.startswith("cluster"):
            notes.append(f"ratios: {ratio_text}" if ratio_text else "no baseline in this run")
        if args.notes:
            notes.append(args.notes)
        metrics = {
            "load_model": f"{lm.load_model_seconds:.2f} s (load_model in the bench process; workers load the same way)",
            "load_tokenizer": f"{lm.load_tokenizer_seconds * 1000:.0f} ms",
            "prefill": f"TTFT {stats_line(stats['ttft_s'])}",
            "decode_loop": f"TPOT {stats_line(stats['tpot_s'])}; ITL {stats_line(stats['itl_s'])}; "
            f"E2E {stats_line(stats['e2e_s'])}",
            "token/s": f"{stats['output_token_throughput']:.1f} output tokens/s, "
            f"{stats['request_throughput']:.2f} requests/s ({stats['completed']} ok, {stats['failed']} "
            f"failed, {stats['duration_s']:.1f} s wall)",
            "GPU Utilization": gpu_utilization(args.device),
            "Notes": "; ".join(notes),
        }
        record = ExperimentRecord(
            name=f"{args.name or 'bench'}: {name}",
            date=datetime.date.today().isoformat(),
            hardware=hardware(),
            model=model,
            dtype=args.dtype,
            prompt=prompt,
            kv_cache=kv_on,
            batch_policy=_policy_text(args)
            if name.startswith("cluster")
            else (
                "1 / none (one at a time)"
                if name == "generate_sequential"
                else f"{workload.concurrency} / none (static batches)"
            ),
            metrics=metrics,
        )
        blocks.append(record.render())
    table = format_table(results, ratios)
    return (
        f"# {args.name or 'disagg bench'}\n\nCommand:\n\n```\n{command}\n```\n\n"
        f"Side by side:\n\n```\n{table}\n```\n\n" + "\n\n".join(blocks) + "\n"
    )


def _workload_text(workload: Workload) -> str:
    if workload.kind == "shared-system-prompt":
        return (
            f"shared-system-prompt: {workload.system_prompts} system prompts of {workload.system_tokens} tokens, "
            f"each request one of them + a distinct user turn of {workload.prompt_tokens} tokens"
        )
    if workload.kind == "multi-turn":
        starts = "all at once" if workload.request_rate == float("inf") else f"{workload.request_rate:g}/s Poisson"
        return (
            f"multi-turn: {workload.num_requests // workload.turns} conversations of {workload.turns} turns, each "
            f"re-sending the history + a user turn of {workload.prompt_tokens} tokens, conversations starting "
            f"{starts}"
        )
    return f"{workload.prompt_tokens} prompt tokens"


def bench_main(args: argparse.Namespace) -> None:
    import torch

    from disagg.model.loading import load_model
    from disagg.tools.bench import Workload, comparison, format_table, plot, save_json
    from disagg.tools.experiment_record import hardware

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = shlex.join(["disagg", *getattr(args, "argv", sys.argv[1:])])
    load_before = os.getloadavg()
    torch.set_num_threads(args.baseline_threads or os.cpu_count() or 1)
    resolve_workload_defaults(args)
    if args.workload == "multi-turn" and args.api != "grpc":
        raise SystemExit("--workload multi-turn drives the gRPC front only (--api grpc)")
    if args.address and args.prefix_cache != "on":
        raise SystemExit("--prefix-cache off/both starts its own clusters: not with --address")
    if args.address and args.routing != "kv-aware":
        raise SystemExit("--routing least-loaded/both starts its own clusters: not with --address")
    if args.workload == "multi-turn" and args.baseline != "none":
        print("multi-turn: no generate() baseline (histories depend on the replies): --baseline none", file=sys.stderr)
        args.baseline = "none"
    lm = load_model(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device, seed=args.seed)
    workload = Workload(
        args.num_requests,
        args.prompt_tokens,
        args.output_tokens,
        args.concurrency,
        args.request_rate,
        args.ignore_eos,
        args.seed,
        kind=args.workload,
        system_prompts=args.system_prompts if args.workload == "shared-system-prompt" else 0,
        system_tokens=args.system_tokens if args.workload == "shared-system-prompt" else 0,
        turns=args.turns if args.workload == "multi-turn" else 1,
    )
    prompts = build_prompts(args, lm.tokenizer)

    all_runs = asyncio.run(_all_runs(args, lm, prompts, workload))
    # Best of the repeats for each system: on a shared machine, noise only ever slows a run down.
    runs = [max(found, key=lambda r: r.stats()["output_token_throughput"]) for found in all_runs.values()]
    results = {run.name: run.stats() for run in runs}
    repeats = {
        name: [round(r.stats()["output_token_throughput"], 2) for r in found] for name, found in all_runs.items()
    }
    ratios = comparison(results)
    if "cluster" in results and "cluster_kv_off" in results:
        on, off = results["cluster"], results["cluster_kv_off"]
        ratios["kv_off_e2e_vs_on"] = off["e2e_s"]["mean"] / on["e2e_s"]["mean"]
        ratios["kv_off_tpot_vs_on"] = off["tpot_s"]["mean"] / on["tpot_s"]["mean"]
        ratios["kv_off_throughput_vs_on"] = off["output_token_throughput"] / on["output_token_throughput"]
    print(format_table(results, ratios))
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        prompt_text = prompts.texts[0][:80].replace('"', "'").replace("\n", " ") + f"... ({len(prompts.ids[0])} tokens)"
        payload = {
            "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "hardware": hardware(),
            "workload": {**dataclasses.asdict(workload), "request_rate": str(workload.request_rate)},
            "model": args.model,
            "load_format": args.load_format,
            "dtype": args.dtype,
            "threads": {
                "workers": args.threads,
                "prefill_args": args.prefill_args,
                "decode_args": args.decode_args,
                "baseline": args.baseline_threads or os.cpu_count(),
            },
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "results": results,
            "ratios": ratios,
            "output_tokens_per_s_of_every_repeat": repeats,
        }
        save_json(args.output + ".json", payload)
        with open(args.output + ".md", "w") as f:
            f.write(_records(args, lm, workload, prompt_text, results, ratios, load_before, command, repeats))
        plot(
            args.output + ".png",
            runs,
            f"{args.model} {args.dtype}: {args.workload}, {args.num_requests} requests, concurrency "
            f"{args.concurrency}, {args.prompt_tokens}+{args.output_tokens} tokens",
        )
        print(f"wrote {args.output}.json, .md and .png", file=sys.stderr)
