"""`disagg bench dtype`: greedy agreement of a lower-precision model (bfloat16) with float32 on the bundled real
model, through the serving path (prefill, then the decode slab), over a fixed prompt set.

bfloat16 keeps float32's exponent with an 8-bit mantissa (about 3 significant digits): on CPUs with AMX or
AVX512-BF16 its matrix products run faster, and logits move. Greedy decoding turns that into an occasional
different token wherever the top two logits are close; after the first difference the two continuations are
different texts, so the record reports the first divergence per prompt and identical sequences, not only matching
positions.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.agreement import AGREEMENT_PROMPTS, chat_ids, empty_tally, tally
from benchmarks.report import publish
from disagg.model.decode_batch import DecodeBatch
from disagg.model.loading import BUNDLED_MODEL, LoadedModel, load_model
from disagg.model.prefill import prefill


@torch.inference_mode()
def greedy_tokens(lm: LoadedModel, ids: list[int], new_tokens: int) -> list[int]:
    """`new_tokens` greedy tokens after `ids`, as the workers compute them (prefill, then one-row decode steps)."""
    out = prefill(lm.model, [ids])[0]
    assert out.kv is not None  # prefill keeps the KV cache unless told not to
    tokens = [int(out.logits.argmax())]
    batch = DecodeBatch(*lm.kv_shape(), lm.dtype, lm.device)
    batch.add("s", out.kv, tokens[0])
    for _ in range(new_tokens - 1):
        tokens.append(int(batch.step(lm.model)[0].argmax()))
        batch.set_last_tokens(tokens[-1:])
    return tokens


def measure_dtype_agreement(
    dtypes: Sequence[str] = ("bfloat16",),
    new_tokens: int = 32,
    model: str = BUNDLED_MODEL,
    prompts: Sequence[str] = AGREEMENT_PROMPTS,
) -> dict[str, Any]:
    """Greedy tokens of the model in each of `dtypes` vs float32, per prompt."""
    reference_lm = load_model(model, dtype="float32")
    prompt_ids = [chat_ids(reference_lm, p) for p in prompts]
    reference = [greedy_tokens(reference_lm, ids, new_tokens) for ids in prompt_ids]
    del reference_lm
    result: dict[str, dict[str, Any]] = {}
    for dtype in dtypes:
        lm = load_model(model, dtype=dtype)
        result[dtype] = entry = empty_tally()
        for ids, ref in zip(prompt_ids, reference):
            tally(entry, ref, greedy_tokens(lm, ids, new_tokens))
    return dict(model=model, prompts=len(prompts), new_tokens=new_tokens, dtypes=result)


def render_markdown(record: dict[str, Any]) -> str:
    lines = [
        "# Greedy agreement with float32\n",
        f"Command: `{record['command']}`  ",
        f"Date: {record['date']}; machine: {record['machine']}\n",
        f"{record['model']}, {record['prompts']} chat prompts x {record['new_tokens']} greedy tokens, through the "
        "serving path (prefill + decode slab).\n",
        "| dtype | tokens matching | agreement | identical sequences | first divergence per prompt |",
        "|---|---|---|---|---|",
    ]
    for dtype, e in record["dtypes"].items():
        lines.append(
            f"| {dtype} | {e['matching']}/{e['total']} | {100 * e['agreement']:.1f}% | "
            f"{e['identical_sequences']}/{record['prompts']} | {e['first_divergence']} |"
        )
    return "\n".join(lines) + "\n"


def add_dtype_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtypes", default="bfloat16", help="dtypes to compare with float32, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt and dtype")
    parser.add_argument("--agreement-model", default=BUNDLED_MODEL, help="a real model (dummy weights mean nothing)")
    parser.add_argument("--out", default="", help="write OUT.json and OUT.md (e.g. benchmarks/results/bf16_agreement)")


def dtype_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    record = dict(
        command="disagg " + " ".join(getattr(args, "argv", [])),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        **measure_dtype_agreement(tuple(args.dtypes.split(",")), args.new_tokens, args.agreement_model),
    )
    publish(record, render_markdown(record), args.out)
