"""The host's ceilings under a serving run (benchmarks/matmul_floor.py) and their place in the peer record."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from benchmarks import matmul_floor, peer_record
from tests.test_peer_vllm import _record, _server, _smoke_runs

TINY_GPT2 = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
TINY_LLAMA = LlamaConfig(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=100, max_position_embeddings=64,
)  # fmt: skip


def _layer_weight_sizes(model: torch.nn.Module) -> int:
    """The elements of one layer's 2-D weights (its projections) in a real HF model."""
    layer = next(
        m for name, m in model.named_modules() if name.endswith(".0") and "layers" in name or name.endswith("h.0")
    )
    return sum(p.numel() for p in layer.parameters() if p.dim() == 2)


@pytest.mark.parametrize("config, model_class", [(TINY_GPT2, GPT2LMHeadModel), (TINY_LLAMA, LlamaForCausalLM)])
def test_projection_shapes_hold_every_weight_of_a_layer(config, model_class):
    shapes = matmul_floor.projection_shapes(config)
    assert sum(out * inp for out, inp in shapes) == _layer_weight_sizes(model_class(config))
    assert len(shapes) == 4  # fused as engines fuse them: qkv, o, up (gate+up), down


def test_kv_bytes_count_grouped_heads_once():
    # rows 3, context 10, layers 2, K and V, 2 KV heads of 16 dims, 4 bytes
    assert matmul_floor.kv_bytes_per_step(TINY_LLAMA, 3, 10, torch.float32) == 3 * 10 * 2 * 2 * 2 * 16 * 4


def test_ceilings_add_prefill_and_a_share_of_each_step():
    got = matmul_floor.ceilings(
        input_len=100, output_len=11, concurrency=10, prefill_token_seconds=0.001, step_seconds=0.05,
        head_step_seconds=0.02, head_prompt_seconds=0.01,
    )  # fmt: skip
    # a request: prefill 0.1 s + its head 0.01 s + 10 decode tokens, each a tenth of a 0.07 s step
    assert got["ceiling_full_head"] == pytest.approx(11 / (0.1 + 0.01 + 0.07))
    assert got["ceiling_body_only"] == pytest.approx(11 / (0.1 + 0.05))
    assert got["tpot_floor_ms"] == pytest.approx(70.0)


def test_the_floor_of_a_tiny_model_is_measured_on_this_host():
    floor = matmul_floor.workload_floor(
        TINY_LLAMA, input_len=16, output_len=8, concurrencies=[1, 4], dtype=torch.float32
    )
    assert floor["measured"] and floor["read_gb_per_s"] > 0 and floor["prefill_token_ms"] > 0
    one, four = floor["concurrencies"]
    assert one["step_ms"] > 0 and one["kv_read_ms"] > 0
    assert four["kv_read_ms"] == pytest.approx(4 * one["kv_read_ms"])  # four rows read four rows' K/V
    assert one["ceiling_full_head"] < one["ceiling_body_only"]


def test_the_peer_record_reports_each_servers_share_of_the_ceiling():
    vllm, ours = _smoke_runs()
    record = _record([_server("vllm_tuned", [vllm]), _server(peer_record.DISAGG, [ours])])
    assert "Not measured in this run." in peer_record.render_markdown(record)
    ceiling = 2 * ours["metrics"]["output_throughput"]
    row = dict(
        concurrency=4, step_ms=10.0, kv_read_ms=1.0, head_step_ms=2.0, ceiling_full_head=ceiling,
        ceiling_body_only=ceiling + 10, tpot_floor_ms=13.0, tpot_floor_body_only_ms=11.0,
    )  # fmt: skip
    record["floor"] = dict(
        measured=True, dtype="float32", threads=2, read_gb_per_s=30.0, prefill_token_ms=1.0, concurrencies=[row]
    )
    markdown = peer_record.render_markdown(record)
    vllm_share = f"{vllm['metrics']['output_throughput'] / ceiling:.0%}"
    assert f"| 4 | 10.0 + 1.0 + 2.0 | {ceiling:.0f} | {ceiling + 10:.0f} | {vllm_share} | 50% |" in markdown
