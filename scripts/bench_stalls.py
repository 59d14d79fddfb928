"""Stream stalls on a decode worker while long prompts join its batch (issue 11's measurement).

A real DecodeEngine on the seeded dummy distilgpt2 runs one sequence (the "running stream") on an asyncio loop, as
the decode servicer does. After it has produced WARM tokens, JOINERS sequences with PROMPT-token caches are
submitted at once from the loop. Reported, for the running stream: the largest gap between two of its tokens as
delivered on the loop, before and while the joiners are admitted; and the event loop's own largest lag (a 1 ms
ticker), which is what a blocked `submit()`/`cancel()` shows. Run it on two commits to compare:

    python scripts/bench_stalls.py --out results/stalls_after     # writes .json and .md
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import pathlib
import platform
import statistics
import subprocess
import time

import torch

from disagg.config import BatchPolicy
from disagg.engine.decode import DecodeEngine, DecodeSequence
from disagg.model.loading import load_model
from disagg.model.output_stream import OutputStream
from disagg.model.prefill import prefill
from disagg.model.runtime import configure_torch
from disagg.model.sampling import SamplingParams


def _kv(lm, tokens: int):
    """A real prompt cache of `tokens` tokens (computed once, shared by the joiners: add() copies it)."""
    ids = [(i * 7919) % 50000 + 1 for i in range(tokens)]
    return ids, prefill(lm.model, [ids])[0].kv


async def one_round(lm, engine: DecodeEngine, prompt, kv, args) -> dict:
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    joined_at: list[float] = []
    done = asyncio.Event()
    lags: list[tuple[float, float]] = []  # (when, lag)

    def sequence(request_id: str, tokens: int, on_token) -> DecodeSequence:
        params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
        output = OutputStream(lm.tokenizer, params, lm.eos_token_ids)
        output.replay([prompt[-1]])
        return DecodeSequence(request_id, prompt[:-1], output, [(k, v) for k, v in kv], deliver=on_token)

    notify = "notify" in inspect.signature(DecodeEngine.__init__).parameters  # new engines call deliver on the loop

    def wrap(fn):
        return fn if notify else (lambda event: loop.call_soon_threadsafe(fn, event))

    def on_running(event):
        arrivals.append(time.monotonic())
        if getattr(event, "finish_reason", None) is not None or isinstance(event, BaseException):
            done.set()

    engine.submit(sequence("running", args.running_tokens, wrap(on_running)))

    async def ticker():
        while not done.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.001)
            lags.append((before, time.monotonic() - before - 0.001))

    tick = asyncio.create_task(ticker())
    while len(arrivals) < args.warm:
        await asyncio.sleep(0.001)
    joined_at.append(time.monotonic())
    for i in range(args.joiners):
        engine.submit(sequence(f"joiner-{i}", args.joiner_tokens, wrap(lambda event: None)))
    joined_at.append(time.monotonic())
    await done.wait()
    await tick
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    split = args.warm - 1  # gaps[split:] start at the last token before the joiners came
    return {
        "max_gap_before_ms": 1000 * max(gaps[1:split]),
        "median_gap_before_ms": 1000 * statistics.median(gaps[1:split]),
        "max_gap_while_joining_ms": 1000 * max(gaps[split:]),
        "submit_seconds_ms": 1000 * (joined_at[1] - joined_at[0]),
        "max_loop_lag_while_joining_ms": 1000 * max((lag for at, lag in lags if at >= joined_at[0]), default=0.0),
    }


async def run(args) -> list[dict]:
    configure_torch(args.threads)
    lm = load_model("distilgpt2", load_format="dummy", seed=0)
    prompt, kv = _kv(lm, args.prompt_tokens)
    rounds = []
    for _ in range(args.repeats):
        kwargs = {}
        if "notify" in inspect.signature(DecodeEngine.__init__).parameters:
            kwargs["notify"] = asyncio.get_running_loop().call_soon_threadsafe
        engine = DecodeEngine(lm, BatchPolicy(max_batch_size=64), **kwargs)
        engine.start()
        try:
            rounds.append(await one_round(lm, engine, prompt, kv, args))
        finally:
            await asyncio.to_thread(engine.stop)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=900)
    parser.add_argument("--joiners", type=int, default=16)
    parser.add_argument("--joiner-tokens", type=int, default=4)
    parser.add_argument("--running-tokens", type=int, default=60)
    parser.add_argument("--warm", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rounds = asyncio.run(run(args))
    keys = rounds[0].keys()
    summary = {k: statistics.median(r[k] for r in rounds) for k in keys}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {
        "commit": commit,
        "args": vars(args),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "rounds": rounds,
        "median": summary,
    }
    print(json.dumps(record["median"], indent=2))
    if args.out:
        pathlib.Path(args.out + ".json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
