"""`disagg inspect "PROMPT"`: what prefill and decode do, shown on the code the workers run.

Prefill is `disagg.prefill_batch.prefill` (the prefill worker's forward pass), each decode step is
`disagg.decode_batch.DecodeBatch.step` (the decode worker's slab), tokens come from `disagg.sampling`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from disagg import config as cfg

if TYPE_CHECKING:
    from transformers import BatchEncoding


def add_inspect_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt to walk through")
    cfg.add_flags(parser, cfg.ModelOptions, role="inspect")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="decode steps to show (after prefill's token)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens of this mass"
    )
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template")


def _shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def inspect_main(args: argparse.Namespace) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from disagg.model.decode_batch import DecodeBatch
    from disagg.model.loading import load_model
    from disagg.model.prefill import prefill
    from disagg.model.runtime import configure_torch
    from disagg.model.sampling import SamplingParams, sample_token

    configure_torch(args.threads)
    lm = load_model(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device, seed=args.seed)
    tok = lm.tokenizer
    if args.chat:
        chat = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        ids = list(cast("BatchEncoding", chat)["input_ids"])  # (return_dict=True: a BatchEncoding)
    else:
        ids = tok.encode(args.prompt)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens + 1,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    print(
        f"model: {lm.name} @ {args.dtype} on {args.device} (load_model {lm.load_model_seconds:.2f} s, "
        f"load_tokenizer {lm.load_tokenizer_seconds * 1000:.0f} ms)"
    )

    print(f"\n== prefill: one forward pass over all {len(ids)} prompt tokens ==")
    print("prompt tokens (id: text):")
    print("  " + " ".join(f"{i}:{tok.decode([i])!r}" for i in ids))
    started = time.perf_counter()
    out = prefill(lm.model, [ids])[0]
    assert out.kv is not None  # prefill keeps the KV cache unless told not to
    prefill_ms = (time.perf_counter() - started) * 1000
    print(f"input_ids shape  : {_shape([1, len(ids)])}")
    print(f"logits shape     : {_shape([1, 1, out.logits.shape[-1]])} (last position only: logits_to_keep=1)")
    print(f"KV cache         : {len(out.kv)} layers, keys and values each:")
    for layer, (key, value) in enumerate(out.kv):
        print(f"  layer {layer:2d}: keys {_shape(key.shape)} values {_shape(value.shape)}")
    first = sample_token(out.logits, params, step=0)
    top = out.logits.topk(3)
    print(f"prefill time     : {prefill_ms:.1f} ms")
    print(
        f"first token      : {first} {tok.decode([first])!r} (top-3 logits: "
        + ", ".join(f"{int(i)} {tok.decode([int(i)])!r} {float(v):.2f}" for v, i in zip(top.values, top.indices))
        + ")"
    )

    layers, heads, head_dim = lm.kv_shape()
    batch = DecodeBatch(layers, heads, head_dim, lm.dtype, lm.device)
    batch.add("inspect", out.kv, first)
    print("\n== decode: one token per step, reading the KV cache and appending one column ==")
    print(f"{'step':>4}  {'ms':>8}  {'kv_seq_len':>10}  {'token':>7}  text")
    tokens = [first]
    for step in range(1, args.max_new_tokens + 1):
        started = time.perf_counter()
        logits = batch.step(lm.model)
        token = sample_token(logits[0], params, step=step)
        ms = (time.perf_counter() - started) * 1000
        batch.set_last_tokens([token])
        tokens.append(token)
        print(f"{step:>4}  {ms:>8.1f}  {batch.length:>10}  {token:>7}  {tok.decode([token])!r}")
    print(
        f"\nfinal KV shape [batch, heads, seq_len, head_dim]: {_shape(batch.kv_shape())} per layer, "
        f"{layers} layers, keys and values"
    )
    print(
        f"(seq_len = {len(ids)} prompt + {args.max_new_tokens} decoded; the newest token's KV is computed by the "
        "next step)"
    )
    print(f"output: {tok.decode(tokens)!r}")
