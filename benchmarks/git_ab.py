"""A/B of two commits of this repository under one `disagg bench` load, in one run: each commit is checked out in a
worktree of its own, and the same `disagg bench` command (its cluster started from that worktree's code) runs once
per commit per round, the commits taking turns, so both see the same machine at the same time.

    python -m benchmarks.git_ab --refs BEFORE,AFTER [--rounds 3] [--out PREFIX] -- BENCH ARGS...

e.g. whether a feature slows the requests that do not use it (issue 24: concurrency 32, no grammar):

    python -m benchmarks.git_ab --refs 8f6335e,e76a2c7 --rounds 3 --out benchmarks/results/grammar_ab_c32 -- \\
        --model distilgpt2 --load-format dummy --concurrency 32 --num-requests 96 --baseline none
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

from benchmarks.report import header_lines, module_command, publish, run_header

REPO = pathlib.Path(__file__).resolve().parent.parent


def worktree(ref: str, root: pathlib.Path) -> tuple[str, pathlib.Path]:
    """(full commit id, a detached worktree of it under `root`)."""
    sha = subprocess.run(["git", "rev-parse", ref], cwd=REPO, check=True, capture_output=True, text=True).stdout
    path = root / sha.strip()[:12]
    subprocess.run(["git", "worktree", "add", "--detach", str(path), sha.strip()], cwd=REPO, check=True)
    return sha.strip(), path


def bench_once(path: pathlib.Path, bench_args: list[str], out: pathlib.Path) -> float:
    """Output tokens/s of the cluster in one `disagg bench` run (record path prefix `out`) from the worktree at
    `path`: its code, as `python -m` puts the working directory first on the path of the bench and its workers."""
    subprocess.run([sys.executable, "-m", "disagg", "bench", *bench_args, "--output", str(out)], cwd=path, check=True)
    results = json.loads(out.with_name(out.name + ".json").read_text())["results"]
    return float(results["cluster"]["output_token_throughput"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.git_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--refs", required=True, help="BEFORE,AFTER: two commits (any git revision)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="", help="write OUT.json and OUT.md")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: the `disagg bench` arguments")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    refs = args.refs.split(",")
    if len(refs) != 2:
        parser.error("--refs takes two revisions")
    header = run_header(module_command("benchmarks.git_ab", argv))
    tokens_per_s: dict[str, list[float]] = {ref: [] for ref in refs}
    with tempfile.TemporaryDirectory(prefix="disagg-ab-") as tmp:
        root = pathlib.Path(tmp)
        trees = {ref: worktree(ref, root) for ref in refs}
        try:
            for round_ in range(args.rounds):
                for ref in refs if round_ % 2 == 0 else refs[::-1]:  # (each goes first in turn)
                    tokens_per_s[ref].append(bench_once(trees[ref][1], bench_args, root / f"{ref}-{round_}"))
        finally:
            for _, path in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=False)
    medians = {ref: statistics.median(values) for ref, values in tokens_per_s.items()}
    before, after = refs
    ratio = medians[after] / medians[before]
    spread = {ref: (min(v), max(v)) for ref, v in tokens_per_s.items()}
    record = dict(
        **header,
        commits={ref: sha for ref, (sha, _) in trees.items()},
        bench_args=bench_args,
        output_tokens_per_s=tokens_per_s,
        medians=medians,
        after_over_before=round(ratio, 3),
    )
    rows = [
        f"| {ref} ({trees[ref][0][:12]}) | {', '.join(f'{v:.1f}' for v in tokens_per_s[ref])} | {medians[ref]:.1f} |"
        for ref in refs
    ]
    lines = [
        "# A/B of two commits under one load\n",
        *header_lines(record, remark=" (a shared machine: the commits take turns, so both see it alike)"),
        f"Each round runs `disagg bench {' '.join(bench_args)}` once per commit, from a worktree of it.\n",
        "| commit | output tokens/s per round | median |",
        "|---|---|---|",
        *rows,
        "",
        f"After / before: **{ratio:.3f}x** (per-commit spread: "
        + "; ".join(f"{ref} {lo:.1f}-{hi:.1f}" for ref, (lo, hi) in spread.items())
        + ").",
    ]
    publish(record, "\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
