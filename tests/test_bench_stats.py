"""`disagg bench`'s statistics, SLO goodput, ratios between runs and sweep tables, on known inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from benchmarks.plots import plot_sweep
from benchmarks.ratios import comparison
from benchmarks.report import SweepPoint, header_lines, run_header, sweep_rows, sweep_table
from benchmarks.stats import RequestRecord, RunResult, meets_slos, parse_goodput, summarize
from benchmarks.variants import Baseline, RunKey, Variant

CLUSTER = RunKey(Variant(), "grpc")  # the cluster the ratios of an invocation with the defaults are taken against
LOCAL_PREFILL_ON = Variant(local_prefill=True)


def test_summarize_known_values():
    stats = summarize(list(range(1, 101)))
    assert stats == pytest.approx({"mean": 50.5, "p50": 50.5, "p90": 90.1, "p99": 99.01})
    assert summarize([3.0]) == {"mean": 3.0, "p50": 3.0, "p90": 3.0, "p99": 3.0}
    assert all(np.isnan(v) for v in summarize([]).values())


def test_request_metrics_from_token_times():
    record = RequestRecord(token_times=[0.5, 0.7, 1.0, 1.6])
    assert record.ttft == 0.5 and record.e2e == 1.6
    assert record.tpot == pytest.approx((1.6 - 0.5) / 3)
    assert record.itl == pytest.approx([0.2, 0.3, 0.6])
    assert RequestRecord(token_times=[0.4]).tpot is None


def test_run_stats_count_tokens_and_exclude_failures():
    records = [
        RequestRecord(token_times=[0.1, 0.2, 0.4]),
        RequestRecord(token_times=[0.3, 0.6]),
        RequestRecord(error="UNAVAILABLE: gone"),
    ]
    stats = RunResult("cluster", 2.0, records).stats()
    assert (stats["completed"], stats["failed"], stats["output_tokens"]) == (2, 1, 5)
    assert stats["output_token_throughput"] == 2.5 and stats["request_throughput"] == 1.0
    assert stats["ttft_s"]["mean"] == pytest.approx(0.2)
    assert stats["tpot_s"]["mean"] == pytest.approx((0.15 + 0.3) / 2)
    assert stats["itl_s"]["p50"] == pytest.approx(0.2)
    assert stats["e2e_s"]["mean"] == pytest.approx(0.5)
    assert stats["errors"] == ["UNAVAILABLE: gone"]


def test_comparison_ratios():
    def stats(tokens_per_s: float, e2e: float) -> dict:
        return {"output_token_throughput": tokens_per_s, "e2e_s": {"mean": e2e}, "ttft_s": {"mean": e2e / 10}}

    ratios = comparison(
        {
            CLUSTER: stats(80, 2.0),
            RunKey(Baseline(static_batches=True)): stats(100, 4.0),
            RunKey(Baseline(static_batches=False)): stats(20, 1.0),
        }
    )
    assert ratios["throughput_vs_generate_static_batch"] == pytest.approx(0.8)
    assert ratios["throughput_vs_generate_sequential"] == pytest.approx(4.0)
    assert ratios["e2e_mean_vs_generate_sequential"] == pytest.approx(2.0)


def test_prefix_ratios_and_hit_rate():
    records = [
        RequestRecord(token_times=[0.1, 0.2], prompt_tokens=100, cached_prompt_tokens=0),
        RequestRecord(token_times=[0.1, 0.2], prompt_tokens=200, cached_prompt_tokens=150),
        RequestRecord(error="x", prompt_tokens=50, cached_prompt_tokens=50),  # failed: not counted
    ]
    stats = RunResult("cluster", 1.0, records).stats()
    assert (stats["prompt_tokens"], stats["cached_prompt_tokens"]) == (300, 150)
    assert stats["prefix_hit_rate"] == pytest.approx(0.5)

    def timing(ttft: float) -> dict:
        return {"ttft_s": {"p50": ttft, "p99": 2 * ttft}, "e2e_s": {"p50": 3 * ttft}}

    ratios = comparison({CLUSTER: timing(0.1), RunKey(Variant(prefix_cache=False), "grpc"): timing(0.4)})
    assert ratios["prefix_off_ttft_p50_vs_on"] == pytest.approx(4.0)
    assert ratios["prefix_off_ttft_p99_vs_on"] == pytest.approx(4.0)
    least_loaded = RunKey(Variant(routing="least-loaded"), "grpc")
    routed = comparison({CLUSTER: {"prefix_hit_rate": 0.6}, least_loaded: {"prefix_hit_rate": 0.3}})
    assert routed["kv_aware_hit_rate_vs_least_loaded"] == pytest.approx(2.0)


def test_goodput_counts_only_requests_that_met_every_slo():
    records = [
        RequestRecord(token_times=[0.1, 0.2, 0.3]),  # TTFT 100 ms, TPOT 100 ms: good
        RequestRecord(token_times=[0.5, 0.6, 0.7]),  # TTFT 500 ms: misses the TTFT SLO only
        RequestRecord(token_times=[0.1, 0.15, 0.5]),  # TPOT 200 ms: misses the TPOT SLO only
        RequestRecord(token_times=[0.1]),  # one token: no TPOT to miss, good
        RequestRecord(error="UNAVAILABLE: gone", token_times=[0.1, 0.2]),  # failed: never good
    ]
    stats = RunResult("cluster", 4.0, records).stats({"ttft": 200, "tpot": 120})
    assert stats["good_requests"] == 2 and stats["goodput"] == pytest.approx(0.5)
    assert stats["slos_ms"] == {"ttft": 200, "tpot": 120}
    assert "goodput" not in RunResult("cluster", 4.0, records).stats()

    stalled = RequestRecord(token_times=[0.1, 0.12, 0.14, 0.16, 0.4])  # TPOT 75 ms, but one gap of 240 ms
    assert meets_slos(stalled, {"tpot": 120}) and not meets_slos(stalled, {"itl": 200})
    assert meets_slos(stalled, {"itl": 250, "e2e": 400}) and not meets_slos(stalled, {"e2e": 399})


def test_goodput_parsing_takes_vllm_pairs_and_names_what_is_wrong():
    assert parse_goodput(["ttft:2000", "tpot:150"]) == {"ttft": 2000.0, "tpot": 150.0}
    assert parse_goodput(["E2EL:3000", "itl:500.5"]) == {"e2e": 3000.0, "itl": 500.5}
    assert parse_goodput([]) == {}
    for bad, message in (
        (["ttft"], "expected METRIC:MS"),
        (["ttfb:100"], "one of ttft, tpot, itl, e2e"),
        (["ttft:fast"], "'fast' is not a number"),
        (["ttft:-5"], "positive"),
        (["tpot:nan"], "positive"),
        (["ttft:100", "ttft:200"], "a second SLO for ttft"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_goodput(bad)


def test_ratios_pair_runs_by_their_fields():
    def stats(tokens_per_s: float, ms: float, kv_bytes: float = 0.0) -> dict:
        timing = {"mean": ms, "p50": ms, "p99": 2 * ms}
        found = {"output_token_throughput": tokens_per_s, "ttft_s": timing, "e2e_s": timing, "tpot_s": timing}
        return found | ({"routing": {"kv-bytes-sent": kv_bytes}} if kv_bytes else {})

    def at(**changes: bool) -> RunKey:
        return RunKey(dataclasses.replace(LOCAL_PREFILL_ON, **changes), "grpc")

    ratios = comparison(
        {
            at(): stats(100, 10, kv_bytes=1000),
            RunKey(LOCAL_PREFILL_ON, "openai"): stats(90, 11),
            at(local_prefill=False): stats(80, 20),
            at(held_prefix=False): stats(70, 30, kv_bytes=2000),
            at(greedy_screen=False): stats(50, 40),
            at(prefix_cache=False, local_prefill=False): stats(40, 50),
            at(kv_cache=False): stats(25, 80),
            RunKey(Baseline(static_batches=True)): stats(200, 5),
        },
        LOCAL_PREFILL_ON,  # the reference of an invocation with --local-prefill on or both
    )
    assert ratios["openai_throughput_vs_grpc"] == pytest.approx(0.9)
    assert ratios["local_prefill_off_ttft_p50_vs_on"] == pytest.approx(2.0)
    assert ratios["whole_handoff_e2e_p50_vs_on"] == pytest.approx(3.0)
    assert ratios["whole_handoff_kv_bytes_vs_on"] == pytest.approx(2.0)
    assert ratios["greedy_screen_throughput_vs_float32_head"] == pytest.approx(2.0)
    assert ratios["float32_head_throughput_vs_generate_static_batch"] == pytest.approx(0.25)
    assert ratios["neither_ttft_p99_vs_both"] == pytest.approx(5.0)
    assert ratios["kv_off_throughput_vs_on"] == pytest.approx(0.25)
    assert ratios["kv_off_tpot_vs_on"] == pytest.approx(8.0)
    assert "prefix_off_ttft_p50_vs_on" not in ratios  # that run departs in two fields, not in the prefix cache alone
    swept = {RunKey(Variant(), "grpc", 1.0): stats(100, 10), RunKey(Variant(kv_cache=False), "grpc", 1.0): stats(1, 1)}
    assert comparison(swept) == {}  # a sweep's runs have no reference without a rate


def _sweep_points() -> list[SweepPoint]:
    """Hand-made runs: at 1/s every request is good; at 4/s the aggregated one's second token stalls."""
    slos = {"ttft": 500, "itl": 300}
    smooth = RequestRecord(token_times=[0.2, 0.3, 0.4])
    stalled = RequestRecord(token_times=[0.2, 0.9, 1.0])
    runs = {
        ("disaggregated", 1.0): [smooth, smooth],
        ("aggregated", 1.0): [smooth, smooth],
        ("disaggregated", 4.0): [smooth, smooth],
        ("aggregated", 4.0): [smooth, stalled],
    }
    return [SweepPoint(m, m, rate, RunResult(m, 2.0, records).stats(slos)) for (m, rate), records in runs.items()]


