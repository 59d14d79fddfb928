"""`disagg bench`: its flags and the variants they make, and tiny runs end to end against a real cluster."""

from __future__ import annotations

import asyncio
import json

import pytest

from benchmarks.drivers import run_conversations
from benchmarks.flags import resolve_run_args
from benchmarks.report import FIELDS
from benchmarks.variants import Baseline, RunKey, Variant, mode_label, reference, schedule, variants, varied_fields
from benchmarks.workloads import Workload, make_conversations
from disagg.config import LOCAL_PREFILL_TOKENS
from disagg.tools.cli import build_parser, main

LOCAL_PREFILL_ON = Variant(local_prefill=True)


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
