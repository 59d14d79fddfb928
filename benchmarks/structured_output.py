"""What issue 24's features cost, in one process each, interleaved, medians:

- `step`: the decode step of a batch of --batch rows when k of them run under a json_schema grammar (k = 0, 1, a
  quarter, all): the grammar's mask (llguidance) and the float32 logits a masked row needs (the bf16 greedy screen
  only serves unmasked greedy rows). Per-row cost = (step with k rows - step with none) / k.
- `prompt-logprobs`: a prefill whose prompt starts with --cached-tokens tokens the prefix cache holds, plain (the
  cache serves them) against the same prompt asking for prompt logprobs (the cache bypassed: every position
  computed, then log-softmax and top-k a chunk of positions at a time), with 0 and 5 alternatives, and the whole
  prompt computed without them (what bypassing the cache costs by itself).

    python -m benchmarks.structured_output step [--batch 32] [--context 128] [--steps 24] [--out PREFIX]
    python -m benchmarks.structured_output prompt-logprobs [--cached-tokens 448] [--new-tokens 64] [--out PREFIX]

distilgpt2 shapes (seeded dummy weights), fp32, loaded as the workers load it (load_for_serving), on this host's
threads; a shared machine, so ratios within one run are what to read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.report import header_lines, module_command, publish, run_header
from disagg.config import BatchPolicy, ModelOptions
from disagg.engine.decode import DecodeEngine, DecodeSequence, TokenEvent
from disagg.engine.prefill import PrefillEngine, PrefillJob, PrefillResult
from disagg.kv.prefix_cache import PrefixCache
from disagg.model.grammar import json_schema_spec, model_grammars
from disagg.model.loading import LoadedModel
from disagg.model.output_stream import new_output
from disagg.model.runtime import load_for_serving
from disagg.model.sampling import SamplingParams

# A schema whose output runs as long as max_new_tokens allows (one long string): every step of a row is masked.
LONG_TEXT = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def decode_engine_with(lm: LoadedModel, rows: int, masked: int, context: int, steps: int) -> DecodeEngine:
    """A decode engine (thread not started) holding `rows` greedy sequences of `context` tokens, `masked` of them
    under LONG_TEXT, admitted and stepped once (so the timed steps are steady ones)."""
    grammars = model_grammars(lm)
    spec = json_schema_spec(LONG_TEXT)
    grammars.prepare(spec)
    engine = DecodeEngine(lm, BatchPolicy(max_batch_size=rows))
    layers, heads, head_dim = lm.kv_shape()
    generator = torch.Generator().manual_seed(0)
    kv = [
        tuple(torch.randn(1, heads, context, head_dim, generator=generator, dtype=lm.dtype) for _ in range(2))
        for _ in range(layers)
    ]
    prefix = lm.tokenizer.encode('{"answer": "')
    for i in range(rows):
        params = SamplingParams(max_new_tokens=steps + 4 + len(prefix), grammar=spec if i < masked else None)
        first = prefix if i < masked else [lm.tokenizer.encode(" the")[0]]
        output = new_output(lm.tokenizer, params, lm.eos_token_ids, grammars, first)

        def deliver(event: TokenEvent | BaseException) -> None:
            assert not isinstance(event, BaseException), event

        context_ids = [100 + i] * context
        engine.submit(DecodeSequence(f"r{i}", context_ids, output, list(kv), deliver))  # type: ignore[arg-type]
    engine.run_once()
    return engine


def step_part(lm: LoadedModel, args: argparse.Namespace) -> tuple[dict, list[str]]:
    counts = sorted({0, 1, max(1, args.batch // 4), args.batch})
    engines = {k: decode_engine_with(lm, args.batch, k, args.context, args.steps) for k in counts}
    seconds: dict[int, list[float]] = {k: [] for k in counts}
    for _ in range(args.steps):  # interleaved: one step of each engine per round
        for k, engine in engines.items():
            engine.run_once()
            assert engine.last_step is not None and engine.last_step.batch_size == args.batch
            seconds[k].append(engine.last_step.seconds)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    per_row = {k: (median[k] - median[0]) / k for k in counts if k}
    record = dict(
        batch=args.batch,
        context=args.context,
        steps=args.steps,
        step_seconds={str(k): v for k, v in seconds.items()},
        median_step_ms={str(k): round(1000 * v, 2) for k, v in median.items()},
        added_ms_per_masked_row={str(k): round(1000 * v, 3) for k, v in per_row.items()},
    )
    lines = [
        f"# Decode step with json_schema rows (batch {args.batch}, {args.context}-token caches)\n",
        f"Every row greedy; k of them masked by a json_schema grammar (a long string: every step masked). "
        f"{args.steps} steps of each engine, interleaved, medians.\n",
        "| rows under the grammar | step (ms) | added per masked row (ms) |",
        "|---|---|---|",
        *(f"| {k} | {1000 * median[k]:.2f} | {'' if not k else f'{1000 * per_row[k]:.3f}'} |" for k in counts),
        "",
        f"A json_schema row adds **{1000 * per_row[1]:.2f} ms** to a batch-{args.batch} step alone in its batch, "
        f"{1000 * per_row[args.batch]:.3f} ms per row when every row has one.",
    ]
    return record, lines


def one_prefill(engine: PrefillEngine, ids: list[int], prompt_top: int | None) -> tuple[float, PrefillResult]:
    results: list[PrefillResult] = []

    def deliver(result: PrefillResult | BaseException) -> None:
        assert not isinstance(result, BaseException), result
        results.append(result)

    lm = engine.lm
    output = new_output(lm.tokenizer, SamplingParams(max_new_tokens=2), lm.eos_token_ids, model_grammars(lm))
    engine.submit(PrefillJob(f"r{time.monotonic_ns()}", ids, output, deliver, prompt_logprobs=prompt_top))
    started = time.perf_counter()
    engine.run_once()
    return time.perf_counter() - started, results[0]


def prompt_logprobs_part(lm: LoadedModel, args: argparse.Namespace) -> tuple[dict, list[str]]:
    vocab = lm.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    cached = torch.randint(10, vocab, (args.cached_tokens,), generator=generator).tolist()
    engine = PrefillEngine(lm, BatchPolicy(max_batch_size=1), prefix_cache=PrefixCache(lm.fingerprint, 256 << 20))
    one_prefill(engine, cached + [1], None)  # the cached part's blocks into the cache; warm-up
    uncached = PrefillEngine(lm, BatchPolicy(max_batch_size=1))
    cases: dict[str, Callable[[list[int]], tuple[float, PrefillResult]]] = {
        "cached prefix, no prompt logprobs": lambda ids: one_prefill(engine, ids, None),
        "no cache, no prompt logprobs": lambda ids: one_prefill(uncached, ids, None),
        "prompt logprobs, 0 alternatives": lambda ids: one_prefill(engine, ids, 0),
        "prompt logprobs, 5 alternatives": lambda ids: one_prefill(engine, ids, 5),
    }
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    cached_tokens: dict[str, set[int]] = {name: set() for name in cases}
    for _ in range(args.repeats):
        new = torch.randint(10, vocab, (args.new_tokens,), generator=generator).tolist()
        for name, run in cases.items():
            spent, result = run(cached + new)
            seconds[name].append(spent)
            cached_tokens[name].add(result.cached_tokens)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    base = median["cached prefix, no prompt logprobs"]
    record = dict(
        cached_tokens_in_prompt=args.cached_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        seconds=seconds,
        cached_tokens={name: sorted(v) for name, v in cached_tokens.items()},
        median_ms={name: round(1000 * v, 2) for name, v in median.items()},
        over_cached={name: round(v / base, 2) for name, v in median.items()},
    )
    lines = [
        f"# Prompt logprobs with a cached prefix ({args.cached_tokens} cached + {args.new_tokens} new tokens)\n",
        "One prefill engine pass per request (lookup, forward pass, first token, prompt logprobs when asked), "
        f"{args.repeats} rounds interleaved, medians. A request for prompt logprobs bypasses the prefix cache (the "
        "cache keeps KV, not logits) and computes every position.\n",
        "| request | cached tokens used | prefill (ms) | vs cached |",
        "|---|---|---|---|",
        *(
            f"| {name} | {record['cached_tokens'][name]} | {1000 * median[name]:.2f} | {median[name] / base:.2f}x |"
            for name in cases
        ),
    ]
    return record, lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.structured_output", description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("step", "prompt-logprobs"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--cached-tokens", type=int, default=448)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    parser.add_argument("--out", default="", help="write OUT.json and OUT.md")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    header = run_header(module_command("benchmarks.structured_output", argv))
    lm = load_for_serving(ModelOptions(load_format="dummy", threads=args.threads))
    record, lines = (step_part if args.part == "step" else prompt_logprobs_part)(lm, args)
    intro = header_lines(header, f"torch threads {torch.get_num_threads()}; ", " (a shared machine)")
    publish({**header, **record}, "\n".join([lines[0], *intro, *lines[1:]]) + "\n", args.out)


if __name__ == "__main__":
    main()
