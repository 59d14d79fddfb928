"""The flags of `disagg bench` (the serving load test), and their checks before any model loads."""

from __future__ import annotations

import argparse

from benchmarks.stats import parse_goodput
from benchmarks.variants import LOCAL_PREFILL
from disagg import config as cfg


def add_bench_flags(parser: argparse.ArgumentParser) -> None:
    cfg.add_flags(parser, cfg.ModelOptions, role="bench")
    w = parser.add_argument_group("workload")
    w.add_argument("--num-requests", type=int, default=64, help="requests measured (after --warmup-requests)")
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
    w.add_argument(
        "--ignore-eos",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="generate --output-tokens for every request, end-of-sequence or not",
    )
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
        "on" if LOCAL_PREFILL else "off",  # as `disagg up`
        f"conditional disaggregation of the disaggregated cluster, {'on' if LOCAL_PREFILL else 'off'} by default "
        "as in `disagg up`: decode workers --local-prefill and the gateway's --local-prefill-tokens (a prompt whose "
        "tokens the decode worker mostly holds, e.g. a conversation's next turn, is prefilled there); 'both' runs "
        "the same workload on a cluster without it and one with it",
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
    cfg.add_flags(c, cfg.GatewayConfig, role="bench", only=["local_prefill_tokens", "kv_transport"])
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
    c.add_argument("--start-timeout", type=float, default=300.0, help="seconds a local cluster may take to start")
    c.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="alternate baseline and cluster rounds this many times; the best round of each is reported",
    )
    b = parser.add_argument_group("baselines")
    b.add_argument(
        "--baseline",
        default="all",
        choices=["all", "sequential", "static", "none"],
        help="the in-process generate() baselines to measure: sequential (one request at a time), static (static "
        "batches of --concurrency requests), all (both), none",
    )
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


def _on_off_both(group: argparse._ArgumentGroup, flag: str, default: str | None, help_text: str) -> None:
    """A cluster setting to measure on, off, or 'both' (the same workload on a cluster of each)."""
    group.add_argument(flag, default=default, choices=["on", "off", "both"], help=help_text)


def resolve_run_args(args: argparse.Namespace) -> None:
    """Check and complete the sweep's flags before any model loads: SLOs parsed into `args.slos_ms` (a bad one is
    an error, not a dropped SLO), `args.rates`, and the defaults that depend on them (concurrency, prefix cache)."""
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
