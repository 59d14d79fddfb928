"""Time to first token with a long cached prefix against the same prompt cold (issue 23), through `disagg up`'s
default path (a prefill worker, its KV to a decode worker), on one cluster per model, rounds interleaved.

    python -m benchmarks.prefix_ttft [--models distilgpt2,smollm2-135m-instruct] [--prefix-tokens 900]
                                     [--suffix-tokens 32] [--rounds 8] [--out benchmarks/results/prefix_ttft]

Each round sends, one at a time: a prompt of --prefix-tokens + --suffix-tokens random tokens nobody sent before
(cold), then the same prefix with a new suffix (cached: the prefill worker's cache holds the prefix's full blocks
and its prefill runs in that pool, reading them in place and computing only the rest). TTFT is the client's
(gRPC, loopback); the prefill worker's forward time and cached tokens come from the request's metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys

import torch

from benchmarks.report import header_lines, module_command, publish, run_header
from disagg.model.loading import BUNDLED_MODEL, load_tokenizer
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.tools.client import Completion, channel, complete
from disagg.tools.cluster import Cluster

WORKER_ARGS = {
    "distilgpt2": ["--model", "distilgpt2", "--load-format", "dummy", "--seed", "0"],
    "smollm2-135m-instruct": ["--model", BUNDLED_MODEL],
}


async def one(address: str, ids: list[int]) -> Completion:
    async with channel(address) as ch:
        request = gateway_pb2.GenerateRequest(prompt_token_ids=ids, max_new_tokens=2, ignore_eos=True)
        return await complete(gateway_pb2_grpc.GatewayStub(ch), request, timeout=600)


def measure(model: str, args: argparse.Namespace) -> dict:
    vocab = len(load_tokenizer(WORKER_ARGS[model][1]))
    generator = torch.Generator().manual_seed(23)

    def fresh(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=generator).tolist()

    cluster = Cluster(WORKER_ARGS[model], [])
    address = asyncio.run(cluster.start(timeout=600))
    runs: dict[str, list[dict]] = {"cold": [], "cached": []}
    try:
        asyncio.run(one(address, fresh(args.prefix_tokens + args.suffix_tokens)))  # warm-up
        for _ in range(args.rounds):
            prefix = fresh(args.prefix_tokens)
            cold, cached = prefix + fresh(args.suffix_tokens), prefix + fresh(args.suffix_tokens)
            for name, ids in (("cold", cold), ("cached", cached)):
                done = asyncio.run(one(address, ids))
                assert done.metrics is not None
                runs[name].append(
                    dict(
                        ttft_ms=1000 * done.token_times[0],
                        prefill_ms=done.metrics.prefill_ms,
                        cached_tokens=done.cached_prompt_tokens,
                    )
                )
    finally:
        cluster.stop()
    medians = {
        name: {key: round(statistics.median(r[key] for r in rows), 1) for key in ("ttft_ms", "prefill_ms")}
        | {"cached_tokens": statistics.median(r["cached_tokens"] for r in rows)}
        for name, rows in runs.items()
    }
    return dict(
        runs=runs,
        medians=medians,
        cold_over_cached_ttft=round(medians["cold"]["ttft_ms"] / medians["cached"]["ttft_ms"], 2),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prefix_ttft", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="distilgpt2,smollm2-135m-instruct")
    parser.add_argument("--prefix-tokens", type=int, default=900)
    parser.add_argument("--suffix-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", default="", help="write OUT.json and OUT.md")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    header = run_header(module_command("benchmarks.prefix_ttft", argv))
    models = {model: measure(model, args) for model in args.models.split(",")}
    record = dict(**header, prefix_tokens=args.prefix_tokens, suffix_tokens=args.suffix_tokens, models=models)
    rows = [
        f"| {model} | {name} | {m['cached_tokens']:.0f} | {m['ttft_ms']} | {m['prefill_ms']} |"
        for model, result in models.items()
        for name, m in result["medians"].items()
    ]
    ratios = ", ".join(f"{model} **{r['cold_over_cached_ttft']}x**" for model, r in models.items())
    lines = [
        "# Time to first token: a cached long prefix against cold (issue 23)\n",
        *header_lines(record, remark=" (a shared machine: ratios within one run are the measurement)"),
        f"`disagg up`'s default path (1 prefill + 1 decode worker, fp32). Each of {args.rounds} rounds: a prompt of "
        f"{args.prefix_tokens} + {args.suffix_tokens} new random tokens (cold), then the same prefix with a new "
        "suffix (cached), one request at a time, 2 output tokens; medians. Prefill is the prefill worker's forward "
        "pass (RequestMetrics).\n",
        "| model | prompt | cached tokens | TTFT (ms) | prefill forward (ms) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Cold TTFT / cached TTFT: {ratios}.",
    ]
    publish(record, "\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
