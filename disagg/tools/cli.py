"""The `disagg` command: run a component, a local cluster, or talk to a gateway."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import shlex
import sys
from collections.abc import Callable

from disagg import config as cfg


def _up(args: argparse.Namespace) -> None:
    from disagg.tools.cluster import Cluster
    from disagg.tools.cluster import worker_args as cluster_worker_args
    from disagg.tools.supervisor import supervise

    worker_args = cluster_worker_args(args, args.kv_cache)
    # --http-port always given (0 too): a DISAGG_HTTP_PORT in the environment must not reopen what --http-port 0 shut
    gateway_args = ["--kv-transport", args.kv_transport, "--http-port", str(args.http_port)]
    if args.http_port:  # the OpenAI-compatible HTTP API, named after the served model
        gateway_args += ["--served-model-name", args.model]
    gateway_args += shlex.split(args.gateway_args)

    def make_cluster() -> Cluster:
        return Cluster(
            worker_args,
            gateway_args,
            args.prefill_workers,
            args.decode_workers,
            gateway_port=args.port,
            prefill_args=shlex.split(args.prefill_args),
            decode_args=shlex.split(args.decode_args),
            aggregated_workers=args.workers if args.aggregated else 0,
            local_prefill_tokens=args.local_prefill_tokens,
        )

    def announce(cluster: Cluster, address: str) -> None:
        assert cluster.gateway is not None  # started by cluster.start
        if args.aggregated:
            workers = f"{args.workers} aggregated"
        else:
            local = args.local_prefill_tokens
            path = f"conditional disaggregation at {local} tokens" if local > 0 else "every prompt prefilled remotely"
            workers = f"{args.prefill_workers} prefill, {args.decode_workers} decode, {path}"
        print(f"disagg cluster ready: gateway on {address} ({workers}, model {args.model})", flush=True)
        if args.http_port:
            print(f"  OpenAI-compatible API: http://127.0.0.1:{args.http_port}/v1 (model {args.model})", flush=True)
        for child in cluster.children:
            print(f"  {child.name} metrics: http://{child.metrics_address}/metrics", flush=True)
        print("  Ctrl-C (or SIGTERM) stops the gateway, then the workers", flush=True)

    ports = {"--port": args.port, "--http-port": args.http_port}
    sys.exit(supervise(make_cluster, announce, args.start_timeout, ports))


def _generate(args: argparse.Namespace) -> None:
    import json

    import grpc

    from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
    from disagg.tools.client import Completion, channel, phases_record, stream, wait_serving

    request = gateway_pb2.GenerateRequest(
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        request_id=args.request_id,
        apply_chat_template=args.chat,
    )
    if args.top_p is not None:
        request.top_p = args.top_p
    if args.seed is not None:
        request.seed = args.seed

    async def run() -> int:
        result = Completion()
        tls = cfg.from_args(cfg.TlsOptions, args)
        async with channel(args.address, tls) as ch:
            if args.wait_ready:
                await wait_serving(ch, args.wait_ready)
            try:
                async for response, at in stream(
                    gateway_pb2_grpc.GatewayStub(ch), request, args.timeout, args.auth_token
                ):
                    result.add(response, at)
                    if not args.json:
                        sys.stdout.write(response.text)
                        sys.stdout.flush()
            except grpc.aio.AioRpcError as error:  # show code and message, not a traceback
                print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
                return 1
        if args.json:  # one object on stdout, nothing else: for scripts
            print(json.dumps(result.record()))
            return 0
        tokens, times, last = len(result.token_ids), result.token_times, result.latency
        rate = (tokens - 1) / (last - times[0]) if tokens > 1 and last > times[0] else float("nan")
        ttft = "n/a" if not times else f"{times[0] * 1000:.0f} ms"  # (none: the stream carried no token)
        print(file=sys.stderr)
        if result.metrics is not None:
            print(phases_record(result.metrics), file=sys.stderr)
        print(
            f"[{tokens} tokens, finish={result.finish_reason}, time to first token {ttft}, "
            f"{rate:.1f} tokens/s after it, total {last:.2f} s]",
            file=sys.stderr,
        )
        return 0

    sys.exit(asyncio.run(run()))


def _add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """The subcommands other installed packages add, e.g. `bench` from the benchmarks package: the entry points of
    group `disagg.commands` (pyproject.toml) name a function that adds its parsers. Found by name at run time, so
    the serving packages never import those packages; one not installed (the container image ships no benchmarks)
    adds nothing."""
    for entry in sorted(importlib.metadata.entry_points(group="disagg.commands"), key=lambda e: e.name):
        try:
            add_parsers = entry.load()
        except ModuleNotFoundError as missing:
            if missing.name != entry.module.partition(".")[0]:  # a broken package, not an absent one
                raise
            continue
        add_parsers(sub)


def _inspect(args: argparse.Namespace) -> None:
    from disagg.tools.inspect_cmd import inspect_main

    inspect_main(args)


def _component(name: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        from disagg.telemetry.setup import configure_logging
        from disagg.tools.lifeline import die_with_parent

        die_with_parent()  # first: a child of `disagg up` must not outlive it, even one still loading its model

        configure_logging()
        if name == "gateway":
            from gateway.main import main as gateway_main

            gateway_main(cfg.gateway_config(args))
        elif name == "prefill":
            from prefill_worker.main import main as prefill_main

            prefill_main(cfg.worker_config(args))
        else:
            from decode_worker.main import main as decode_main

            decode_main(cfg.worker_config(args))

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disagg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a local cluster (gateway + workers) and wait for Ctrl-C")
    cfg.add_flags(up, cfg.ModelOptions, role="up")
    cfg.add_flags(up, cfg.GatewayConfig, role="up", only=["port", "http_port", "local_prefill_tokens", "kv_transport"])
    cfg.add_flags(up, cfg.WorkerConfig, role="up", only=["kv_cache"])
    up.add_argument("--prefill-workers", type=int, default=1, help="prefill workers of the cluster")
    up.add_argument("--decode-workers", type=int, default=1, help="decode workers of the cluster")
    up.add_argument(
        "--aggregated",
        action="store_true",
        help="the non-disaggregated baseline: --workers aggregated workers (disagg decode --aggregated, each "
        "prefilling and decoding in one engine; --decode-args apply) behind the gateway, no prefill/decode workers",
    )
    up.add_argument("--workers", type=int, default=1, help="aggregated workers (with --aggregated)")
    up.add_argument("--prefill-args", default="", help="extra flags for each prefill worker, e.g. '--max-batch-size 8'")
    up.add_argument("--decode-args", default="", help="extra flags for each decode worker")
    up.add_argument("--gateway-args", default="", help="extra flags for the gateway")
    up.add_argument(
        "--start-timeout", type=float, default=600.0, help="seconds the workers and then the gateway may take to start"
    )
    up.set_defaults(func=_up)

    gen = sub.add_parser("generate", help="stream a completion from a gateway")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--address", default="127.0.0.1:50051", help="the gateway's gRPC address")
    gen.add_argument(
        "--max-new-tokens", type=int, default=0, help="tokens to generate (0: the gateway's --default-max-new-tokens)"
    )
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    gen.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling: the smallest set of tokens of this mass"
    )
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed, for a repeatable sampled completion")
    gen.add_argument("--stop", action="append", default=[], help="a stop string (repeat the flag for more)")
    gen.add_argument("--ignore-eos", action="store_true", help="generate --max-new-tokens even past end-of-sequence")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template (instruct models)")
    gen.add_argument("--request-id", default="", help="the request's id in the gateway's logs, traces and metrics")
    gen.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead of streaming: text, usage, the request's phases (metrics: where it was "
        "prefilled, queue waits, forward pass, KV bytes and transfer, decode loop; docs/request_metrics.md) and the "
        "client's own timings",
    )
    gen.add_argument("--timeout", type=float, default=600.0, help="seconds the whole request may take")
    gen.add_argument(
        "--wait-ready",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the gateway to report healthy",
    )
    cfg.add_flags(gen, cfg.GatewayConfig, role="generate", only=["auth_token"])
    cfg.add_flags(gen, cfg.TlsOptions, role="generate")
    gen.set_defaults(func=_generate)

    _add_plugin_commands(sub)

    inspect = sub.add_parser("inspect", help="walk through prefill and decode of one prompt, step by step")
    from disagg.tools.inspect_cmd import add_inspect_flags

    add_inspect_flags(inspect)
    inspect.set_defaults(func=_inspect)

    servers: tuple[tuple[cfg.Role, str], ...] = (
        ("gateway", "run the gateway"),
        ("prefill", "run a prefill worker"),
        ("decode", "run a decode worker"),
    )
    for name, help_text in servers:
        p = sub.add_parser(name, help=help_text)
        cfg.add_flags(p, cfg.GatewayConfig if name == "gateway" else cfg.WorkerConfig, role=name)
        p.set_defaults(func=_component(name))
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the exact command, for records that must say how they were produced
    args.func(args)
