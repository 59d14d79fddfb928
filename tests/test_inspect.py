"""`disagg inspect`: prefill inputs/outputs, one row per decode step, and the final KV shape."""

from __future__ import annotations

import re

from disagg.tools.cli import main


def test_inspect_shows_prefill_decode_steps_and_final_kv_shape(capsys):
    main(
        [
            "inspect",
            "Batching improves utilization.",
            "--model",
            "distilgpt2",
            "--load-format",
            "dummy",
            "--max-new-tokens",
            "3",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    shown = re.search(r"prompt tokens \(id: text\):\n(.*)\n", out).group(1)
    assert re.findall(r"(\d+):'", shown) == ["33", "19775", "19575", "32121", "13"]
    assert "input_ids shape  : [1, 5]" in out
    assert "logits shape     : [1, 1, 50257]" in out
    assert out.count("keys [1, 12, 5, 64] values [1, 12, 5, 64]") == 6
    assert re.search(r"first token      : \d+ ", out)
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+'", out, flags=re.M)
    assert [(int(step), int(kv_len)) for step, _, kv_len, _ in rows] == [(1, 6), (2, 7), (3, 8)]
    assert "final KV shape [batch, heads, seq_len, head_dim]: [1, 12, 8, 64]" in out


def test_inspect_shows_grouped_query_kv_heads_of_the_real_model(capsys):
    main(
        [
            "inspect",
            "What is the capital of France?",
            "--model",
            "smollm2-135m-instruct",
            "--chat",
            "--max-new-tokens",
            "2",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    n = int(re.search(r"input_ids shape  : \[1, (\d+)\]", out).group(1))
    assert out.count(f"keys [1, 3, {n}, 64]") == 30  # 30 layers, 3 KV heads (grouped-query attention)
    assert f"final KV shape [batch, heads, seq_len, head_dim]: [1, 3, {n + 2}, 64]" in out
