"""The decode step alone (issue 23): HF's modules over the slab against the native runner over the paged pool.

    python -m benchmarks.engine_step [--batches 1 32 64] [--context 128] [--compile] [--out PREFIX]

For each model (distilgpt2 shapes with seeded dummy weights, and the bundled SmolLM2-135M, Llama with grouped-query
attention), fp32, as the decode workers load them (load_for_serving): every row holds a --context-token cache
(random K/V, the same for every system) and the step's time is measured per step, the systems taking turns step by
step in this one process, medians (and minimums) over every timed step. The systems:
- `hf_slab`: DecodeBatch.step_hidden, HF's modules over the left-padded slab (the decode step before issue 23);
- `native_kernel`: PagedDecodeBatch, the native forward pass with the paged attention kernel and oneDNN-prepacked
  projection weights (the default now);
- `native_unpacked`: the same with HF's own weights and matmul calls (the prepacking's A/B);
- `native_gather`: the default with attention by gathering each row's blocks and two matmuls (the kernel's A/B);
- `native_compiled` (with --compile): `native_unpacked`'s step compiled by torch.compile (disagg/model/compiled.py),
  whose cold compile (an empty Inductor cache) and warm start (a new process on that cache) are timed too.
Only the body's step is timed: the head (lm_head's greedy screen) is the same for every system.

With --prefill: one prefill of 1 and 8 prompts of 128 tokens, HF's left-padded pass against the native one
(disagg/model/native_prefill.py), both with the greedy screen.

With --stalls (issue 23's join measurement, the successor of issue 11's bench_stalls.py): a DecodeEngine runs one
stream with a --stall-context-token cache on an asyncio loop, as the decode servicer does; after 15 of its tokens,
16 sequences with caches of the same length are submitted at once. Reported per engine (`--model-runner hf`, the
slab; `native`, the pool with its paced joins), rounds interleaved: the stream's largest gap between two tokens
while they join, against its median gap.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from benchmarks.report import module_command, publish, run_header
from disagg.config import BatchPolicy, ModelOptions
from disagg.engine.decode import DecodeEngine, DecodeSequence, DecodeSetup, TokenEvent
from disagg.model.compiled import compile_decode, warm_up
from disagg.model.decode_batch import DecodeBatch
from disagg.model.kv_layers import KvLayers
from disagg.model.lm_head import greedy_head
from disagg.model.loading import BUNDLED_MODEL, LoadedModel
from disagg.model.native import NativeModel
from disagg.model.native_prefill import Prefiller
from disagg.model.output_stream import OutputStream
from disagg.model.paged_batch import PagedDecodeBatch
from disagg.model.prefill import prefill
from disagg.model.runtime import load_for_serving
from disagg.model.sampling import SamplingParams

MODELS = {"distilgpt2": ModelOptions(load_format="dummy"), "smollm2": ModelOptions(model=BUNDLED_MODEL)}
Step = Callable[[], object]
Builder = Callable[[list[tuple[str, KvLayers, int]]], Step]


def random_caches(lm: LoadedModel, rows: int, tokens: int) -> list[tuple[str, KvLayers, int]]:
    """`rows` joiners with a `tokens`-token cache each (the same values: both batches copy them into each row)."""
    layers, heads, head_dim = lm.kv_shape()
    generator = torch.Generator().manual_seed(0)
    kv = [
        (
            torch.randn(1, heads, tokens, head_dim, generator=generator, dtype=lm.dtype),
            torch.randn(1, heads, tokens, head_dim, generator=generator, dtype=lm.dtype),
        )
        for _ in range(layers)
    ]
    # a list of its own per row (the same tensors): the pool forks rows handed one KV object, as for n > 1
    return [(str(i), list(kv), 100 + i) for i in range(rows)]


def systems(lm: LoadedModel, compiled: Callable | None) -> dict[str, Builder]:
    """name -> a function that builds a batch of the joiners and returns its step."""

    def slab(joiners: list[tuple[str, KvLayers, int]]) -> Step:
        batch = DecodeBatch(*lm.kv_shape(), lm.dtype, lm.device)
        batch.add_many(joiners)
        return lambda: batch.step_hidden(lm.model)

    def paged(native: NativeModel, decode: Callable | None = None) -> Builder:
        def build(joiners: list[tuple[str, KvLayers, int]]) -> Step:
            batch = PagedDecodeBatch(native, lm.dtype, lm.device, decode=decode)
            batch.add_many(joiners)
            return batch.step_hidden

        return build

    kernel, gather = NativeModel(lm.model, "kernel"), NativeModel(lm.model, "matmul")
    unpacked = NativeModel(lm.model, "kernel", pack_weights=False)
    found: dict[str, Builder] = {
        "hf_slab": slab,
        "native_kernel": paged(kernel),
        "native_unpacked": paged(unpacked),
        "native_gather": paged(gather),
    }
    if compiled is not None:  # (of the unpacked model: Inductor does not take prepacked weights)
        found["native_compiled"] = paged(unpacked, compiled)
    return found


def time_steps(builders: dict[str, Builder], joiners: list, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds of each timed step, per system: every round builds each system's batch afresh (the same caches) and
    runs 2 untimed steps of each, then `steps` timed ones, the systems taking turns step by step (a burst of load
    from elsewhere falls on all of them)."""
    times: dict[str, list[float]] = {name: [] for name in builders}
    for _ in range(rounds):
        stepping = {name: build(joiners) for name, build in builders.items()}
        for step in stepping.values():
            step()
            step()
        for _ in range(steps):
            for name, step in stepping.items():
                started = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - started)
        del stepping
    return times


