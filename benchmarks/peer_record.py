"""The peer comparison's record: the summary of each `vllm bench serve` result, the ratios disagg/vLLM per
concurrency, and the JSON, Markdown and PNG that keep them (benchmarks/peer_vllm.py measures)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

# What the record keeps of a `vllm bench serve` result (its per-request arrays stay in the raw file).
SUMMARY_KEYS = (
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
    *(f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p50", "p99")),
)
# The table's columns: (summary key, header, higher is better).
COLUMNS = (
    ("output_throughput", "output tok/s", True),
    ("p50_tpot_ms", "TPOT p50 (ms)", False),
    ("p99_tpot_ms", "TPOT p99 (ms)", False),
    ("p50_ttft_ms", "TTFT p50 (ms)", False),
    ("p99_ttft_ms", "TTFT p99 (ms)", False),
    ("p50_itl_ms", "ITL p50 (ms)", False),
    ("p99_itl_ms", "ITL p99 (ms)", False),
)
DISAGG = "disagg"


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """The summary metrics of one `vllm bench serve` result (the keys it has of SUMMARY_KEYS)."""
    return {key: raw[key] for key in SUMMARY_KEYS if key in raw}


def ratios(runs: Sequence[dict[str, Any]], server: str = DISAGG) -> list[dict[str, Any]]:
    """`server`'s metrics divided by every other server's, per concurrency both measured.

    Throughput ratios above 1 and latency ratios below 1 favour `server`."""
    by_key = {(r["server"], r["concurrency"]): r["metrics"] for r in runs}
    out = []
    for (name, concurrency), baseline in by_key.items():
        ours = by_key.get((server, concurrency))
        if name == server or ours is None:
            continue
        entry: dict[str, Any] = {"concurrency": concurrency, "server": server, "baseline": name}
        for key, _, _ in COLUMNS:
            if baseline.get(key) and ours.get(key) is not None:
                entry[key] = ours[key] / baseline[key]
        out.append(entry)
    return sorted(out, key=lambda e: (e["concurrency"], e["baseline"]))


def _cell(value: float | None, key: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" if key.endswith("_ms") or key.endswith("throughput") else f"{value:.2f}"


def _loads(averages: Sequence[float]) -> str:
    return "/".join(f"{a:.1f}" for a in averages)


def render_markdown(record: dict[str, Any]) -> str:
    """The record as Markdown: how it was made, then one table per concurrency with the ratio rows."""
    w = record["workload"]
    lines = [
        f"# Peer comparison: `disagg up` vs vLLM's CPU engine, {record['model']} {record['dtype']}"
        + (" (quick smoke run)" if record.get("quick") else ""),
        "",
        f"Command: `{record['command']}`  ",
        f"Date: {record['date']}; total {record['wall_seconds']:.0f} s  ",
        f"CPU: {record['cpu']}; load average before the run {_loads(record['load_average_before'])}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()) + "  ",
        f"Workload: `vllm bench serve --dataset-name random`, {w['input_len']} prompt tokens, {w['output_len']} "
        f"output tokens (--ignore-eos), seed {w['seed']}; one warm-up round per server start, discarded.",
        "",
    ]
    if record.get("note"):
        lines += [f"Note: {record['note']}", ""]
    lines += ["Servers, one at a time, in this order:", ""]
    for server in record["servers"]:
        env = " ".join(f"{k}={v}" for k, v in server["env"].items())
        lines.append(
            f"- **{server['name']}** (ready after {server['started_seconds']:.0f} s): `{env} {server['command']}`"
        )
    lines.append("")
    ratio_rows = record["ratios"]
    for concurrency in sorted({r["concurrency"] for r in record["runs"]}):
        runs = [r for r in record["runs"] if r["concurrency"] == concurrency]
        lines += [
            f"## Concurrency {concurrency} ({runs[0]['num_prompts']} prompts)",
            "",
            "| server | ok/failed | " + " | ".join(header for _, header, _ in COLUMNS) + " |",
            "|---|---|" + "---|" * len(COLUMNS),
        ]
        for r in runs:
            m = r["metrics"]
            cells = [_cell(m.get(key), key) for key, _, _ in COLUMNS]
            lines.append(f"| {r['server']} | {m.get('completed')}/{m.get('failed')} | " + " | ".join(cells) + " |")
        for e in (e for e in ratio_rows if e["concurrency"] == concurrency):
            cells = [f"**{e[key]:.2f}x**" if key in e else "n/a" for key, _, _ in COLUMNS]
            lines.append(f"| {e['server']} / {e['baseline']} | | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Ratios are disagg / vLLM from this run: above 1 is better for disagg in output tok/s, below 1 in latencies.",
        "",
        "## Greedy agreement with float32",
        "",
        agreement_line(record["agreement"]),
        "",
        *floor_lines(record.get("floor") or {"measured": False}, record["runs"]),
    ]
    return "\n".join(lines) + "\n"


def floor_lines(floor: dict[str, Any], runs: Sequence[dict[str, Any]]) -> list[str]:
    """The host's ceilings (benchmarks/matmul_floor.py) beside what each server reached: its output tok/s as a share
    of the ceiling with the full head, and at concurrency 1 its TPOT beside the floor's."""
    lines = ["## The host's ceilings (benchmarks/matmul_floor.py)", ""]
    if not floor.get("measured"):
        return [*lines, "Not measured in this run."]
    servers = list(dict.fromkeys(r["server"] for r in runs))
    reached = {(r["server"], r["concurrency"]): r["metrics"] for r in runs}
    lines += [
        f"Measured after the servers stopped, {floor['threads']} threads, {floor['dtype']}: a prompt token's "
        f"projections {floor['prefill_token_ms']:.3f} ms, memory read at {floor['read_gb_per_s']:.1f} GB/s. A "
        "decode step's floor is its projections' matmuls plus reading its rows' K/V; the ceilings leave out "
        "everything else (attention's arithmetic, norms, sampling, scheduling, the network).",
        "",
        "| concurrency | step floor (ms): matmuls + KV read + full head | ceiling, full head (tok/s) | ceiling, body "
        "only (tok/s) | " + " | ".join(f"{name}: share of the full-head ceiling" for name in servers) + " |",
        "|---|---|---|---|" + "---|" * len(servers),
    ]
    for row in floor["concurrencies"]:
        shares = []
        for name in servers:
            metrics = reached.get((name, row["concurrency"]), {})
            got = metrics.get("output_throughput")
            share = f"{got / row['ceiling_full_head']:.0%}" if got else "n/a"
            if row["concurrency"] == 1 and metrics.get("p50_tpot_ms"):
                share += f" (TPOT p50 {metrics['p50_tpot_ms']:.1f} vs floor {row['tpot_floor_ms']:.1f} ms)"
            shares.append(share)
        lines.append(
            f"| {row['concurrency']} | {row['step_ms']:.1f} + {row['kv_read_ms']:.1f} + {row['head_step_ms']:.1f} | "
            f"{row['ceiling_full_head']:.0f} | {row['ceiling_body_only']:.0f} | " + " | ".join(shares) + " |"
        )
    return lines