def test_sweep_table_and_plot_are_written_from_the_runs(tmp_path):
    points = _sweep_points()
    rows = sweep_rows(points)
    assert [(r["mode"], r["request_rate"], r["goodput"]) for r in rows][-1] == ("aggregated", 4.0, 0.5)
    assert rows[-1]["itl_p99_ms"] == pytest.approx(682)  # gaps 100, 100, 100, 700 ms: p99 interpolated
    table = sweep_table(points).splitlines()
    assert table[0].startswith("| mode | rate (req/s) |") and "ITL p99 (ms)" in table[0]
    assert [line.split(" | ")[:2] for line in table[2:]] == [
        ["| aggregated", "1"],
        ["| aggregated", "4"],
        ["| disaggregated", "1"],
        ["| disaggregated", "4"],
    ]
    assert "| 0.50 |" in table[3]  # the aggregated run at 4/s: 1 good request in 2 s
    no_slos = [SweepPoint("cluster", "disaggregated", 2.0, RunResult("c", 1.0, [RequestRecord([0.1, 0.2])]).stats())]
    assert "| n/a |" in sweep_table(no_slos)
    plot_sweep(str(tmp_path / "sweep.png"), points, "tiny sweep")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_records_header_names_its_command_machine_and_load():
    header = run_header("python -m benchmarks.x --flag 1")
    command, when = header_lines(header, "torch threads 2; ", " (a shared machine)")
    assert command == "Command: `python -m benchmarks.x --flag 1`  "
    assert when.startswith(f"Date: {header['date']}; {header['hardware']}; torch threads 2; load average before ")
    assert when.endswith(f"{header['load_average_before'][0]:.2f} (a shared machine)\n")