def warm_start_seconds(model: str, cache_dir: str) -> float:
    """A new process: load the model, compile the step on Inductor's cache from this run, warm up; its seconds."""
    code = (
        "import sys, time, torch\n"
        "from benchmarks.engine_step import MODELS\n"
        "from disagg.model.compiled import compile_decode, warm_up\n"
        "from disagg.model.native import NativeModel\n"
        "from disagg.model.runtime import load_for_serving\n"
        f"lm = load_for_serving(MODELS[{model!r}])\n"
        "native = NativeModel(lm.model, pack_weights=False)\n"
        "started = time.perf_counter()\n"
        "warm_up(native, compile_decode(native), lm.dtype, lm.device)\n"
        "print(time.perf_counter() - started)\n"
    )
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure_model(name: str, args: argparse.Namespace, cache_dir: str) -> dict:
    lm = load_for_serving(dataclasses.replace(MODELS[name], threads=args.threads))
    compiled, compile_record = None, {}
    if args.compile:
        native = NativeModel(lm.model, pack_weights=False)
        compiled = compile_decode(native)
        compile_record["cold_compile_s"] = round(warm_up(native, compiled, lm.dtype, lm.device), 1)
        compile_record["warm_start_s"] = round(warm_start_seconds(name, cache_dir), 1)
        print(name, compile_record)
    builders = systems(lm, compiled)
    results: dict[str, dict] = {}
    for rows in args.batches:
        joiners = random_caches(lm, rows, args.context)
        times = time_steps(builders, joiners, args.rounds, args.steps)
        results[str(rows)] = {
            system: {"median_ms": round(statistics.median(t) * 1e3, 2), "min_ms": round(min(t) * 1e3, 2)}
            for system, t in times.items()
        }
        print(name, rows, results[str(rows)])
    extra: dict[str, dict] = {}
    if args.prefill:
        extra["prefill"] = measure_prefill(lm, args.prefill_batches, args.prefill_tokens, args.prefill_rounds)
    if args.stalls:
        extra["stalls"] = measure_stalls(lm, args.stall_context, args.rounds)
        print(name, extra["stalls"])
    return {"model": lm.name, "kv_shape": lm.kv_shape(), "steps": results, **compile_record, **extra}


