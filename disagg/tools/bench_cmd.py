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
from typing import TYPE_CHECKING, NamedTuple, cast

from disagg import config as cfg

if TYPE_CHECKING:  # the flags are built for every `disagg` command; the heavy imports wait for `bench` itself
    from tqdm import tqdm
    from transformers import PreTrainedTokenizerBase

    from disagg.model.loading import LoadedModel
    from disagg.tools.bench import RunResult, Workload
    from disagg.tools.cluster import Cluster


def add_bench_flags(parser: argparse.ArgumentParser) -> None:
    cfg.add_model_flags(parser)
    parser.set_defaults(load_format="dummy")  # threads 0: as `disagg up` chooses
    w = parser.add_argument_group("workload")
    w.add_argument("--num-requests", type=int, default=64)
    w.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="most requests in flight (default 1; with a finite --request-rate(s), --num-requests: open loop)",
    )
    rate = w.add_mutually_exclusive_group()
    rate.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Poisson arrivals per second (default inf: all at once, limited by --concurrency); multi-turn: "
        "conversation starts per second",
    )
    rate.add_argument(
        "--request-rates",
        type=_rates,
        default=None,
        metavar="R1,R2,...",
        help="a sweep: the same workload at each Poisson rate in turn (e.g. 1,2,4); the record gets a table per "
        "(mode, rate) and a plot of p99 ITL and goodput against the rate",
    )
    w.add_argument(
        "--workload",
        default="random",
        choices=["random", "shared-system-prompt", "multi-turn", "mixed"],
        help="random: distinct prompts; shared-system-prompt: one of --system-prompts system prompts of "
        "--system-tokens + a distinct user turn of --prompt-tokens; multi-turn: conversations of --turns turns, each "
        "re-sending the history (user turns and replies) + a new user turn of --prompt-tokens; mixed: distinct "
        "prompts, --long-fraction of them --long-prompt-tokens long, the rest --prompt-tokens (seeded by --seed)",
    )
    w.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        help="prompt tokens (random, default 128; mixed: the short prompts), or of each user turn (the other "
        "workloads); default 64 but for random",
    )
    w.add_argument("--long-fraction", type=float, default=0.2, help="mixed: the share of long prompts (exact)")
    w.add_argument(
        "--long-prompt-tokens",
        type=int,
        default=1000,
        help="mixed: tokens of a long prompt, cut to the model's context minus --output-tokens (distilgpt2: 960)",
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
    w.add_argument(
        "--history",
        default="text",
        choices=["text", "tokens"],
        help="multi-turn: how each turn re-sends the history: as text (a chat client; the server re-encodes it, "
        "and a reply may come back as other tokens than were generated) or as the token ids sent and received "
        "(GenerateRequest.prompt_token_ids)",
    )
    w.add_argument("--ignore-eos", default=True, action=argparse.BooleanOptionalAction)
    w.add_argument("--warmup-requests", type=int, default=2, help="sent before timing starts (not counted)")
    w.add_argument(
        "--goodput",
        nargs="+",
        default=[],
        metavar="METRIC:MS",
        help="SLOs as vLLM takes them, e.g. 'ttft:2000 tpot:150' (metrics ttft, tpot, itl = every gap of a "
        "request, e2e or e2el; milliseconds): goodput = requests/s that met all of them",
    )
    c = parser.add_argument_group("cluster")
    c.add_argument("--address", default="", help="benchmark this gateway instead of starting a local cluster")
    c.add_argument(
        "--mode",
        default="disaggregated",
        choices=["disaggregated", "aggregated", "both"],
        help="the local cluster: 1 prefill + 1 decode worker, --workers aggregated workers, or 'both': at each "
        "rate the same workload against one and then the other, one cluster up at a time",
    )
    c.add_argument(
        "--workers",
        type=int,
        default=2,
        help="aggregated workers of the aggregated cluster (default 2: as many processes as the disaggregated "
        "cluster's prefill + decode worker; with --threads 0 they split the cores)",
    )
    _on_off_both(c, "--kv-cache", "on", "'both' runs the cluster twice (KV cache on, then off) for the comparison")
    _on_off_both(
        c,
        "--prefix-cache",
        None,
        "the workers' prefix caches (prefill workers; decode workers with --local-prefill; aggregated "
        "workers): 'off' passes them --prefix-cache-mb 0; 'both' runs the same workload on a cluster with them on "
        "and one with them off. Default on; off with --mode both or --request-rates (each rate re-sends the same "
        "prompts)",
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
    _on_off_both(
        c,
        "--local-prefill",
        "on",
        "conditional disaggregation of the disaggregated cluster, on as in `disagg up`: decode workers "
        "--local-prefill and the gateway's --local-prefill-tokens (a prompt whose tokens the decode worker "
        "mostly holds, e.g. a conversation's next turn, is prefilled there); 'both' runs the same workload on a "
        "cluster without it and one with it",
    )
    c.add_argument(
        "--local-prefill-tokens",
        type=int,
        default=cfg.LOCAL_PREFILL_TOKENS,
        help="with --local-prefill: the threshold (uncached prompt tokens) the gateway gets",
    )
    _on_off_both(
        c,
        "--handoff-held-prefix",
        "on",
        "with --local-prefill: a prompt the decode worker declined goes back to it without the KV blocks it "
        "holds (the gateway's --handoff-held-prefix, on as in `disagg up`); 'both' runs the same workload on a "
        "cluster without it and one with it",
    )
    _on_off_both(
        c,
        "--greedy-screen",
        "on",
        "workers pick greedy tokens with the exact bfloat16 screen of the vocabulary (--greedy-screen auto, their "
        "default) or, off, from float32 logits (--greedy-screen off); 'both' runs the same workload on a cluster "
        "of each (the decode step's A/B)",
    )
    c.add_argument(
        "--kv-transport",
        default="shared-memory",  # as `disagg up`
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


def _rates(text: str) -> list[float]:
    """'1,2,4' -> [1.0, 2.0, 4.0]: positive rates (inf allowed: all at once), for --request-rates."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated requests/s, e.g. 1,2,4") from None
    if not rates or any(not rate > 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: every rate must be a positive number of requests/s")
    return rates


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
    conversations: list[list[str]] | list[list[list[int]]]  # user turns as text, or as ids (--history tokens)
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


def resolve_run_args(args: argparse.Namespace) -> None:
    """Check and complete the sweep's flags before any model loads: SLOs parsed into `args.slos_ms` (a bad one is
    an error, not a dropped SLO), `args.rates`, and the defaults that depend on them (concurrency, prefix cache)."""
    from disagg.tools.bench import parse_goodput

    try:
        args.slos_ms = parse_goodput(args.goodput)
    except ValueError as exc:
        raise SystemExit(f"disagg bench: --goodput {exc}") from None
    args.rates = args.request_rates or [args.request_rate]
    if args.concurrency is None:  # a rate shapes the load only when nothing caps the requests in flight
        args.concurrency = args.num_requests if any(r != float("inf") for r in args.rates) else 1
    if args.prefix_cache is None:
        args.prefix_cache = "off" if not args.address and (args.mode == "both" or args.request_rates) else "on"
    if args.address and args.prefix_cache != "on":
        raise SystemExit("--prefix-cache off/both starts its own clusters: not with --address")
    if args.address and args.greedy_screen != "on":
        raise SystemExit("--greedy-screen off/both starts its own clusters: not with --address")
    if args.address and args.mode == "both":
        raise SystemExit("--mode both starts its own clusters: not with --address")
    if args.address and args.api != "grpc" and not args.http_address:
        raise SystemExit("--api openai with --address needs --http-address")
    if args.workload == "mixed" and not 0 <= args.long_fraction <= 1:
        raise SystemExit(f"--long-fraction {args.long_fraction}: must be between 0 and 1")


def build_prompts(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> BenchPrompts:
    from disagg.tools.bench import make_conversations, make_mixed_prompts, make_prompts, make_shared_system_prompts

    def text(ids: list[int]) -> str:
        return cast(str, tokenizer.decode(ids))  # (one list of ids decodes to one str)

    conversations: list[list[str]] | list[list[list[int]]] = []
    if args.workload == "shared-system-prompt":
        ids = make_shared_system_prompts(
            tokenizer, args.num_requests, args.system_prompts, args.system_tokens, args.prompt_tokens, args.seed
        )
    elif args.workload == "multi-turn":
        turns = make_conversations(tokenizer, args.conversations, args.turns, args.prompt_tokens, args.seed)
        conversations = turns if args.history == "tokens" else [[text(t) for t in conv] for conv in turns]
        ids = [conv[0] for conv in turns]  # first turns: what the warm-up length and the record's prompt show
    elif args.workload == "mixed":
        ids = make_mixed_prompts(
            tokenizer, args.num_requests, args.prompt_tokens, args.long_prompt_tokens, args.long_fraction, args.seed
        )
    else:
        ids = make_prompts(tokenizer, args.num_requests, args.prompt_tokens, args.seed)
    texts = [text(i) for i in ids]
    # Prompts of their own, so that warming up does not fill the prefix cache (on by default) with the workload's.
    count = max(1, args.warmup_requests)
    if args.workload == "mixed":  # half long, half short: both kinds of forward pass warmed up
        warm = make_mixed_prompts(tokenizer, count, args.prompt_tokens, args.long_prompt_tokens, 0.5, args.seed + 7919)
    else:
        warm = make_prompts(tokenizer, count, len(ids[0]), args.seed + 7919)
    warmup = [text(i) for i in warm]
    return BenchPrompts(ids, texts, conversations, warmup)


def _on_off_both(group: argparse._ArgumentGroup, flag: str, default: str | None, help_text: str) -> None:
    """A cluster setting to measure on, off, or 'both' (the same workload on a cluster of each)."""
    group.add_argument(flag, default=default, choices=["on", "off", "both"], help=help_text)


class Variant(NamedTuple):
    """One cluster configuration of the invocation; the 'both' flags multiply into several, measured in turn."""

    kv_on: bool = True
    prefix_on: bool = True  # the workers' prefix caches (prefill; decode with --local-prefill; aggregated)
    aggregated: bool = False
    kv_aware: bool = True  # the gateway's KV-aware routing of prefill workers (--routing)
    local_prefill: bool = True  # conditional disaggregation (--local-prefill)
    held_prefix: bool = True  # ... handing a declined prompt back without the blocks the decode worker holds
    greedy_screen: bool = True  # the workers' --greedy-screen auto (off: float32 logits)

    @property
    def name(self) -> str:
        return (
            ("cluster_aggregated" if self.aggregated else "cluster")
            + ("" if self.kv_on else "_kv_off")
            + ("" if self.prefix_on else "_prefix_off")
            + ("" if self.kv_aware or self.aggregated else "_least_loaded")
            + ("_local_prefill_off" if not self.local_prefill and not self.aggregated else "")
            + ("_whole_handoff" if not self.held_prefix and self.local_prefill and not self.aggregated else "")
            + ("" if self.greedy_screen else "_float32_head")
        )


def variants(args: argparse.Namespace) -> list[Variant]:
    """The clusters that --mode, --kv-cache, --prefix-cache, --routing and --local-prefill ask for (routing and
    local prefill only vary the disaggregated cluster)."""
    modes = {"on": [True], "off": [False], "both": [True, False]}
    aggregated = {"disaggregated": [False], "aggregated": [True], "both": [False, True]}[args.mode]
    routing = {"kv-aware": [True], "least-loaded": [False], "both": [True, False]}[args.routing]
    local = {"on": [True], "off": [False], "both": [False, True]}[args.local_prefill]
    held = {"on": [True], "off": [False], "both": [False, True]}[args.handoff_held_prefix]
    screen = {"on": [True], "off": [False], "both": [False, True]}[args.greedy_screen]
    return [
        Variant(kv_on, prefix_on, agg, kv_aware, local_prefill, held_prefix, greedy_screen)
        for agg in aggregated
        for kv_on in modes[args.kv_cache]
        for prefix_on in modes[args.prefix_cache]
        for kv_aware in (routing if not agg else [True])
        for local_prefill in (local if not agg else [True])
        for held_prefix in (held if local_prefill and not agg else [True])
        for greedy_screen in screen
    ]


def mode_label(name: str, args: argparse.Namespace) -> str:
    """A run's name as the sweep's line: cluster -> disaggregated, cluster_aggregated -> aggregated, keeping the
    suffixes of what the invocation varies (`_kv_off` with --kv-cache both; `_openai`)."""
    label = name.replace("cluster_aggregated", "aggregated").replace("cluster", "disaggregated")
    for flag, suffix in (
        (args.kv_cache, "_kv_off"),
        (args.prefix_cache, "_prefix_off"),
        (args.routing, "_least_loaded"),
        (args.local_prefill, "_local_prefill_off"),
        (args.handoff_held_prefix, "_whole_handoff"),
        (args.greedy_screen, "_float32_head"),
    ):
        if flag != "both":
            label = label.replace(suffix, "")
    return label


@dataclasses.dataclass(frozen=True)
class RunKey:
    """What one measured run was: a system (baseline or cluster variant, with its front) at a sweep's rate."""

    name: str
    rate: float | None = None  # the --request-rates point (None: no sweep, or a baseline)

    @property
    def label(self) -> str:
        return self.name if self.rate is None else f"{self.name}@{self.rate:g}/s"


def schedule(args: argparse.Namespace) -> list[tuple[Variant, float]]:
    """The order of the cluster runs of one round: at each rate, every variant in turn (so drifts in the machine's
    speed hit each variant alike)."""
    return [(variant, rate) for rate in args.rates for variant in variants(args)]


async def _start_cluster(args: argparse.Namespace, variant: Variant) -> tuple[Cluster, str, str]:
    from disagg.tools.cluster import Cluster, free_port

    gateway_args = ["--kv-transport", args.kv_transport, *shlex.split(args.gateway_args)]
    gateway_args += [] if variant.kv_aware else ["--no-prefix-routing"]
    gateway_args += [] if variant.held_prefix else ["--no-handoff-held-prefix"]
    http = ""
    if args.api != "grpc":
        port = free_port()
        gateway_args += ["--http-port", str(port), "--served-model-name", args.model]
        http = f"127.0.0.1:{port}"
    prefill_args = shlex.split(args.prefill_args) + ([] if variant.prefix_on else ["--prefix-cache-mb", "0"])
    prefill_args += [] if variant.greedy_screen else ["--greedy-screen", "off"]
    cluster = Cluster(
        _worker_args(args, variant.kv_on),
        gateway_args,
        prefill_workers=args.prefill_workers,
        prefill_args=prefill_args,
        decode_args=shlex.split(args.decode_args)
        + ([] if variant.prefix_on else ["--prefix-cache-mb", "0"])
        + ([] if variant.greedy_screen else ["--greedy-screen", "off"]),
        aggregated_workers=args.workers if variant.aggregated else 0,
        local_prefill_tokens=args.local_prefill_tokens if variant.local_prefill else 0,
    )
    return cluster, await cluster.start(args.start_timeout), http


async def _cluster_run(
    args: argparse.Namespace, address: str, workload: Workload, prompts: BenchPrompts, key: RunKey
) -> RunResult:
    from disagg.tools.bench import Workload, run_against_gateway, run_against_openai, run_conversations

    def run(target: Workload, texts: list[str], on_done: Callable[[], None] = lambda: None) -> Awaitable[RunResult]:
        if key.name.endswith("_openai"):  # address: the gateway's HTTP host:port
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
            self.up = (variant, *await _start_cluster(self.args, variant))
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


def round_prompts(
    args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase, first: BenchPrompts, index: int
) -> BenchPrompts:
    """The prompts of round `index`: the first round's, then prompts of the same shape from another seed, so that a
    later round never finds an earlier round's prompts in the prefix cache (on by default)."""
    if index == 0:
        return first
    return build_prompts(argparse.Namespace(**{**vars(args), "seed": args.seed + 104_729 * index}), tokenizer)


async def _all_runs(
    args: argparse.Namespace, lm: LoadedModel, first: BenchPrompts, workload: Workload
) -> dict[RunKey, list[RunResult]]:
    """Alternate rounds: the baselines (no cluster computing), then the schedule's cluster runs, one cluster up at
    a time (a single variant keeps its cluster for every rate and round)."""
    runs: dict[RunKey, list[RunResult]] = {}
    clusters = _OneCluster(args)
    try:
        for round_index in range(args.repeats):
            prompts = round_prompts(args, lm.tokenizer, first, round_index)
            if args.baseline != "none":
                for run in _baselines(args, lm, prompts.ids, workload, first_round=round_index == 0):
                    runs.setdefault(RunKey(run.name), []).append(run)
            for variant, rate in schedule(args):
                grpc_address, http_address = await clusters.use(variant)
                targets = {}
                if args.api in ("grpc", "both"):
                    targets[variant.name] = grpc_address
                if args.api in ("openai", "both"):
                    targets[variant.name + "_openai"] = http_address
                at_rate = dataclasses.replace(workload, request_rate=rate)
                for name, address in targets.items():
                    key = RunKey(name, rate if args.request_rates else None)
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
    from disagg.tools.client import scrape_metrics

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


def _policy_text(args: argparse.Namespace, aggregated: bool = False) -> str:
    prefill, decode = cfg.BatchPolicy(max_batch_size=16), cfg.BatchPolicy()

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


def _record_blocks(
    args: argparse.Namespace,
    lm: LoadedModel,
    workloads: dict[str, Workload],
    prompt: str,
    results: dict[str, dict],
    ratios: dict[str, float],
    load_before: tuple[float, ...],
    repeats: dict[str, list[float]],
) -> list[str]:
    """One experiment record per result (keyed as `results`; `workloads` says what each one ran)."""
    from disagg.tools.experiment_record import ExperimentRecord, gpu_utilization, hardware, stats_line

    busy = f"load average before the run {load_before[0]:.2f} (1 min) on {os.cpu_count()} cores" + (
        "; the machine was shared with other work, timings are noisy" if load_before[0] > 0.5 else ""
    )
    ratio_text = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
    model = f"{lm.name}" + (" (dummy seeded weights)" if args.load_format == "dummy" else "")
    blocks = []
    for name, stats in results.items():
        workload = workloads[name]
        kv_on = "kv_off" not in name
        cluster, aggregated = name.startswith("cluster"), name.startswith("cluster_aggregated")
        threads = (
            _threads_text(args, aggregated)
            if cluster
            else f"baseline torch threads {args.baseline_threads or os.cpu_count()}"
        )
        notes = [
            f"{workload.num_requests if cluster or 'static' in name else stats['completed']} "
            f"requests, concurrency {1 if name == 'generate_sequential' else workload.concurrency}, "
            + (f"{_arrivals_text(workload)}, " if cluster else "")
            + f"{_workload_text(workload)}, {workload.output_tokens} output tokens, ignore_eos={workload.ignore_eos}",
            threads,
            busy,
        ]
        if cluster and not aggregated:
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
            routed = stats.get("routing", {})
            if "local_prefill_off" not in name:
                local = {k: v for k, v in routed.items() if k.startswith("local-prefill-")}
                outcomes = ", ".join(f"{k.removeprefix('local-prefill-')} {n:.0f}" for k, n in sorted(local.items()))
                held = {k: v for k, v in routed.items() if k.startswith("held-prefix-")}
                handed = ", ".join(f"{k.removeprefix('held-prefix-')} {n:.0f}" for k, n in sorted(held.items()))
                notes.append(
                    f"conditional disaggregation (--local-prefill-tokens {args.local_prefill_tokens}): prompts "
                    f"offered to the decode worker, warm-up included: {outcomes or 'none counted'}; handed back "
                    f"without the blocks it held ({'off' if 'whole_handoff' in name else 'on'}): "
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
        if len(repeats.get(name, [])) > 1:
            notes.append(f"best of {len(repeats[name])} alternating rounds (output tokens/s of each: {repeats[name]})")
        if cluster:
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
            name=f"{args.name or 'bench'}: {name}",
            date=datetime.date.today().isoformat(),
            hardware=hardware(),
            model=model,
            dtype=args.dtype,
            prompt=prompt,
            kv_cache=kv_on,
            batch_policy=_policy_text(args, aggregated)
            if cluster
            else (
                "1 / none (one at a time)"
                if name == "generate_sequential"
                else f"{workload.concurrency} / none (static batches)"
            ),
            metrics=metrics,
        )
        blocks.append(record.render())
    return blocks


def _arrivals_text(workload: Workload) -> str:
    if workload.request_rate == float("inf"):
        return "all at once"
    return f"Poisson arrivals at {workload.request_rate:g} requests/s"


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


def _fit_mixed_workload(args: argparse.Namespace, context_length: int) -> None:
    """The long prompts cut to the model's context (prompt + output must fit, or the workers refuse them)."""
    from disagg.tools.bench import fit_long_prompt

    try:
        fitted = fit_long_prompt(args.long_prompt_tokens, args.prompt_tokens, args.output_tokens, context_length)
    except ValueError as exc:
        raise SystemExit(f"--workload mixed: {exc}") from None
    if fitted != args.long_prompt_tokens:
        print(
            f"mixed: --long-prompt-tokens {args.long_prompt_tokens} + --output-tokens {args.output_tokens} exceed "
            f"the model's context of {context_length}: long prompts of {fitted} tokens",
            file=sys.stderr,
        )
        args.long_prompt_tokens = fitted


def bench_main(args: argparse.Namespace) -> None:
    import torch

    from disagg.model.loading import load_model
    from disagg.tools.bench import (
        SweepPoint,
        Workload,
        comparison,
        format_table,
        plot,
        plot_sweep,
        save_json,
        sweep_rows,
        sweep_table,
    )
    from disagg.tools.experiment_record import hardware

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = shlex.join(["disagg", *getattr(args, "argv", sys.argv[1:])])
    load_before = os.getloadavg()
    torch.set_num_threads(args.baseline_threads or os.cpu_count() or 1)
    resolve_workload_defaults(args)
    resolve_run_args(args)
    if args.workload == "multi-turn" and args.api != "grpc":
        raise SystemExit("--workload multi-turn drives the gRPC front only (--api grpc)")
    if args.address and args.routing != "kv-aware":
        raise SystemExit("--routing least-loaded/both starts its own clusters: not with --address")
    if args.workload == "multi-turn" and args.baseline != "none":
        print("multi-turn: no generate() baseline (histories depend on the replies): --baseline none", file=sys.stderr)
        args.baseline = "none"
    lm = load_model(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device, seed=args.seed)
    if args.workload == "mixed":
        _fit_mixed_workload(args, lm.context_length)
    workload = Workload(
        args.num_requests,
        args.prompt_tokens,
        args.output_tokens,
        args.concurrency,
        args.rates[0],
        args.ignore_eos,
        args.seed,
        kind=args.workload,
        system_prompts=args.system_prompts if args.workload == "shared-system-prompt" else 0,
        system_tokens=args.system_tokens if args.workload == "shared-system-prompt" else 0,
        turns=args.turns if args.workload == "multi-turn" else 1,
        history=args.history,
        long_fraction=args.long_fraction if args.workload == "mixed" else 0.0,
        long_prompt_tokens=args.long_prompt_tokens if args.workload == "mixed" else 0,
    )
    prompts = build_prompts(args, lm.tokenizer)

    all_runs = asyncio.run(_all_runs(args, lm, prompts, workload))
    # Best of the repeats for each system: on a shared machine, noise only ever slows a run down.
    best = {key: max(found, key=lambda r: r.stats()["output_token_throughput"]) for key, found in all_runs.items()}
    results = {key.label: run.stats(args.slos_ms) for key, run in best.items()}
    workloads = {key.label: dataclasses.replace(workload, request_rate=key.rate or args.rates[0]) for key in best}
    repeats = {
        key.label: [round(r.stats()["output_token_throughput"], 2) for r in found] for key, found in all_runs.items()
    }
    points = [
        SweepPoint(key.name, mode_label(key.name, args), key.rate, results[key.label])
        for key in best
        if key.rate is not None
    ]
    ratios = comparison(results)
    if "cluster" in results and "cluster_kv_off" in results:
        on, off = results["cluster"], results["cluster_kv_off"]
        ratios["kv_off_e2e_vs_on"] = off["e2e_s"]["mean"] / on["e2e_s"]["mean"]
        ratios["kv_off_tpot_vs_on"] = off["tpot_s"]["mean"] / on["tpot_s"]["mean"]
        ratios["kv_off_throughput_vs_on"] = off["output_token_throughput"] / on["output_token_throughput"]
    table = format_table(results, ratios)
    print(table)
    if points:
        print(sweep_table(points))
    if not args.output:
        return
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    prompt_text = prompts.texts[0][:80].replace('"', "'").replace("\n", " ") + f"... ({len(prompts.ids[0])} tokens)"
    payload = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "hardware": hardware(),
        "workload": {**dataclasses.asdict(workload), "request_rate": str(workload.request_rate)},
        "request_rates": [str(rate) for rate in args.rates],
        "mode": args.mode,
        "slos_ms": args.slos_ms,
        "model": args.model,
        "load_format": args.load_format,
        "dtype": args.dtype,
        "threads": {
            "workers": args.threads,
            "aggregated_workers": args.workers if args.mode != "disaggregated" else 0,
            "prefill_args": args.prefill_args,
            "decode_args": args.decode_args,
            "baseline": args.baseline_threads or os.cpu_count(),
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": results,
        "ratios": ratios,
        "output_tokens_per_s_of_every_repeat": repeats,
        **({"sweep": sweep_rows(points)} if points else {}),
    }
    save_json(args.output + ".json", payload)
    blocks = _record_blocks(args, lm, workloads, prompt_text, results, ratios, load_before, repeats)
    sweep = f"Sweep (one row per mode and request rate):\n\n{sweep_table(points)}\n\n" if points else ""
    with open(args.output + ".md", "w") as f:
        f.write(
            f"# {args.name or 'disagg bench'}\n\nCommand:\n\n```\n{command}\n```\n\n{sweep}"
            f"Side by side:\n\n```\n{table}\n```\n\n" + "\n\n".join(blocks) + "\n"
        )
    title = (
        f"{args.model} {args.dtype}: {_workload_text(workload)}, {args.num_requests} requests"
        if points
        else f"{args.model} {args.dtype}: {args.workload}, {args.num_requests} requests, concurrency "
        f"{args.concurrency}, {args.prompt_tokens}+{args.output_tokens} tokens"
    )
    if points:
        plot_sweep(args.output + ".png", points, title)
    else:
        plot(args.output + ".png", list(best.values()), title)
    print(f"wrote {args.output}.json, .md and .png", file=sys.stderr)
