"""The ceiling of issue #14's throughput target on this host: our engines in one process, no gRPC, no other process.

    python -m benchmarks.engine_ceiling [--concurrency 32] [--requests 64] [--out benchmarks/results/engine_ceiling]

distilgpt2 shapes (seeded dummy weights, fp32, the serving model of load_for_serving), 128-token random prompts,
64 output tokens, ignore_eos, all cores. In the same run: generate()'s static batches of --concurrency (the
cluster records' baseline), and the aggregated engine (prefill of arrivals + continuous-batching decode, exactly
the code a `--local-prefill` decode worker runs) kept at --concurrency requests in flight, with float32 logits
(--greedy-screen off) and with its default greedy head (the decode step's A/B). The ratio is what the cluster
could reach with every cost of serving (processes, gRPC, the gateway, the client) at zero.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

from benchmarks.baselines import generate_static_batches
from benchmarks.report import module_command, publish, run_header
from benchmarks.workloads import Workload, make_prompts
from disagg.config import BatchPolicy, ModelOptions
from disagg.engine.aggregated import AggregatedEngine, Prompt
from disagg.engine.decode import DecodeSequence, DecodeSetup, TokenEvent
from disagg.model.loading import LoadedModel
from disagg.model.output_stream import OutputStream
from disagg.model.runtime import load_for_serving
from disagg.model.sampling import SamplingParams


def aggregated_closed_loop(
    lm: LoadedModel, prompts: list[list[int]], concurrency: int, output_tokens: int, greedy_screen: str = "auto"
) -> float:
    """Seconds for every prompt through the aggregated engine, `concurrency` in flight (a new one as one ends)."""
    engine = AggregatedEngine(
        lm, BatchPolicy(max_batch_size=max(64, concurrency)), DecodeSetup(greedy_screen=greedy_screen)
    )
    pending = list(prompts)
    done = threading.Semaphore(0)
    lock = threading.Lock()

    def submit() -> None:
        with lock:
            if not pending:
                return
            ids = pending.pop()
        params = SamplingParams(max_new_tokens=output_tokens, ignore_eos=True)

        def deliver(event: TokenEvent | BaseException) -> None:
            assert not isinstance(event, BaseException), event
            if event.finish_reason:
                done.release()
                submit()

        output = OutputStream(lm.tokenizer, params, lm.eos_token_ids)
        seq = DecodeSequence(f"r{len(pending)}", ids, output, None, deliver)
        engine.submit_prompt(Prompt([seq]))

    engine.start()
    try:
        started = time.perf_counter()
        for _ in range(concurrency):
            submit()
        for _ in prompts:
            done.acquire()
        return time.perf_counter() - started
    finally:
        engine.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_ceiling", description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--out", default="", help="write OUT.json and OUT.md")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    lm = load_for_serving(ModelOptions(load_format="dummy", threads=os.cpu_count() or 1))
    prompts = make_prompts(lm.tokenizer, args.requests, args.prompt_tokens, seed=0)
    workload = Workload(args.requests, args.prompt_tokens, args.output_tokens, concurrency=args.concurrency)
    tokens = args.requests * args.output_tokens
    warm = Workload(args.concurrency, args.prompt_tokens, 4, concurrency=args.concurrency)
    generate_static_batches(lm, prompts[: args.concurrency], warm)  # warm-up, both
    aggregated_closed_loop(lm, prompts[: args.concurrency], args.concurrency, 4)
    results = {}
    for name, run in (
        ("generate_static_batch", lambda: generate_static_batches(lm, prompts, workload).duration),
        (
            "aggregated_engine_float32_head",
            lambda: aggregated_closed_loop(lm, prompts, args.concurrency, args.output_tokens, greedy_screen="off"),
        ),
        ("aggregated_engine", lambda: aggregated_closed_loop(lm, prompts, args.concurrency, args.output_tokens)),
    ):
        seconds = run()
        results[name] = {"seconds": round(seconds, 3), "output_tokens_per_s": round(tokens / seconds, 1)}
        print(name, results[name])
    tokens_per_s = {name: r["output_tokens_per_s"] for name, r in results.items()}
    ratio = tokens_per_s["aggregated_engine"] / tokens_per_s["generate_static_batch"]
    plain_ratio = tokens_per_s["aggregated_engine_float32_head"] / tokens_per_s["generate_static_batch"]
    screen_ratio = tokens_per_s["aggregated_engine"] / tokens_per_s["aggregated_engine_float32_head"]
    print(f"aggregated engine in process vs generate() static batch: {ratio:.2f}x")
    header = run_header(module_command("benchmarks.engine_ceiling", argv))
    lines = [
        f"# Engine ceiling at concurrency {args.concurrency} (issue #14)",
        "",
        f"`{header['command']}`, {header['date']}, {header['hardware']}, 1-min load average before "
        f"{header['load_average_before'][0]:.2f}; "
        f"distilgpt2 shapes, dummy weights, fp32, {args.prompt_tokens}-token prompts, {args.output_tokens} output "
        "tokens, ignore_eos, one process, all cores.",
        "",
        "| system | seconds | output tokens/s |",
        "|---|---|---|",
        *(f"| {n} | {r['seconds']} | {r['output_tokens_per_s']} |" for n, r in results.items()),
        "",
        f"Aggregated engine in process vs generate() static batch: **{ratio:.2f}x** (its default: greedy tokens "
        f"from the exact bf16 screen of the vocabulary, `--greedy-screen auto`); with float32 logits instead "
        f"(`--greedy-screen off`, the previous step): {plain_ratio:.2f}x. The screen's A/B: {screen_ratio:.2f}x.",
    ]
    record = {**header, "args": vars(args), "results": results, "ratio": ratio}
    record |= {"float32_head_ratio": plain_ratio, "greedy_screen_vs_float32_head": screen_ratio}
    publish(record, "\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
