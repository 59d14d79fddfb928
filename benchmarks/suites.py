"""The exact command behind each committed record in benchmarks/results/, grouped by what the records compare, and
a runner that remakes a group (one invocation at a time, as the records were made).

    python -m benchmarks.suites --list
    python -m benchmarks.suites held_prefix                    # remakes benchmarks/results/held_prefix_*
    python -m benchmarks.suites goodput --out-dir /tmp/smoke -- --num-requests 5 --request-rates 0.5

Arguments after `--` are appended to every command of the group (argparse keeps the last value of a flag, so they
override); `--out-dir` writes the records elsewhere. benchmarks/results/README.md shows each command and what its
record found; tests/test_bench_records.py checks that the two agree and that every command still parses.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

RESULTS = "benchmarks/results"


@dataclass(frozen=True)
class Recipe:
    """One record and the command that writes it (run from the repository root)."""

    record: str  # its name in RESULTS: RESULTS/record.json, .md (and .png)
    argv: tuple[str, ...]  # "disagg ..." or "python -m benchmarks.<module> ..."
    env: tuple[tuple[str, str], ...] = ()  # variables set for the command ("" removes one: see disagg/tools/launch)

    @property
    def command(self) -> str:
        """The shell line, as the index shows it."""
        return " ".join([*(f"{name}={shlex.quote(value)}" for name, value in self.env), shlex.join(self.argv)])

    def argv_for(self, out_dir: str = "", extra: Sequence[str] = ()) -> list[str]:
        """The command to run: its record written under `out_dir` instead (if given), `extra` appended."""
        if not out_dir:
            return [*self.argv, *extra]
        here, there = f"{RESULTS}/{self.record}", f"{out_dir.rstrip('/')}/{self.record}"
        return [*(arg.replace(here, there, 1) for arg in self.argv), *extra]


def _disagg_bench(record: str, flags: str, env: tuple[tuple[str, str], ...] = ()) -> Recipe:
    return Recipe(record, ("disagg", "bench", *shlex.split(flags), "--output", f"{RESULTS}/{record}"), env)


def _module(record: str, module: str, flags: str = "", out: str = "") -> Recipe:
    argv = ("python", "-m", f"benchmarks.{module}", *shlex.split(flags), "--out", out or f"{RESULTS}/{record}")
    return Recipe(record, argv)


_DUMMY = "--model distilgpt2 --load-format dummy"
_SHAPE = f"{_DUMMY} --dtype float32 --prompt-tokens 128 --ignore-eos --output-tokens 64"
_C32 = "--concurrency 32 --num-requests 64 --baseline static"
# Conditional disaggregation, as `disagg bench` had it by default when these records were made (it now takes
# `disagg up`'s path, without it).
_LOCAL = "--local-prefill on"
_OPENMP_DEFAULT = (("GOMP_SPINCOUNT", ""),)  # OpenMP's own spin, as the workers had before their short-spin default
# The gRPC and HTTP fronts in alternation; the prefix cache off, or the repeated rounds would hit it.
_OPENAI = f"{_DUMMY} --prompt-tokens 128 --output-tokens 64 --api both --baseline none"
_OPENAI += " --prefill-args '--prefix-cache-mb 0' --repeats 2"
_THRESHOLD = "--output-tokens 64 --num-requests 24 --concurrency 4 --prefix-cache off --local-prefill both"
_THRESHOLD += " --local-prefill-tokens 1024 --gateway-args '--local-prefill-min-cached 0'"
_MULTI_TURN = f"{_DUMMY} --baseline none --workload multi-turn --conversations 8 --concurrency 4"
# The decode step before (8f6335e) and after (e76a2c7) grammars entered it, requests without one, concurrency 32.
_AB_SHAPE = "--prompt-tokens 128 --output-tokens 64 --baseline none"
_GRAMMAR_AB = f"--concurrency 32 --num-requests 96 {_AB_SHAPE}"
_HELD = f"{_DUMMY} --baseline none --workload multi-turn --turns 3 --conversations 16 --concurrency 4"
_HELD += " --prompt-tokens 300 --output-tokens 32 --history tokens --local-prefill on --handoff-held-prefix both"

SUITES: dict[str, tuple[Recipe, ...]] = {
    # The cluster (with conditional disaggregation) against in-process generate(), one record per shape.
    "cluster_vs_generate": (
        _disagg_bench(
            "bench_c1",
            f"{_SHAPE} --concurrency 1 --num-requests 6 --baseline sequential --baseline-requests 6 --repeats 2 "
            f"{_LOCAL} --name 'concurrency 1'",
        ),
        _disagg_bench("bench_c32", f"{_SHAPE} {_C32} --repeats 2 {_LOCAL} --name 'concurrency 32'"),
        _disagg_bench(
            "bench_c64",
            f"{_SHAPE} --concurrency 64 --num-requests 64 --baseline static --repeats 2 {_LOCAL} "
            "--name 'concurrency 64'",
        ),
        _disagg_bench(
            "bench_c1_local_prefill",
            f"{_SHAPE} --concurrency 1 --num-requests 8 --baseline sequential --baseline-requests 8 --repeats 2 "
            "--local-prefill both --name 'concurrency 1, local prefill off/on'",
        ),
        _disagg_bench(
            "bench_c32_greedy_screen",
            f"{_SHAPE} {_C32} --repeats 2 {_LOCAL} --greedy-screen both "
            "--name 'concurrency 32, float32 head vs greedy screen'",
        ),
    ),
    # The decode step in one process: where its time goes, and the engine's ceiling against generate().
    "decode_step": (
        _module("decode_step_profile", "decode_step_profile"),
        _module("decode_step_profile_float32_head", "decode_step_profile", "--greedy-screen off"),
        _module("engine_ceiling_c32", "engine_ceiling", "--concurrency 32 --requests 64"),
        _module("engine_ceiling_c64", "engine_ceiling", "--concurrency 64 --requests 64"),
    ),
    # The native model runner (issue 23): its decode step, prefill and joins against HF's, both models; the greedy
    # screen's head prepacked (b5ad5bf) against the commit before it, under disagg bench.
    "engine_step": (
        _module("engine_step", "engine_step", "--stalls --compile --prefill"),
        *(
            Recipe(
                f"screen_packed_ab_c{concurrency}",
                (
                    *("python", "-m", "benchmarks.git_ab", "--refs", "bf081b5,b5ad5bf", "--rounds", "3"),
                    *("--out", f"{RESULTS}/screen_packed_ab_c{concurrency}", "--", *shlex.split(_DUMMY)),
                    *shlex.split(f"--concurrency {concurrency} --num-requests {requests} {_AB_SHAPE}"),
                ),
            )
            for concurrency, requests in ((1, 12), (32, 96))
        ),
    ),
    # bfloat16: the cluster against generate() in bf16, and greedy agreement with fp32 on the bundled real model.
    "bf16": (
        _disagg_bench(
            "bench_c32_bf16",
            f"{_DUMMY} --dtype bfloat16 --prompt-tokens 128 --ignore-eos --output-tokens 64 {_C32} --repeats 2 "
            "--name 'concurrency 32, bfloat16'",
        ),
        Recipe(
            "bf16_agreement",
            (
                "disagg",
                "bench",
                "dtype",
                "--dtypes",
                "bfloat16",
                "--new-tokens",
                "32",
                "--out",
                f"{RESULTS}/bf16_agreement",
            ),
        ),
    ),
    # The A/B of the workers' thread and OpenMP settings (each against static-batch generate() in its own run).
    "threads": (
        _disagg_bench(
            "threads_c32_old_up",
            f"{_SHAPE} {_C32} --threads 2 --kv-transport relayed --name 'c32: old disagg up defaults (spin, relayed)'",
            env=_OPENMP_DEFAULT,
        ),
        _disagg_bench(
            "threads_c32_short_spin",
            f"{_SHAPE} {_C32} --threads 2 --kv-transport relayed --name 'c32: short OpenMP spin, relayed'",
        ),
        _disagg_bench(
            "threads_c32_old_bench",
            f"{_SHAPE} {_C32} --threads 1 --kv-transport relayed --name 'c32: 1 thread each (spin, relayed)'",
            env=_OPENMP_DEFAULT,
        ),
        _disagg_bench(
            "threads_c1_old_up",
            f"{_SHAPE} --concurrency 1 --num-requests 6 --baseline sequential --baseline-requests 6 --threads 2 "
            "--kv-transport relayed --name 'c1: old disagg up defaults (spin, relayed)'",
            env=_OPENMP_DEFAULT,
        ),
    ),
    # Aggregated vs disaggregated under SLOs: a mixed workload at Poisson rates, one cluster up at a time.
    "goodput": (
        _disagg_bench(
            "goodput_aggregated_vs_disaggregated",
            f"{_DUMMY} --dtype float32 --seed 0 --workload mixed --prompt-tokens 64 --long-prompt-tokens 1000 "
            "--long-fraction 0.2 --output-tokens 64 --ignore-eos --num-requests 50 --request-rates 0.5,1,2,4 "
            "--mode both --workers 2 --goodput ttft:2000 tpot:150 --baseline none "
            "--name 'aggregated vs disaggregated under SLOs'",
        ),
    ),
    # The prefix cache: its compute saving in one process, TTFT with a long cached prefix, multi-turn TTFT with it on
    # and off, KV-aware routing.
    "prefix_cache": (
        _module("prefix_compute", "prefix_compute"),
        _module("prefix_ttft", "prefix_ttft"),
        _disagg_bench(
            "prefix_multi_turn",
            f"{_DUMMY} --workload multi-turn --conversations 8 --concurrency 4 --prefix-cache both --baseline none "
            "--name 'prefix cache: multi-turn'",
        ),
        _disagg_bench(
            "prefix_multi_turn_c1",
            f"{_DUMMY} --workload multi-turn --conversations 8 --concurrency 1 --prefix-cache both --baseline none "
            "--name 'prefix cache: multi-turn, one conversation at a time'",
        ),
        _disagg_bench(
            "prefix_routing_hit_rate",
            f"{_DUMMY} --workload multi-turn --conversations 16 --concurrency 16 --prompt-tokens 64 "
            "--output-tokens 96 --prefill-workers 2 --routing both --baseline none "
            "--name 'prefix routing: KV-aware vs least-loaded, multi-turn'",
        ),
    ),
    # Conditional disaggregation: cold prompts prefilled remotely vs on the decode worker, and multi-turn histories.
    "local_prefill": (
        *(
            _disagg_bench(
                f"local_prefill_threshold_L{n}",
                f"{_DUMMY} --baseline none --workload random --prompt-tokens {n} {_THRESHOLD} "
                f"--name 'conditional disaggregation: {n}-token prompts'",
            )
            for n in (64, 256, 512)
        ),
        *(
            _disagg_bench(
                f"local_prefill_multi_turn{suffix}",
                f"{_MULTI_TURN} --prefix-cache both --local-prefill both --history {history} "
                f"--name 'conditional disaggregation: multi-turn, history as {history}'",
            )
            for history, suffix in (("text", ""), ("tokens", "_tokens"))
        ),
    ),
    # A declined prompt handed back to the decode worker whole vs without the blocks it holds, per KV transport.
    "held_prefix": tuple(
        _disagg_bench(
            f"held_prefix_{transport.replace('-', '_')}",
            f"{_HELD} --kv-transport {transport} "
            f"--name 'held-prefix handoff: multi-turn, 300-token messages, {transport} KV'",
        )
        for transport in ("shared-memory", "relayed")
    ),
    # The gRPC and OpenAI-compatible HTTP fronts of one cluster, in alternation.
    "openai": (
        _disagg_bench(
            "openai_vs_grpc_c1", f"{_OPENAI} --concurrency 1 --num-requests 16 --name 'gRPC vs HTTP, concurrency 1'"
        ),
        _disagg_bench(
            "openai_vs_grpc_c64", f"{_OPENAI} --concurrency 64 --num-requests 64 --name 'gRPC vs HTTP, concurrency 64'"
        ),
        _disagg_bench(
            "openai_vs_grpc_c64_interval8",
            f"{_OPENAI} --concurrency 64 --num-requests 64 --gateway-args '--stream-interval-tokens 8' "
            "--name 'gRPC vs HTTP, concurrency 64, stream interval 8 tokens'",
        ),
    ),
    # Structured output, prompt logprobs and priority (issue 24): what each costs, and what it changes for the rest.
    "structured_output": (
        _module("prompt_logprobs_cost", "structured_output", "prompt-logprobs"),
        _module("grammar_step_cost", "structured_output", "step"),
        Recipe(
            "grammar_ab_c32",
            (
                *("python", "-m", "benchmarks.git_ab", "--refs", "8f6335e,e76a2c7", "--rounds", "3"),
                *("--out", f"{RESULTS}/grammar_ab_c32", "--", *shlex.split(f"{_DUMMY} {_GRAMMAR_AB}")),
            ),
        ),
        _module("priority", "priority"),
    ),
    # The KV handoff's cost per prompt length, transport and wire format; lossy formats' greedy agreement.
    "handoff": (Recipe("handoff", ("disagg", "bench", "handoff", "--out", f"{RESULTS}/handoff")),),
    # What tracing costs one stream (three clusters: tracing off, no endpoint, exporting).
    "tracing": (_module("tracing_overhead", "tracing_overhead", "--rounds 120"),),
    # The CUDA path on a GPU machine (a JSON report; the .md beside it is its reading, written by hand).
    "cuda": (_module("cuda_check", "cuda_check", out=f"{RESULTS}/cuda_check.json"),),
}


def recipes() -> list[Recipe]:
    """Every recipe of every suite."""
    return [recipe for suite in SUITES.values() for recipe in suite]


def _executable(argv: list[str]) -> list[str]:
    """`disagg ...` and `python ...` as this interpreter runs them (whichever `disagg` is on PATH aside)."""
    if argv[0] == "disagg":
        return [sys.executable, "-m", "disagg", *argv[1:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    return argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suites", description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=f"one or more of: {', '.join(SUITES)}")
    parser.add_argument("--list", action="store_true", help="print every suite's commands and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    parser.add_argument("--out-dir", default="", help=f"write the records here instead of {RESULTS}")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.list:
        for name, suite in SUITES.items():
            print(f"{name}:\n" + "".join(f"  {recipe.command}\n" for recipe in suite))
        return
    unknown = [name for name in args.suites if name not in SUITES]
    if unknown or not args.suites:
        raise SystemExit(f"suites: {', '.join(unknown) or 'none given'}; known: {', '.join(SUITES)}")
    if args.out_dir and not args.dry_run:
        os.makedirs(args.out_dir, exist_ok=True)
    for recipe in (recipe for name in args.suites for recipe in SUITES[name]):
        command = recipe.argv_for(args.out_dir, extra)
        print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in recipe.env), shlex.join(command)]), flush=True)
        if not args.dry_run:
            subprocess.run(_executable(command), env={**os.environ, **dict(recipe.env)}, check=True)


if __name__ == "__main__":
    main()
