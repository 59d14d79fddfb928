"""The least time a serving run's matmuls take on this host: a ceiling on any engine's output tokens/s (issue 23).

Every token a server computes goes through the model's projections, whatever engine runs them. Timing those
matmuls alone, at the shapes a `vllm bench serve` workload makes (each prompt's tokens in a prefill, `concurrency`
rows in a decode step), with the faster of the two CPU paths torch offers (`linear`, MKL; oneDNN with a prepacked
weight), and adding them up for one request gives a floor under the run's time that leaves out everything else
(attention, norms, sampling, scheduling, the network). Its inverse is a ceiling on output tokens/s at that
concurrency: an engine at 0.9 of it spends a tenth of its time on everything but those matmuls.

The peer comparison (benchmarks/peer_vllm.py) measures it in the same invocation as the servers, after they stop,
so each server's share of the ceiling is read from one run. Two floors: with the full `vocab x hidden` head in
the dtype on every decoded token (what an engine computing every logit pays), and with the body alone (the least
any engine pays, however it picks tokens: disagg's greedy screen lands between the two).

    python -m benchmarks.matmul_floor --model smollm2-135m-instruct --concurrency 1,32,64
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from disagg.model.loading import attention_heads
from disagg.model.native_weights import can_pack

Shape = tuple[int, int]  # (out, in) of one projection's weight


def projection_shapes(config: PretrainedConfig) -> list[Shape]:
    """One layer's projections, fused as engines fuse them (q/k/v as one, gate/up as one), (out, in) each."""
    hidden = config.hidden_size
    if config.model_type == "gpt2":
        inner = config.n_inner or 4 * hidden
        return [(3 * hidden, hidden), (hidden, hidden), (inner, hidden), (hidden, inner)]
    if config.model_type == "llama":
        heads, kv_heads, head_dim = attention_heads(config)
        inter = config.intermediate_size
        return [
            ((heads + 2 * kv_heads) * head_dim, hidden),
            (hidden, heads * head_dim),
            (2 * inter, hidden),
            (hidden, inter),
        ]
    raise ValueError(f"no projection shapes for model type {config.model_type!r}")


def matmul_seconds(rows: int, shapes: Sequence[Shape], layers: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """Seconds of `x [rows, in] @ W.T` over `shapes` in each of `layers` layers, every layer with weights of its own
    (read from memory as a real pass reads them, not from cache): the median of `repeats` passes, by the faster of
    `linear` and oneDNN's prepacked matmul."""
    generator = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(rows, n, generator=generator).to(dtype) for n in {n for _, n in shapes}}
    weights = [torch.randn(o, n, generator=generator).to(dtype) for _ in range(layers) for o, n in shapes]
    plain = [functools.partial(torch.nn.functional.linear, inputs[w.shape[1]], w) for w in weights]
    ways = [plain]
    if can_pack(dtype):
        packed = [(inputs[w.shape[1]], torch.ops.mkldnn._reorder_linear_weight(w, None)) for w in weights]
        ways.append(
            [functools.partial(torch.ops.mkldnn._linear_pointwise, x, p, None, "none", [], "") for x, p in packed]
        )
    return min(_median_seconds(calls, repeats) for calls in ways)


def read_bytes_per_second(gib: float = 1.0) -> float:
    """How fast this host reads memory with every thread torch has: summing a tensor far larger than any cache."""
    data = torch.ones(int(gib * 2**30) // 4)
    return data.numel() * 4 / _median_seconds([data.sum], 3)


def kv_bytes_per_step(config: PretrainedConfig, rows: int, context: int, dtype: torch.dtype) -> int:
    """The K and V every decode step must read: `rows` sequences of `context` cached tokens, every layer."""
    _, kv_heads, head_dim = attention_heads(config)
    return rows * context * config.num_hidden_layers * 2 * kv_heads * head_dim * dtype.itemsize


def _median_seconds(calls: Sequence[Callable[[], object]], repeats: int) -> float:
    """The median seconds of running `calls` in order, after one untimed run."""
    times: list[float] = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        for call in calls:
            call()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def ceilings(
    input_len: int,
    output_len: int,
    concurrency: int,
    prefill_token_seconds: float,
    step_seconds: float,
    head_step_seconds: float,
    head_prompt_seconds: float,
) -> dict[str, float]:
    """Output tokens/s ceilings of one concurrency from the matmul times: a request's prefill (`input_len` tokens at
    `prefill_token_seconds` each, the head once for its first token) plus its `output_len - 1` decode tokens, each
    a `concurrency`-th of a step of `step_seconds` (+ `head_step_seconds` for the full head). The prompt's own
    attention is left out (at 128 tokens, small beside its projections)."""
    prefill = input_len * prefill_token_seconds
    decode_body = (output_len - 1) * step_seconds / concurrency
    decode_head = (output_len - 1) * head_step_seconds / concurrency
    return dict(
        ceiling_full_head=output_len / (prefill + head_prompt_seconds + decode_body + decode_head),
        ceiling_body_only=output_len / (prefill + decode_body),
        tpot_floor_ms=1000 * (step_seconds + head_step_seconds),
        tpot_floor_body_only_ms=1000 * step_seconds,
    )


def workload_floor(
    config: PretrainedConfig, input_len: int, output_len: int, concurrencies: Sequence[int], dtype: torch.dtype
) -> dict[str, Any]:
    """Every concurrency's ceilings on this host, with the times they come from: a decode step is its matmuls plus
    reading its rows' K/V (at the mean context of the decode phase) at the host's read speed."""
    layers, shapes = config.num_hidden_layers, projection_shapes(config)
    head = [(config.vocab_size, config.hidden_size)]
    prefill_token = matmul_seconds(input_len, shapes, layers, dtype) / input_len
    head_prompt = matmul_seconds(1, head, 1, dtype)
    read_speed = read_bytes_per_second()
    rows: list[dict[str, Any]] = []
    for concurrency in concurrencies:
        step = matmul_seconds(concurrency, shapes, layers, dtype)
        kv_read = kv_bytes_per_step(config, concurrency, input_len + output_len // 2, dtype) / read_speed
        head_step = matmul_seconds(concurrency, head, 1, dtype)
        rows.append(
            dict(
                concurrency=concurrency,
                step_ms=1000 * step,
                kv_read_ms=1000 * kv_read,
                head_step_ms=1000 * head_step,
                **ceilings(input_len, output_len, concurrency, prefill_token, step + kv_read, head_step, head_prompt),
            )
        )
    return dict(
        measured=True,
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        read_gb_per_s=read_speed / 1e9,
        prefill_token_ms=1000 * prefill_token,
        head_prompt_ms=1000 * head_prompt,
        concurrencies=rows,
    )


def measure_floor(
    model_folder: str, input_len: int, output_len: int, concurrencies: Sequence[int], dtype: str
) -> dict[str, Any]:
    """`workload_floor` of the model in `model_folder` with every core of the host."""
    torch.set_num_threads(os.cpu_count() or 1)
    config = AutoConfig.from_pretrained(model_folder)
    return workload_floor(config, input_len, output_len, concurrencies, getattr(torch, dtype))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.matmul_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="as benchmarks.peer_vllm takes it")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--concurrency", default="1,32,64", help="comma-separated")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from benchmarks.peer_vllm import DEFAULT_CACHE, prepare_model  # (peer_vllm imports this module)

    args = build_parser().parse_args(argv)
    model = prepare_model(args.model, DEFAULT_CACHE)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    print(
        json.dumps(
            measure_floor(str(model.folder), args.input_len, args.output_len, concurrencies, args.dtype), indent=1
        )
    )


if __name__ == "__main__":
    main()
