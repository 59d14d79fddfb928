"""`disagg bench` and its reports, added to the `disagg` command through the `disagg.commands` entry point group
(pyproject.toml): the serving packages find this function by name at run time and never import the package."""

from __future__ import annotations

import argparse

from benchmarks.dtype_agreement import add_dtype_flags
from benchmarks.flags import add_bench_flags
from benchmarks.handoff import add_handoff_flags


def _bench(args: argparse.Namespace) -> None:
    from benchmarks.serving import bench_main

    bench_main(args)


def _bench_handoff(args: argparse.Namespace) -> None:
    from benchmarks.handoff import handoff_main

    handoff_main(args)


def _bench_dtype(args: argparse.Namespace) -> None:
    from benchmarks.dtype_agreement import dtype_main

    dtype_main(args)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add `bench` (the serving load test) with its reports `bench handoff` and `bench dtype` to `disagg`'s
    subcommands."""
    bench = commands.add_parser(
        "bench",
        allow_abbrev=False,  # '--out' of 'bench handoff' must not abbreviate '--output'
        help="load-test a gateway (or a local cluster it starts) against in-process generate() baselines",
    )
    add_bench_flags(bench)
    bench.set_defaults(func=_bench)
    reports = bench.add_subparsers(
        dest="report",
        metavar="{handoff,dtype}",
        help="instead of the load test: 'disagg bench handoff --help', 'disagg bench dtype --help'",
    )
    handoff = reports.add_parser(
        "handoff",
        help="KV handoff cost per prompt length, transport and wire format, "
        "and greedy agreement of lossy wire formats on the bundled model",
    )
    add_handoff_flags(handoff)
    handoff.set_defaults(func=_bench_handoff)
    dtype = reports.add_parser(
        "dtype", help="greedy agreement of bfloat16 (or other dtypes) with float32 on the bundled real model"
    )
    add_dtype_flags(dtype)
    dtype.set_defaults(func=_bench_dtype)