async def stall_round(lm: LoadedModel, runner: str, ids: list[int], kv: KvLayers, joiners: int = 16) -> dict:
    """One stream, `joiners` sequences joining after its 15th token: its gaps (ms)."""
    loop = asyncio.get_running_loop()
    engine = DecodeEngine(
        lm, BatchPolicy(max_batch_size=64), DecodeSetup(notify=loop.call_soon_threadsafe, model_runner=runner)
    )
    arrivals: list[float] = []
    done = asyncio.Event()
    warm = 15

    def sequence(
        request_id: str, tokens: int, deliver: Callable[[TokenEvent | BaseException], object]
    ) -> DecodeSequence:
        output = OutputStream(lm.tokenizer, SamplingParams(max_new_tokens=tokens, ignore_eos=True), lm.eos_token_ids)
        output.replay([ids[-1]])
        return DecodeSequence(request_id, ids[:-1], output, list(kv), deliver=deliver)

    def on_token(event: TokenEvent | BaseException) -> None:
        arrivals.append(time.monotonic())
        if isinstance(event, BaseException) or event.finish_reason is not None:
            done.set()

    engine.start()
    try:
        engine.submit(sequence("running", 60, on_token))
        while len(arrivals) < warm:
            await asyncio.sleep(0.001)
        for i in range(joiners):
            engine.submit(sequence(f"joiner-{i}", 4, lambda event: None))
        await done.wait()
    finally:
        await asyncio.to_thread(engine.stop)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"max_gap_while_joining_ms": 1e3 * max(gaps[warm - 1 :]), "median_gap_ms": 1e3 * statistics.median(gaps[1:])}


def measure_stalls(lm: LoadedModel, context: int, rounds: int) -> dict:
    """Medians over `rounds` interleaved rounds of each engine's largest gap and median gap."""
    ids = [(i * 7919) % 30000 + 1 for i in range(context)]
    kv = prefill(lm.model, [ids])[0].kv
    assert kv is not None  # (prefill keeps the KV by default)
    found: dict[str, list[dict]] = {"hf": [], "native": []}
    for _ in range(rounds):
        for runner, runs in found.items():
            runs.append(asyncio.run(stall_round(lm, runner, ids, kv)))
    result = {}
    for runner, runs in found.items():
        worst = statistics.median(r["max_gap_while_joining_ms"] for r in runs)
        median = statistics.median(r["median_gap_ms"] for r in runs)
        result[runner] = {"max_gap_while_joining_ms": round(worst, 1), "median_gap_ms": round(median, 1)}
        result[runner]["ratio"] = round(worst / median, 1)
    return result


def measure_prefill(lm: LoadedModel, batches: list[int], tokens: int, rounds: int) -> dict:
    """Seconds of one prefill of `rows` prompts of `tokens` tokens, HF's (left-padded) and the native one, with the
    greedy screen and the KV kept; medians (mins) of `rounds` interleaved rounds, per batch size."""
    head = greedy_head(lm.model, "bf16")
    prefillers = {"hf": Prefiller(lm.model, head, None), "native": Prefiller(lm.model, head, NativeModel(lm.model))}
    result = {}
    for rows in batches:
        prompts = [[(i * 7919 + row * 104729) % 30000 + 1 for i in range(tokens)] for row in range(rows)]
        times: dict[str, list[float]] = {name: [] for name in prefillers}
        for prefiller in prefillers.values():
            prefiller.batch(prompts[:1])  # warm
        for _ in range(rounds):
            for name, prefiller in prefillers.items():
                started = time.perf_counter()
                prefiller.batch(prompts)
                times[name].append(time.perf_counter() - started)
        result[str(rows)] = {
            name: {"median_ms": round(statistics.median(t) * 1e3, 1), "min_ms": round(min(t) * 1e3, 1)}
            for name, t in times.items()
        }
        print(lm.name, "prefill", rows, result[str(rows)])
    return result


