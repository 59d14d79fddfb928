"""`disagg bench`: the serving load test. Baselines first (on an otherwise idle machine), then the cluster, then
the record: the side-by-side table, PREFIX.json, the Markdown experiment record PREFIX.md and the plot PREFIX.png.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shlex
import sys
import time

from benchmarks.flags import resolve_run_args
from benchmarks.workloads import build_prompts, fit_long_prompt, resolve_workload_defaults, workload_from_args


def _fit_mixed_workload(args: argparse.Namespace, context_length: int) -> None:
    """The long prompts cut to the model's context (prompt + output must fit, or the workers refuse them)."""
    try:
        fitted = fit_long_prompt(args.long_prompt_tokens, args.prompt_tokens, args.output_tokens, context_length)
    except ValueError as exc:
        raise SystemExit(f"--workload mixed: {exc}") from None
    if fitted != args.long_prompt_tokens:
        print(
            f"mixed: --long-prompt-tokens {args.long_prompt_tokens} + --output-tokens {args.output_tokens} exceed "
            f"the model's context of {context_length}: long prompts of {fitted} tokens",
            file=sys.stderr,
        )
        args.long_prompt_tokens = fitted


def resolve_args(args: argparse.Namespace) -> None:
    """Every check and default of the invocation, before any model loads."""
    resolve_workload_defaults(args)
    resolve_run_args(args)
    if args.workload == "multi-turn" and args.api != "grpc":
        raise SystemExit("--workload multi-turn drives the gRPC front only (--api grpc)")
    if args.address and args.routing != "kv-aware":
        raise SystemExit("--routing least-loaded/both starts its own clusters: not with --address")
    if args.workload == "multi-turn" and args.baseline != "none":
        print("multi-turn: no generate() baseline (histories depend on the replies): --baseline none", file=sys.stderr)
        args.baseline = "none"


def bench_main(args: argparse.Namespace) -> None:
    import torch

    from benchmarks.plots import plot, plot_sweep
    from benchmarks.ratios import comparison
    from benchmarks.report import SweepPoint, format_table, hardware, save_json, sweep_rows, sweep_table
    from benchmarks.runner import all_runs
    from benchmarks.serving_record import record_blocks, workload_text
    from benchmarks.variants import mode_label, reference, varied_fields
    from disagg.model.loading import load_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = shlex.join(["disagg", *getattr(args, "argv", sys.argv[1:])])
    load_before = os.getloadavg()
    torch.set_num_threads(args.baseline_threads or os.cpu_count() or 1)
    resolve_args(args)
    lm = load_model(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device, seed=args.seed)
    if args.workload == "mixed":
        _fit_mixed_workload(args, lm.context_length)
    workload = workload_from_args(args)
    prompts = build_prompts(args, lm.tokenizer)

    runs = asyncio.run(all_runs(args, lm, prompts, workload))
    # Best of the repeats for each system: on a shared machine, noise only ever slows a run down.
    best = {key: max(found, key=lambda r: r.stats()["output_token_throughput"]) for key, found in runs.items()}
    stats = {key: run.stats(args.slos_ms) for key, run in best.items()}
    results = {key.label: found for key, found in stats.items()}
    workloads = {key: dataclasses.replace(workload, request_rate=key.rate or args.rates[0]) for key in best}
    repeats = {key: [round(r.stats()["output_token_throughput"], 2) for r in found] for key, found in runs.items()}
    varied = varied_fields(args)
    points = [
        SweepPoint(key.name, mode_label(key, varied), key.rate, stats[key]) for key in best if key.rate is not None
    ]
    ratios = comparison(stats, reference(args))
    table = format_table(results, ratios)
    print(table)
    if points:
        print(sweep_table(points))
    if not args.output:
        return
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    prompt_text = prompts.texts[0][:80].replace('"', "'").replace("\n", " ") + f"... ({len(prompts.ids[0])} tokens)"
    payload = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "hardware": hardware(),
        "workload": {**dataclasses.asdict(workload), "request_rate": str(workload.request_rate)},
        "request_rates": [str(rate) for rate in args.rates],
        "mode": args.mode,
        "slos_ms": args.slos_ms,
        "model": args.model,
        "load_format": args.load_format,
        "dtype": args.dtype,
        "threads": {
            "workers": args.threads,
            "aggregated_workers": args.workers if args.mode != "disaggregated" else 0,
            "prefill_args": args.prefill_args,
            "decode_args": args.decode_args,
            "baseline": args.baseline_threads or os.cpu_count(),
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": results,
        "ratios": ratios,
        "output_tokens_per_s_of_every_repeat": {key.label: found for key, found in repeats.items()},
        **({"sweep": sweep_rows(points)} if points else {}),
    }
    save_json(args.output + ".json", payload)
    blocks = record_blocks(args, lm, workloads, prompt_text, stats, ratios, load_before, repeats)
    sweep = f"Sweep (one row per mode and request rate):\n\n{sweep_table(points)}\n\n" if points else ""
    with open(args.output + ".md", "w") as f:
        f.write(
            f"# {args.name or 'disagg bench'}\n\nCommand:\n\n```\n{command}\n```\n\n{sweep}"
            f"Side by side:\n\n```\n{table}\n```\n\n" + "\n\n".join(blocks) + "\n"
        )
    title = (
        f"{args.model} {args.dtype}: {workload_text(workload)}, {args.num_requests} requests"
        if points
        else f"{args.model} {args.dtype}: {args.workload}, {args.num_requests} requests, concurrency "
        f"{args.concurrency}, {args.prompt_tokens}+{args.output_tokens} tokens"
    )
    if points:
        plot_sweep(args.output + ".png", points, title)
    else:
        plot(args.output + ".png", list(best.values()), title)
    print(f"wrote {args.output}.json, .md and .png", file=sys.stderr)
