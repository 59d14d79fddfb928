"""`disagg bench`: its statistics on known inputs, and a tiny run end to end against a real cluster."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest

from benchmarks.drivers import run_conversations
from benchmarks.flags import resolve_run_args
from benchmarks.plots import plot_sweep
from benchmarks.ratios import comparison
from benchmarks.report import FIELDS, SweepPoint, sweep_rows, sweep_table
from benchmarks.stats import RequestRecord, RunResult, meets_slos, parse_goodput, summarize
from benchmarks.variants import Baseline, RunKey, Variant, mode_label, reference, schedule, variants, varied_fields
from benchmarks.workloads import (
    Workload,
    arrival_delays,
    fit_long_prompt,
    long_positions,
    make_conversations,
    make_mixed_prompts,
    make_prompts,
    make_shared_system_prompts,
    next_turn_prompt,
)
from disagg.config import LOCAL_PREFILL_TOKENS
from disagg.tools.cli import build_parser, main

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


def test_prompts_have_exactly_the_asked_tokens_after_a_text_round_trip(gpt2_model):
    tok = gpt2_model.tokenizer
    prompts = make_prompts(tok, 5, 37, seed=3)
    assert len({tuple(p) for p in prompts}) == 5
    for ids in prompts:
        assert len(ids) == 37 and tok.encode(tok.decode(ids)) == ids


def test_shared_system_prompts_share_exact_prefixes(gpt2_model):
    tok = gpt2_model.tokenizer
    prompts = make_shared_system_prompts(tok, 7, 3, 40, 9, seed=1)
    assert len(prompts) == 7
    for i, ids in enumerate(prompts):
        assert len(ids) == 49 and tok.encode(tok.decode(ids)) == ids  # the gateway sees exactly these tokens
        assert ids[:40] == prompts[i % 3][:40]
    assert len({tuple(p[:40]) for p in prompts}) == 3  # 3 system prompts
    assert len({tuple(p[40:]) for p in prompts}) == 7  # every user turn its own


def test_multi_turn_histories_grow_by_the_reply_and_the_user_turn(gpt2_model):
    tok = gpt2_model.tokenizer
    conversations = make_conversations(tok, 2, 4, 11, seed=2)
    assert [len(c) for c in conversations] == [4, 4]
    assert len({tuple(t) for c in conversations for t in c}) == 8
    replies = make_prompts(tok, 4, 5, seed=9)  # stand-ins for the server's replies, of a known length
    prompt, expected = "", 0
    previous: list[int] = []
    for t, user in enumerate(conversations[0]):
        prompt = next_turn_prompt(prompt, tok.decode(replies[t - 1]) if t else "", tok.decode(user))
        ids = tok.encode(prompt)
        expected += (5 if t else 0) + 11
        assert len(ids) == expected  # the whole history, exactly
        assert ids[: len(previous)] == previous  # the previous turn's prompt is a token prefix: cacheable
        assert ids[-11:] == user
        previous = ids
    assert expected == 4 * 11 + 3 * 5


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


def test_multi_turn_second_turn_hits_the_prefix_cache(gpt2_cluster, gpt2_model):
    tok = gpt2_model.tokenizer
    conversations = [[tok.decode(t) for t in conv] for conv in make_conversations(tok, 1, 2, 40, seed=5)]
    workload = Workload(2, 40, 4, concurrency=1, kind="multi-turn", turns=2)
    result = asyncio.run(run_conversations(gpt2_cluster.address, workload, conversations))
    first, second = result.records
    assert not first.error and not second.error
    assert len(first.token_times) == len(second.token_times) == 4
    assert first.prompt_tokens == 40 and second.prompt_tokens > 80  # history: turn 1 + its reply + turn 2
    assert second.cached_prompt_tokens > 0  # the first turn's blocks, computed once
    assert result.stats()["prefix_hit_rate"] > 0


def test_poisson_arrivals_have_the_asked_rate():
    gaps = arrival_delays(Workload(4000, 8, 8, concurrency=10, request_rate=20.0, seed=1))
    assert np.mean(gaps) == pytest.approx(1 / 20, rel=0.05)
    assert arrival_delays(Workload(3, 8, 8)) == [0.0, 0.0, 0.0]


def test_tiny_bench_against_a_cluster_writes_json_markdown_and_plot(gpt2_cluster, tmp_path, capsys):
    prefix = tmp_path / "tiny"
    main(
        [
            "bench",
            "--address",
            gpt2_cluster.address,
            "--model",
            "distilgpt2",
            "--load-format",
            "dummy",
            "--num-requests",
            "4",
            "--concurrency",
            "2",
            "--prompt-tokens",
            "12",
            "--output-tokens",
            "3",
            "--baseline-requests",
            "2",
            "--warmup-requests",
            "1",
            "--output",
            str(prefix),
            "--name",
            "tiny",
        ]
    )
    printed = capsys.readouterr().out
    assert "throughput_vs_generate_static_batch" in printed

    report = json.loads(prefix.with_suffix(".json").read_text())
    results = report["results"]
    assert set(results) == {"generate_sequential", "generate_static_batch", "cluster"}
    assert (results["cluster"]["completed"], results["cluster"]["failed"]) == (4, 0)
    assert results["cluster"]["output_tokens"] == 4 * 3
    assert results["generate_static_batch"]["output_tokens"] == 4 * 3
    assert results["generate_sequential"]["completed"] == 2
    for name in results:
        assert 0 < results[name]["ttft_s"]["p50"] <= results[name]["e2e_s"]["p99"]
    assert report["ratios"]["throughput_vs_generate_static_batch"] > 0

    record = prefix.with_suffix(".md").read_text()
    assert record.count("## Experiment: tiny: ") == 3
    for line in (
        "Date: ",
        "Hardware: ",
        "Model: distilgpt2 (dummy seeded weights) @ float32",
        'Prompt: "',
        "Batch policy: ",
        "KV Cache: on",
        "Metrics\n-------",
    ):
        assert line in record
    for name in FIELDS:
        assert f"\n{name.ljust(17)}: " in record
    assert "GPU Utilization  : N/A (CPU only)" in record
    assert "disagg bench --address" in record
    assert prefix.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_long_positions_have_the_exact_share_and_depend_only_on_the_seed():
    marks = long_positions(50, 0.2, seed=1)
    assert len(marks) == 50 and sum(marks) == 10
    assert long_positions(50, 0.2, seed=1) == marks
    assert long_positions(50, 0.2, seed=2) != marks
    assert not any(long_positions(7, 0.0)) and all(long_positions(7, 1.0))
    with pytest.raises(ValueError, match="long fraction"):
        long_positions(10, 1.5)


def test_mixed_prompts_have_the_asked_lengths_at_the_seeded_places(gpt2_model):
    tok = gpt2_model.tokenizer
    prompts = make_mixed_prompts(tok, 20, 12, 70, 0.25, seed=4)
    assert [len(p) for p in prompts] == [70 if long else 12 for long in long_positions(20, 0.25, seed=4)]
    assert sum(len(p) == 70 for p in prompts) == 5
    assert len({tuple(p) for p in prompts}) == 20
    assert all(tok.encode(tok.decode(ids)) == ids for ids in prompts)  # the gateway sees exactly these lengths
    assert make_mixed_prompts(tok, 20, 12, 70, 0.25, seed=4) == prompts


def test_long_prompts_are_cut_to_leave_room_for_the_output():
    assert fit_long_prompt(1000, 64, 64, context_length=1024) == 960  # distilgpt2's 1,024 positions
    assert fit_long_prompt(500, 64, 64, context_length=1024) == 500
    with pytest.raises(ValueError, match="exceed the model's context of 1024"):
        fit_long_prompt(1000, 1000, 64, context_length=1024)


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


def test_bad_goodput_and_rates_flags_stop_the_bench_before_any_work(capsys):
    with pytest.raises(SystemExit, match="--goodput 'ttft:abc': 'abc' is not a number of milliseconds"):
        main(["bench", "--address", "127.0.0.1:1", "--goodput", "ttft:abc"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--request-rates", "1,0"])
    assert "every rate must be a positive number" in capsys.readouterr().err
    args = build_parser().parse_args(["bench", "--request-rates", "0.5,2,inf"])
    assert args.request_rates == [0.5, 2.0, float("inf")]


def test_mode_both_alternates_the_clusters_at_each_rate():
    args = build_parser().parse_args(["bench", "--mode", "both", "--request-rates", "1,2", "--num-requests", "40"])
    resolve_run_args(args)
    assert (args.prefix_cache, args.concurrency) == ("off", 40)  # the fair defaults: no cache, open loop
    disaggregated = Variant(prefix_cache=False)  # both without a cache
    aggregated = Variant(aggregated=True, prefix_cache=False)
    assert schedule(args) == [(disaggregated, 1.0), (aggregated, 1.0), (disaggregated, 2.0), (aggregated, 2.0)]
    assert (disaggregated.name, aggregated.name) == ("cluster_prefix_off", "cluster_aggregated_prefix_off")
    labels = [mode_label(RunKey(v, "grpc", 1.0), varied_fields(args)) for v in (disaggregated, aggregated)]
    assert labels == ["disaggregated", "aggregated"]


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


def test_mixed_sweep_against_a_cluster_writes_goodput_records(gpt2_cluster, tmp_path):
    prefix = tmp_path / "sweep"
    main(
        [
            *("bench", "--address", gpt2_cluster.address, "--model", "distilgpt2", "--load-format", "dummy"),
            *("--workload", "mixed", "--num-requests", "4", "--long-fraction", "0.5", "--long-prompt-tokens", "40"),
            *("--prompt-tokens", "8", "--output-tokens", "3", "--request-rates", "20,40", "--baseline", "none"),
            *("--warmup-requests", "1", "--goodput", "ttft:60000", "tpot:60000", "--output", str(prefix)),
        ]
    )
    report = json.loads(prefix.with_suffix(".json").read_text())
    assert set(report["results"]) == {"cluster@20/s", "cluster@40/s"}
    assert report["slos_ms"] == {"ttft": 60000.0, "tpot": 60000.0}
    assert [(row["mode"], row["request_rate"]) for row in report["sweep"]] == [
        ("disaggregated", 20.0),
        ("disaggregated", 40.0),
    ]
    for stats in report["results"].values():
        assert (stats["completed"], stats["good_requests"]) == (4, 4)  # SLOs no request can miss
        assert stats["goodput"] == pytest.approx(stats["request_throughput"])
        assert stats["prompt_tokens"] == 2 * 40 + 2 * 8  # the mix, as the gateway counted it
    record = prefix.with_suffix(".md").read_text()
    assert "Sweep (one row per mode and request rate)" in record and "| goodput (req/s) |" in record
    assert "Poisson arrivals at 20 requests/s" in record
    assert prefix.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_greedy_screen_both_runs_the_decode_step_ab_on_the_same_workload():
    args = build_parser().parse_args(["bench", "--greedy-screen", "both", "--concurrency", "4"])
    resolve_run_args(args)
    plain, screened = variants(args)
    assert (plain.name, screened.name) == ("cluster_float32_head", "cluster")
    with pytest.raises(SystemExit, match="--greedy-screen off/both starts its own clusters"):
        main(["bench", "--address", "127.0.0.1:1", "--greedy-screen", "off"])


def test_variant_names_are_derived_from_fields_and_meaningless_variants_are_refused():
    assert Variant().name == "cluster" and Variant(aggregated=True).name == "cluster_aggregated"
    every_departure = Variant(False, False, False, "least-loaded", True, False, False)
    assert every_departure.name == "cluster_kv_off_prefix_off_least_loaded_local_prefill_whole_handoff_float32_head"
    assert Variant(local_prefill=True).departures() == ["local_prefill"]  # off by default, as in `disagg up`
    assert RunKey(Variant(), "openai", 2.0).label == "cluster_openai@2/s"
    assert RunKey(Baseline(static_batches=True)).label == "generate_static_batch"
    for bad in (
        dict(aggregated=True, routing="least-loaded"),
        dict(aggregated=True, local_prefill=True),
        dict(local_prefill=False, held_prefix=False),
        dict(routing="round-robin"),
    ):
        with pytest.raises(ValueError):
            Variant(**bad)
    with pytest.raises(ValueError, match="a baseline none"):
        RunKey(Baseline(static_batches=False), "grpc")
    with pytest.raises(ValueError, match="one of grpc, openai"):
        RunKey(Variant())


def test_the_bench_cluster_takes_the_path_of_disagg_up_by_default():
    up = build_parser().parse_args(["up"])
    args = build_parser().parse_args(["bench"])
    resolve_run_args(args)
    assert args.local_prefill == ("on" if up.local_prefill_tokens else "off") == "off"
    assert variants(args) == [Variant()] and reference(args) == Variant() and not Variant().local_prefill
    on = build_parser().parse_args(["bench", "--local-prefill", "on", "--handoff-held-prefix", "both"])
    resolve_run_args(on)
    assert reference(on) == LOCAL_PREFILL_ON and on.local_prefill_tokens == LOCAL_PREFILL_TOKENS
    assert [v.name for v in variants(on)] == ["cluster_local_prefill_whole_handoff", "cluster_local_prefill"]


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


def test_sweep_labels_keep_the_suffixes_of_what_the_invocation_varies():
    args = build_parser().parse_args(["bench", "--kv-cache", "both", "--prefix-cache", "off", "--api", "both"])
    resolve_run_args(args)
    assert varied_fields(args) == {"kv_cache"}
    assert [v.name for v in variants(args)] == ["cluster_prefix_off", "cluster_kv_off_prefix_off"]
    off = Variant(kv_cache=False, prefix_cache=False)
    assert mode_label(RunKey(off, "grpc", 1.0), varied_fields(args)) == "disaggregated_kv_off"
    assert mode_label(RunKey(off, "openai", 1.0), varied_fields(args)) == "disaggregated_kv_off_openai"


def test_disagg_finds_bench_by_entry_point_and_skips_only_an_absent_package(monkeypatch, capsys):
    import importlib.metadata

    assert build_parser().parse_args(["bench"]).func.__module__ == "benchmarks.cli"
    group = "disagg.commands"
    absent = importlib.metadata.EntryPoint("peer", "no_such_package_anywhere.cli:add_parser", group)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [absent])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench"])  # no such command here: the other commands still parse
    assert "invalid choice: 'bench'" in capsys.readouterr().err
    assert build_parser().parse_args(["inspect", "x"]).command == "inspect"
    broken = importlib.metadata.EntryPoint("bench", "benchmarks.no_such_module:add_parser", group)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [broken])
    with pytest.raises(ModuleNotFoundError, match="benchmarks.no_such_module"):
        build_parser()
