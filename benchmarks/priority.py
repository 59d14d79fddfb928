"""Request priority under a saturating load on a 1 prefill + 1 decode cluster (issue 24): the time to first token
of high-priority requests against low-priority ones sent in the same burst, and a control round in which every
request has the default priority (the same requests, the same classes by position, so any gap there is noise).

    python -m benchmarks.priority [--requests 64] [--high-every 4] [--prompt-tokens 128] [--output-tokens 32]
                                  [--rounds 2] [--out benchmarks/results/priority]

Every request of a round is sent at once: more than the prefill worker's batch and the decode worker's batch take
together, so they queue at both (prefill queue, decode join queue). Request i is high priority (-1) when i is a
multiple of --high-every, else low (0); in the control round all are 0. Rounds alternate priority/control, on one
cluster (distilgpt2 shapes, dummy weights, fp32; `disagg up`'s shared-memory KV transport).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys

import torch

from benchmarks.report import header_lines, module_command, publish, run_header
from disagg.model.loading import load_tokenizer
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.tools.client import channel, complete
from disagg.tools.cluster import Cluster

HIGH, LOW = -1, 0
WORKER_ARGS = ["--model", "distilgpt2", "--load-format", "dummy", "--seed", "0"]


def prompts(count: int, tokens: int) -> list[list[int]]:
    """Distinct random prompts of `tokens` GPT-2 ids (no prefix in common: the prefix cache cannot reorder them)."""
    generator = torch.Generator().manual_seed(24)
    vocab = len(load_tokenizer("distilgpt2"))
    return [torch.randint(10, vocab, (tokens,), generator=generator).tolist() for _ in range(count)]


async def burst(address: str, batch: list[list[int]], priorities: list[int], output_tokens: int) -> list[float]:
    """Every request at once; each one's time to first token (seconds)."""
    async with channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)

        async def one(ids: list[int], priority: int) -> float:
            request = gateway_pb2.GenerateRequest(
                prompt_token_ids=ids, max_new_tokens=output_tokens, ignore_eos=True, priority=priority
            )
            done = await complete(stub, request, timeout=600)
            assert done.completion_tokens == output_tokens, done
            return done.token_times[0]

        return list(await asyncio.gather(*(one(ids, p) for ids, p in zip(batch, priorities))))


def summary(ttfts: list[float]) -> dict[str, float]:
    ordered = sorted(ttfts)
    return dict(
        requests=len(ordered),
        p50_ms=round(1000 * statistics.median(ordered), 1),
        p90_ms=round(1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1),
        mean_ms=round(1000 * statistics.fmean(ordered), 1),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.priority", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--high-every", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="priority/control pairs, alternating")
    parser.add_argument("--out", default="", help="write OUT.json and OUT.md")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    header = run_header(module_command("benchmarks.priority", argv))
    classes = ["high" if i % args.high_every == 0 else "low" for i in range(args.requests)]
    with_priority = [HIGH if c == "high" else LOW for c in classes]
    cluster = Cluster(WORKER_ARGS, ["--kv-transport", "shared-memory"])
    address = asyncio.run(cluster.start(timeout=300))
    fresh = iter(prompts(4 + 2 * args.rounds * args.requests, args.prompt_tokens))  # no prompt sent twice

    def take(count: int) -> list[list[int]]:
        return [next(fresh) for _ in range(count)]

    try:
        asyncio.run(burst(address, take(4), [0] * 4, 4))  # warm-up
        ttft: dict[str, dict[str, list[float]]] = {r: {"high": [], "low": []} for r in ("priority", "control")}
        for _ in range(args.rounds):
            for name, priorities in (("priority", with_priority), ("control", [0] * args.requests)):
                times = asyncio.run(burst(address, take(args.requests), priorities, args.output_tokens))
                for cls, seconds in zip(classes, times):
                    ttft[name][cls].append(seconds)
    finally:
        cluster.stop()
    stats = {name: {cls: summary(values) for cls, values in by_class.items()} for name, by_class in ttft.items()}
    ratio = stats["priority"]["low"]["p50_ms"] / stats["priority"]["high"]["p50_ms"]
    control = stats["control"]["low"]["p50_ms"] / stats["control"]["high"]["p50_ms"]
    record = dict(
        **header,
        requests=args.requests,
        high_every=args.high_every,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        rounds=args.rounds,
        ttft_seconds=ttft,
        ttft=stats,
        low_over_high_p50=round(ratio, 2),
        control_low_over_high_p50=round(control, 2),
    )
    rows = [
        f"| {name} | {cls} | {s['requests']} | {s['p50_ms']} | {s['p90_ms']} | {s['mean_ms']} |"
        for name, by_class in stats.items()
        for cls, s in by_class.items()
    ]
    lines = [
        "# Request priority under a saturating burst (1 prefill + 1 decode worker)\n",
        *header_lines(record, remark=" (a shared machine: other work ran beside it)"),
        f"Each round sends {args.requests} requests at once ({args.prompt_tokens} prompt tokens, "
        f"{args.output_tokens} output tokens, distinct random prompts); every {args.high_every}th is high priority "
        f"({HIGH}), the rest low ({LOW}). The control rounds send the same shape with every priority {LOW} (the "
        f"classes are the same positions). {args.rounds} rounds of each, alternating, on one cluster "
        "(distilgpt2 shapes, dummy weights, fp32).\n",
        "| round | class | requests | TTFT p50 (ms) | TTFT p90 (ms) | TTFT mean (ms) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"With priorities, low-priority TTFT p50 is **{ratio:.2f}x** the high-priority one; in the control rounds "
        f"(no priorities) the same positions give {control:.2f}x.",
    ]
    publish(record, "\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
