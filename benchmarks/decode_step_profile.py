"""Where a decode step's time goes (issue #14): torch.profiler over the decode engine's step of the serving model
(load_for_serving: fused activations; the body, then greedy tokens from the head --greedy-screen picks), distilgpt2
shapes, dummy weights, 128-token caches.

    python -m benchmarks.decode_step_profile [--batch 32] [--threads 2] [--dtype float32] [--greedy-screen auto]
                                             [--out PREFIX]

Prints (and with --out writes OUT.md and OUT.json) the mean step time and the share of each operator.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import profile

from benchmarks.report import header_lines, module_command, publish, run_header
from disagg.config import ModelOptions, WorkerConfig, add_flags
from disagg.model.decode_batch import DecodeBatch
from disagg.model.lm_head import greedy_head
from disagg.model.runtime import load_for_serving


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.decode_step_profile", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=20)
    add_flags(parser, ModelOptions, role="bench", only=["dtype"])
    add_flags(parser, WorkerConfig, role="bench", only=["greedy_screen"])
    parser.add_argument("--out", default="", help="write OUT.json and OUT.md")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    lm = load_for_serving(ModelOptions(load_format="dummy", dtype=args.dtype, threads=args.threads))
    layers, heads, head_dim = lm.kv_shape()
    batch = DecodeBatch(layers, heads, head_dim, lm.dtype, lm.device)
    g = torch.Generator().manual_seed(0)

    def kv() -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (1, heads, 128, head_dim)
        return [(torch.randn(shape, generator=g).to(lm.dtype), torch.randn(shape, generator=g).to(lm.dtype))] * layers

    batch.add_many([(f"s{i}", kv(), 5) for i in range(args.batch)], 128 + 3 * args.steps + 8)
    head = greedy_head(lm.model, args.greedy_screen)

    def step() -> None:  # as DecodeEngine._step does it for greedy rows
        if head is None:
            batch.set_last_tokens(torch.argmax(batch.step(lm.model), dim=-1).tolist())
        else:
            batch.set_last_tokens(head.greedy(batch.step_hidden(lm.model)))

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    step_ms = (time.perf_counter() - started) / args.steps * 1000
    with profile() as prof:
        for _ in range(args.steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    ops = [
        dict(op=e.key, share=round(e.self_cpu_time_total / total, 4), calls_per_step=e.count // args.steps)
        for e in events[:12]
    ]
    record = dict(
        **run_header(module_command("benchmarks.decode_step_profile", argv)),
        batch=args.batch,
        threads=args.threads,
        dtype=args.dtype,
        greedy_screen=args.greedy_screen,
        head=type(head).__name__ if head is not None else "the model's own (float32 logits)",
        step_ms=round(step_ms, 2),
        ops=ops,
    )
    lines = [
        "# Decode step profile\n",
        *header_lines(record),
        f"Batch {args.batch}, 128-token caches, {args.dtype}, {args.threads} torch threads, greedy tokens from "
        f"{record['head']} (`--greedy-screen {args.greedy_screen}`): **{step_ms:.1f} ms** a step (unprofiled mean).\n",
        "| operator | share of self CPU time | calls per step |",
        "|---|---|---|",
        *(f"| `{o['op']}` | {100 * o['share']:.1f}% | {o['calls_per_step']} |" for o in ops),
    ]
    publish(record, "\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