def agreement_line(agreement: dict[str, Any]) -> str:
    if not agreement.get("measured"):
        return f"Not measured: {agreement.get('why', '')}"
    lines = []
    for dtype, e in agreement["dtypes"].items():
        lines.append(
            f"disagg's serving path, {agreement['model']} {dtype} vs float32: {e['matching']}/{e['total']} greedy "
            f"tokens match ({100 * e['agreement']:.1f}%), {e['identical_sequences']}/{agreement['prompts']} "
            f"sequences identical over {agreement['new_tokens']} tokens; first divergence per prompt: "
            f"{e['first_divergence']} (`disagg bench dtype`'s measurement)."
        )
    return "\n".join(lines)


def plot(record: dict[str, Any], path: pathlib.Path) -> None:
    """Output tok/s and TPOT p50 per concurrency, one bar per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = [s["name"] for s in record["servers"]]
    concurrencies = sorted({r["concurrency"] for r in record["runs"]})
    metrics = {(r["server"], r["concurrency"]): r["metrics"] for r in record["runs"]}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(servers))
    for ax, (key, title) in zip(axes, (("output_throughput", "output tokens/s"), ("p50_tpot_ms", "TPOT p50 (ms)"))):
        for i, server in enumerate(servers):
            xs = [c + (i - (len(servers) - 1) / 2) * width for c in range(len(concurrencies))]
            ys = [metrics.get((server, c), {}).get(key, float("nan")) for c in concurrencies]
            ax.bar(xs, ys, width, label=server)
        ax.set_xticks(range(len(concurrencies)), [f"concurrency {c}" for c in concurrencies])
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"disagg up vs vLLM CPU, {record['model']} {record['dtype']} ({record['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_record(record: dict[str, Any], prefix: pathlib.Path) -> None:
    """PREFIX.json, PREFIX.md and PREFIX.png."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(f"{prefix}.json").write_text(json.dumps(record, indent=2) + "\n")
    markdown = render_markdown(record)
    pathlib.Path(f"{prefix}.md").write_text(markdown)
    plot(record, pathlib.Path(f"{prefix}.png"))
    print(markdown)
