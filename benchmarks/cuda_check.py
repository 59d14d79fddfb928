"""A short check of the CUDA path on a GPU machine (not part of the test suite: CI has no GPU).

Runs the workers' model math in one process on `--device cuda`: disaggregated greedy decoding (batched prefill,
KV through the wire codec's bytes, continuous-batch decode over the KV slab) against `generate()`, then times a
decode step at a few batch sizes and the device-to-wire KV copy. Writes a JSON report.
  python -m benchmarks.cuda_check --out cuda_check.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import cast

import torch
from transformers import GenerationMixin

from disagg.kv.codec import KvAssembler, KvLayout, encode_kv
from disagg.model.decode_batch import DecodeBatch
from disagg.model.dtypes import DTYPE_NAMES
from disagg.model.loading import LoadedModel, load_model
from disagg.model.prefill import prefill


def disaggregated_greedy(lm: LoadedModel, prompts: list[list[int]], n: int) -> list[list[int]]:
    layers, heads, head_dim = lm.kv_shape()
    outs = prefill(lm.model, prompts)
    batch = DecodeBatch(layers, heads, head_dim, lm.dtype, lm.device)
    generated = {}
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        assert out.kv is not None  # prefill keeps the KV cache unless told not to
        layout = KvLayout(DTYPE_NAMES[lm.dtype], layers, heads, len(prompt), head_dim, lm.fingerprint)
        assembler = KvAssembler(layout, lm.fingerprint)
        for chunk in encode_kv(out.kv):
            assembler.add(chunk)
        first = int(torch.argmax(out.logits))
        generated[str(i)] = [first]
        batch.add(str(i), assembler.layers(), first)
    for _ in range(n - 1):
        tokens = torch.argmax(batch.step(lm.model), dim=-1).tolist()
        for seq_id, token in zip(batch.seq_ids, tokens):
            generated[seq_id].append(token)
        batch.set_last_tokens(tokens)
    return [generated[str(i)] for i in range(len(prompts))]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_ms(lm: LoadedModel, batch_size: int, context: int = 64, steps: int = 20) -> float:
    layers, heads, head_dim = lm.kv_shape()
    kv = [(torch.randn(1, heads, context, head_dim, dtype=lm.dtype, device=lm.device),) * 2 for _ in range(layers)]
    batch = DecodeBatch(layers, heads, head_dim, lm.dtype, lm.device)
    for i in range(batch_size):
        batch.add(str(i), kv, 1)
    for _ in range(3):
        batch.step(lm.model)
    sync(lm.device)
    started = time.perf_counter()
    for _ in range(steps):
        batch.step(lm.model)
    sync(lm.device)
    return (time.perf_counter() - started) / steps * 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cuda_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="cuda_check.json", help="the JSON report")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,16,64,256", help="decode batch sizes to time, comma-separated")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    report: dict = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device,
        "torch": torch.__version__,
    }
    batches = [int(b) for b in args.batches.split(",")]
    torch.backends.cuda.matmul.allow_tf32 = False
    lm = load_model("distilgpt2", load_format="dummy", device=args.device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50000, (n,), generator=g).tolist() for n in (1, 13, 200, 700)]
    ours = disaggregated_greedy(lm, prompts, 16)
    generate = cast(GenerationMixin, lm.model).generate  # (the causal LM classes all mix it in)
    greedy = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": 50256}
    ref = [generate(torch.tensor([p], device=args.device), **greedy)[0, len(p) :].tolist() for p in prompts]
    report["greedy_identical_fp32"] = [a == b for a, b in zip(ours, ref)]
    report["decode_step_ms_fp32"] = {b: round(step_ms(lm, b), 2) for b in batches}
    out = prefill(lm.model, [prompts[3]])[0]
    assert out.kv is not None
    sync(lm.device)
    started = time.perf_counter()
    nbytes = sum(len(c.data) for c in encode_kv(out.kv))
    report["kv_encode_700_tokens"] = {"bytes": nbytes, "ms": round((time.perf_counter() - started) * 1000, 2)}
    lm16 = load_model("distilgpt2", load_format="dummy", device=args.device, dtype="bfloat16")
    report["decode_step_ms_bf16"] = {b: round(step_ms(lm16, b), 2) for b in batches}
    ours16 = disaggregated_greedy(lm16, prompts, 8)
    report["bf16_runs"] = all(len(t) == 8 for t in ours16)
    print(json.dumps(report, indent=2))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
