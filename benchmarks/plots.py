"""The PNG beside each `disagg bench` record: latency distributions and throughput per system, or for a
`--request-rates` sweep, p99 ITL and goodput against the offered rate. matplotlib (the `bench` extra) loads only
here, when a plot is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.report import SweepPoint
from benchmarks.stats import RunResult


def plot(path: str, runs: list[RunResult], title: str) -> None:
    """Latency distributions (TTFT, TPOT, E2E) per system, and output throughput, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    labels = [r.name for r in runs]
    for ax, (metric, getter) in zip(
        axes[:3],
        (
            ("TTFT", lambda r: [x.ttft for x in r.records if x.token_times]),
            ("TPOT", lambda r: [t for x in r.records if (t := x.tpot)]),
            ("E2E", lambda r: [x.e2e for x in r.records if x.token_times]),
        ),
    ):
        data = [[v * 1000 for v in getter(r)] or [float("nan")] for r in runs]
        ax.boxplot(data, tick_labels=labels, showfliers=True)
        ax.set_title(f"{metric} (ms)")
        ax.tick_params(axis="x", labelrotation=20)
    throughput = [r.stats()["output_token_throughput"] for r in runs]
    colors = ["tab:blue", "tab:gray", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    axes[3].bar(labels, throughput, color=[colors[i % len(colors)] for i in range(len(runs))])
    axes[3].set_title("output tokens/s")
    axes[3].tick_params(axis="x", labelrotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_sweep(path: str, points: Sequence[SweepPoint], title: str) -> None:
    """Two panels against the offered request rate, one line per mode: p99 ITL (the stalls a long prefill causes
    in an aggregated worker's running streams) and goodput (requests/s within every SLO; requests/s without SLOs).
    Rates sit evenly spaced (a sweep is usually geometric, and may end at inf)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({p.request_rate for p in points})
    x = {rate: i for i, rate in enumerate(rates)}
    with_slos = any("goodput" in p.stats for p in points)
    fig, (itl, good) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in sorted({p.mode for p in points}):
        line = sorted((p for p in points if p.mode == mode), key=lambda p: p.request_rate)
        xs = [x[p.request_rate] for p in line]
        itl.plot(xs, [p.stats["itl_s"]["p99"] * 1000 for p in line], marker="o", label=mode)
        key = "goodput" if with_slos else "request_throughput"
        good.plot(xs, [p.stats.get(key, float("nan")) for p in line], marker="o", label=mode)
    finite = [r for r in rates if r != float("inf")]
    good.plot([x[r] for r in finite], finite, linestyle="--", color="gray", label="offered rate")
    slos: dict[str, float] = next((p.stats["slos_ms"] for p in points if "slos_ms" in p.stats), {})
    itl.set_title("p99 inter-token latency (ms)")
    good.set_title(
        "goodput (requests/s within " + ", ".join(f"{k} {v:g} ms" for k, v in slos.items()) + ")"
        if with_slos
        else "requests/s (no --goodput SLOs given)"
    )
    for ax in (itl, good):
        ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
        ax.set_xlabel("request rate (requests/s, Poisson)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
