"""`disagg bench handoff` end to end at a small size: real prefill servicer and decode receiver over loopback gRPC."""

from __future__ import annotations

import json

import pytest

from disagg.tools.cli import main


@pytest.mark.cluster
def test_bench_handoff_writes_a_record(tmp_path):
    out = tmp_path / "handoff"
    variants = ("auto", "float16", "int8", "auto:layerwise", "direct/auto", "shared-memory/auto:layerwise")
    main(
        [
            "bench",
            "handoff",
            "--lengths",
            "16,40",
            "--formats",
            ",".join(variants),
            "--repeats",
            "1",
            "--agreement-tokens",
            "3",
            "--out",
            str(out),
        ]
    )
    record = json.loads((tmp_path / "handoff.json").read_text())
    assert record["command"].startswith("disagg bench handoff --lengths 16,40")
    rows = {(r["prompt_tokens"], r["wire"]): r for r in record["handoff"]}
    assert set(rows) == {(n, w) for n in (16, 40) for w in variants}
    for lossless in ("auto:layerwise", "direct/auto", "shared-memory/auto:layerwise"):  # same cache, other paths
        assert rows[(40, lossless)]["bytes"] == rows[(40, "auto")]["bytes"]
    assert rows[(40, "direct/auto")]["chunks"] == 0  # nothing through the relay: pushed to the decode side
    assert rows[(40, "shared-memory/auto:layerwise")]["chunks"] == 1  # one KvSharedMemory message
    per_token_fp32 = 2 * 6 * 12 * 64 * 4  # distilgpt2: 6 layers, K and V, 12 heads x 64, fp32
    assert rows[(40, "auto")]["bytes"] == 40 * per_token_fp32
    assert rows[(40, "float16")]["bytes"] == 40 * per_token_fp32 // 2
    assert rows[(40, "int8")]["bytes"] == 2 * 6 * 12 * 64 * (4 + 40)
    for row in rows.values():
        assert row["prefill_seconds"] > 0 and row["exposed_seconds"] > 0 and row["gb_per_s"] > 0
    agreement = record["agreement"]
    assert agreement["model"] == "smollm2-135m-instruct" and set(agreement["formats"]) == {"float16", "int8"}
    for entry in agreement["formats"].values():
        assert entry["total"] == 3 * agreement["prompts"] and 0 <= entry["agreement"] <= 1
    markdown = (tmp_path / "handoff.md").read_text()
    assert "| 40 | int8 |" in markdown and "| 40 | direct/auto |" in markdown
    assert "best whole-cache lossless path" in markdown


def test_dtype_agreement_uses_the_serving_path_and_counts_divergence(gpt2_model):
    import torch

    from benchmarks.agreement import empty_tally, tally
    from benchmarks.dtype_agreement import greedy_tokens

    ids = gpt2_model.tokenizer.encode("The decode worker keeps every running sequence in one slab")
    with torch.inference_mode():
        expected = gpt2_model.model.generate(
            torch.tensor([ids]),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
            attention_mask=torch.ones(1, len(ids)),
        )[0, len(ids) :].tolist()
    assert greedy_tokens(gpt2_model, ids, 8) == expected

    entry = empty_tally()
    tally(entry, [1, 2, 3, 4], [1, 2, 3, 4])
    tally(entry, [1, 2, 3, 4], [1, 9, 3, 4])
    assert entry == dict(matching=7, total=8, identical_sequences=1, first_divergence=[None, 1], agreement=7 / 8)


def test_bench_dtype_writes_a_record(tmp_path):
    out = tmp_path / "dtype"
    main(["bench", "dtype", "--new-tokens", "4", "--out", str(out)])  # the bundled real model
    record = json.loads(out.with_suffix(".json").read_text())
    entry = record["dtypes"]["bfloat16"]
    assert record["prompts"] == 8 and entry["total"] == 32 and 0 <= entry["matching"] <= 32
    assert "| bfloat16 |" in out.with_suffix(".md").read_text()
