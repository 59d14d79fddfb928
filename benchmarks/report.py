"""What a benchmark writes: the plain-text side-by-side table, the JSON record, the Markdown experiment record
that the project's users keep (one block per measured system), and the sweep table of a `--request-rates` run.

The experiment record's field names and their order are the users' format; `ExperimentRecord.render` fills every
field and says "N/A (CPU only)" for GPU figures on a CPU.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

FIELDS = ("load_model", "load_tokenizer", "prefill", "decode_loop", "token/s", "GPU Utilization", "Notes")


def format_table(results: dict[str, dict], ratios: dict[str, float]) -> str:
    """Plain-text side-by-side table of every system in the run, in milliseconds."""
    names = list(results)
    rows = [("", *names)]
    rows.append(("requests ok/failed", *(f"{results[n]['completed']}/{results[n]['failed']}" for n in names)))
    rows.append(("wall time (s)", *(f"{results[n]['duration_s']:.2f}" for n in names)))
    rows.append(("requests/s", *(f"{results[n]['request_throughput']:.2f}" for n in names)))
    rows.append(("output tokens/s", *(f"{results[n]['output_token_throughput']:.1f}" for n in names)))
    if any("goodput" in results[n] for n in names):
        rows.append(("goodput (requests/s)", *(f"{results[n].get('goodput', float('nan')):.2f}" for n in names)))
    for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        for stat in ("mean", "p50", "p90", "p99"):
            label = f"{metric[:-2].upper()} {stat} (ms)"
            rows.append((label, *(f"{results[n][metric][stat] * 1000:.1f}" for n in names)))
    if any(results[n].get("prompt_tokens") for n in names):  # what the fronts reported of the prefix cache
        rows.append(("prompt tokens", *(str(results[n].get("prompt_tokens", "")) for n in names)))
        rows.append(("cached prompt tokens", *(str(results[n].get("cached_prompt_tokens", "")) for n in names)))
        rows.append(("prefix hit rate", *(f"{results[n].get('prefix_hit_rate', float('nan')):.1%}" for n in names)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines += [f"{name}: {value:.2f}x" for name, value in ratios.items()]
    return "\n".join(lines)


def save_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
        f.write("\n")


@dataclass
class ExperimentRecord:
    name: str
    date: str
    hardware: str
    model: str
    dtype: str
    prompt: str
    batch_policy: str
    kv_cache: bool
    metrics: dict[str, str]  # keyed by FIELDS

    def render(self) -> str:
        width = max(len(f) for f in FIELDS) + 2
        lines = [
            f"## Experiment: {self.name}",
            f"Date: {self.date}",
            f"Hardware: {self.hardware}",
            f"Model: {self.model} @ {self.dtype}",
            f'Prompt: "{self.prompt}"',
            f"Batch policy: {self.batch_policy}",
            f"KV Cache: {'on' if self.kv_cache else 'off'}",
            "",
            "Metrics",
            "-------",
        ]
        lines += [f"{name.ljust(width)}: {self.metrics.get(name, '')}".rstrip() for name in FIELDS]
        return "\n".join(lines)


def hardware() -> str:
    """CPU model and core count, or the GPU name when the model runs on one."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores (CPU only, no GPU)"


def gpu_utilization(device: str) -> str:
    return "N/A (CPU only)" if not device.startswith("cuda") else "not measured"


def stats_line(stats: dict[str, float], unit: float = 1000.0, suffix: str = "ms") -> str:
    """'mean X / p50 X / p90 X / p99 X ms' from a `benchmarks.stats.summarize` dict (seconds)."""
    return " / ".join(f"{k} {v * unit:.1f}" for k, v in stats.items()) + f" {suffix}"


def publish(record: dict, markdown: str, prefix: str) -> None:
    """Print the Markdown; with a path prefix, also write PREFIX.json and PREFIX.md."""
    print(markdown)
    if prefix:
        with open(prefix + ".json", "w") as f:
            json.dump(record, f, indent=2)
        with open(prefix + ".md", "w") as f:
            f.write(markdown)


def run_header(command: str) -> dict[str, Any]:
    """What every script's record starts with: its command, when, on what, and how busy the machine was."""
    return dict(
        command=command,
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        hardware=hardware(),
        load_average_before=os.getloadavg(),
    )


def header_lines(header: dict[str, Any], detail: str = "", remark: str = "") -> list[str]:
    """A record's first Markdown lines from `run_header`'s fields: the command, then date, machine and load.
    `detail` goes before the load average (e.g. "torch threads 2; "), `remark` after it."""
    load = header["load_average_before"][0]
    return [
        f"Command: `{header['command']}`  ",
        f"Date: {header['date']}; {header['hardware']}; {detail}load average before {load:.2f}{remark}\n",
    ]


@dataclass(frozen=True)
class SweepPoint:
    """One system at one request rate of a `--request-rates` sweep: what the table and the plot are made of."""

    system: str  # the run's name: cluster, cluster_aggregated, ...
    mode: str  # disaggregated or aggregated (with the variant's suffixes)
    request_rate: float
    stats: dict  # RunResult.stats


SWEEP_COLUMNS = (  # (key in sweep_rows, Markdown header)
    ("mode", "mode"),
    ("request_rate", "rate (req/s)"),
    ("completed", "ok"),
    ("failed", "failed"),
    ("request_throughput", "requests/s"),
    ("output_token_throughput", "output tok/s"),
    ("goodput", "goodput (req/s)"),
    ("ttft_p50_ms", "TTFT p50 (ms)"),
    ("ttft_p99_ms", "TTFT p99 (ms)"),
    ("tpot_p50_ms", "TPOT p50 (ms)"),
    ("tpot_p99_ms", "TPOT p99 (ms)"),
    ("itl_p50_ms", "ITL p50 (ms)"),
    ("itl_p99_ms", "ITL p99 (ms)"),
)


def sweep_rows(points: Sequence[SweepPoint]) -> list[dict]:
    """One flat row per (mode, rate), in the order of SWEEP_COLUMNS (milliseconds; goodput None without SLOs)."""
    rows = []
    for p in points:
        row: dict = {"system": p.system, "mode": p.mode, "request_rate": p.request_rate}
        row |= {key: p.stats[key] for key in ("completed", "failed", "request_throughput", "output_token_throughput")}
        row["goodput"] = p.stats.get("goodput")
        for metric in ("ttft", "tpot", "itl"):
            for stat in ("p50", "p99"):
                row[f"{metric}_{stat}_ms"] = p.stats[f"{metric}_s"][stat] * 1000
        rows.append(row)
    return rows


def sweep_table(points: Sequence[SweepPoint]) -> str:
    """The sweep as a Markdown table, one row per (mode, rate), sorted by mode then rate."""

    def cell(key: str, value: object) -> str:
        if value is None:
            return "n/a"
        if key == "request_rate":
            return f"{value:g}"
        if isinstance(value, float):
            return f"{value:.1f}" if key.endswith("_ms") else f"{value:.2f}"
        return str(value)

    ordered = sorted(points, key=lambda p: (p.mode, p.request_rate))
    lines = ["| " + " | ".join(header for _, header in SWEEP_COLUMNS) + " |", "|" + "---|" * len(SWEEP_COLUMNS)]
    for row in sweep_rows(ordered):
        lines.append("| " + " | ".join(cell(key, row[key]) for key, _ in SWEEP_COLUMNS) + " |")
    return "\n".join(lines)


def module_command(module: str, argv: Sequence[str]) -> str:
    """The shell line `python -m MODULE ARGV...` that a record says made it."""
    return shlex.join(["python", "-m", module, *argv])