def render_markdown(record: dict) -> str:
    header = record
    lines = [
        "# The forward pass: HF's modules against the native runner (issue 23)",
        "",
        f"`{header['command']}`, {header['date']}, {header['hardware']}, {header['threads']} threads, 1-min load "
        f"average before {header['load_average_before'][0]:.2f} (the machine was shared with other work: ratios "
        "within one row are the measurement, absolute times are not). fp32, caches of "
        f"{record['args']['context']} tokens per row, the body's step only (the head is the same for all); "
        f"{record['args']['rounds']} rounds x {record['args']['steps']} timed steps, the systems taking turns step by "
        "step, median (min) ms.",
        "",
    ]
    for model, result in record["models"].items():
        names = list(next(iter(result["steps"].values())))
        lines += [f"## {model} ({result['model']}; layers, kv_heads, head_dim = {tuple(result['kv_shape'])})", ""]
        if "cold_compile_s" in result:
            gains = [
                steps["native_compiled"]["median_ms"] / steps["native_kernel"]["median_ms"]
                for steps in result["steps"].values()
            ]
            lines += [
                f"Compiled step: cold compile {result['cold_compile_s']} s (empty Inductor cache), warm start "
                f"{result['warm_start_s']} s (a new process on that cache, Dynamo re-traces). native_compiled / "
                f"native_kernel: {', '.join(f'{g:.2f}x' for g in gains)} by batch (above 1: the eager default with "
                "prepacked weights is faster; Inductor does not take the prepacked weights).",
                "",
            ]
        lines += ["| batch | " + " | ".join(names) + " | hf_slab / native_kernel |", "|---" * (len(names) + 2) + "|"]
        for rows, systems_ms in result["steps"].items():
            cells = [f"{systems_ms[n]['median_ms']} ({systems_ms[n]['min_ms']})" for n in names]
            speedup = systems_ms["hf_slab"]["median_ms"] / systems_ms["native_kernel"]["median_ms"]
            lines.append(f"| {rows} | " + " | ".join(cells) + f" | **{speedup:.2f}x** |")
        lines.append("")
        if "prefill" in result:
            lines += [
                f"Prefill of N prompts of {record['args']['prefill_tokens']} tokens (first tokens through the greedy "
                f"screen, KV kept), HF's left-padded pass against the native one, {record['args']['prefill_rounds']} "
                "interleaved rounds, median (min) ms:",
                "",
                "| prompts | hf | native | hf / native |",
                "|---|---|---|---|",
                *(
                    f"| {rows} | {r['hf']['median_ms']} ({r['hf']['min_ms']}) | {r['native']['median_ms']} "
                    f"({r['native']['min_ms']}) | **{r['hf']['median_ms'] / r['native']['median_ms']:.2f}x** |"
                    for rows, r in result["prefill"].items()
                ),
                "",
            ]
        if "stalls" in result:
            lines += [
                f"Joins: 16 sequences with {record['args']['stall_context']}-token caches join a running stream "
                f"(the same length), medians of {record['args']['rounds']} interleaved rounds:",
                "",
                "| engine | largest gap while they join (ms) | median gap (ms) | ratio |",
                "|---|---|---|---|",
                *(
                    f"| {runner} | {r['max_gap_while_joining_ms']} | {r['median_gap_ms']} | **{r['ratio']}x** |"
                    for runner, r in result["stalls"].items()
                ),
                "",
            ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_step", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32, 64])
    parser.add_argument("--context", type=int, default=128, help="tokens of every row's cache")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--compile", action="store_true", help="also the compiled step (minutes of compiling)")
    parser.add_argument("--stalls", action="store_true", help="also the largest gap while 16 long sequences join")
    parser.add_argument("--prefill", action="store_true", help="also prefill: HF's against the native one")
    parser.add_argument("--prefill-batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--prefill-rounds", type=int, default=9)
    parser.add_argument("--stall-context", type=int, default=900, help="tokens of every cache in --stalls")
    parser.add_argument("--out", default="", help="write OUT.json and OUT.md")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    header = run_header(module_command("benchmarks.engine_step", argv))
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # cold: nothing compiled before this run
        models = {name: measure_model(name, args, cache_dir) for name in args.models}
    record = {**header, "threads": args.threads, "args": vars(args), "models": models}
    publish(record, render_markdown(record), args.out)


if __name__ == "__main__":
    main()
