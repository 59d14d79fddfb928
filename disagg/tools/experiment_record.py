"""The Markdown experiment record that the project's users keep, one block per measured system.

The field names and their order are the users' format; `render` fills every field and says
"N/A (CPU only)" for GPU figures on a CPU.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch

FIELDS = ("load_model", "load_tokenizer", "prefill", "decode_loop", "token/s", "GPU Utilization", "Notes")


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
    """'mean X / p50 X / p90 X / p99 X ms' from a `disagg.bench.summarize` dict (seconds)."""
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
