"""Prefill compute per request with a shared system prompt (issue #12): the prefill engine's own time per request
with the prefix cache holding the system prompt, against the same user turn prefilled alone (the uncached suffix's
own cost, the floor) and the whole prompt uncached. In one process, interleaved, medians of REPEATS rounds.

    python -m benchmarks.prefix_compute [--system-tokens 512] [--user-tokens 64]
                                        [--out benchmarks/results/prefix_compute]

The time is one `run_once` of a PrefillEngine (thread not started) for one request: the cache lookup, joining the
cached blocks into the prefix KV, the forward pass over what is left and storing the new full blocks; the first
token is sampled too. distilgpt2 shapes, dummy seeded weights, fp32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from benchmarks.report import header_lines, module_command, publish, run_header
from disagg.config import BatchPolicy
from disagg.engine.prefill import PrefillEngine, PrefillJob, PrefillResult
from disagg.kv.prefix_cache import PrefixCache
from disagg.model.loading import load_model
from disagg.model.output_stream import OutputStream
from disagg.model.sampling import SamplingParams


def one_request(engine: PrefillEngine, ids: list[int]) -> tuple[float, PrefillResult]:
    """Seconds of one run_once for one prompt, and its result."""
    results: list[PrefillResult] = []

    def deliver(result: PrefillResult | BaseException) -> None:
        assert not isinstance(result, BaseException), result
        results.append(result)

    lm = engine.lm
    output = OutputStream(lm.tokenizer, SamplingParams(max_new_tokens=2, ignore_eos=True), lm.eos_token_ids)
    engine.submit(PrefillJob(f"r{time.monotonic_ns()}", ids, output, deliver))
    started = time.perf_counter()
    engine.run_once()
    return time.perf_counter() - started, results[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prefix_compute", description=__doc__.splitlines()[0])
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--user-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="", help="write OUT.json and OUT.md")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_model("distilgpt2", load_format="dummy", dtype="float32", seed=0)
    vocab = lm.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    system = torch.randint(10, vocab, (args.system_tokens,), generator=generator).tolist()
    policy = BatchPolicy(max_batch_size=1)
    cached = PrefillEngine(lm, policy, prefix_cache=PrefixCache(lm.fingerprint, 256 << 20))
    plain = PrefillEngine(lm, policy)
    one_request(cached, system + [1] * args.user_tokens)  # the system prompt's blocks into the cache; warm-up
    one_request(plain, system[: args.user_tokens])
    times: dict[str, list[float]] = {"cached system prompt": [], "user turn alone": [], "whole prompt uncached": []}
    cached_tokens = []
    for _ in range(args.repeats):
        user = torch.randint(10, vocab, (args.user_tokens,), generator=generator).tolist()
        seconds, result = one_request(cached, system + user)
        times["cached system prompt"].append(seconds)
        cached_tokens.append(result.cached_tokens)
        times["user turn alone"].append(one_request(plain, user)[0])
        times["whole prompt uncached"].append(one_request(plain, system + user)[0])
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["cached system prompt"] / medians["user turn alone"]
    record = dict(
        **run_header(module_command("benchmarks.prefix_compute", argv)),
        threads=args.threads,
        system_tokens=args.system_tokens,
        user_tokens=args.user_tokens,
        repeats=args.repeats,
        cached_tokens=cached_tokens,
        seconds=times,
        median_ms={name: round(1000 * value, 2) for name, value in medians.items()},
        cached_vs_suffix_alone=round(ratio, 3),
        uncached_vs_cached=round(medians["whole prompt uncached"] / medians["cached system prompt"], 2),
    )
    lines = [
        "# Prefill compute per request with a shared system prompt\n",
        *header_lines(record, f"torch threads {args.threads}; "),
        f"A {args.system_tokens}-token system prompt (cached) + a {args.user_tokens}-token user turn, "
        f"{args.repeats} rounds interleaved, medians (distilgpt2 shapes, dummy weights, fp32). Cached tokens per "
        f"request: {sorted(set(cached_tokens))}.\n",
        "| request | prefill engine time (ms) |",
        "|---|---|",
        *(f"| {name} | {ms} |" for name, ms in record["median_ms"].items()),
        "",
        f"Cached system prompt vs the user turn alone: **{ratio:.2f}x** (target <= 1.5x); the whole prompt "
        f"uncached costs {record['uncached_vs_cached']}x the cached one.",
    ]
    publish(record, "\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
