"""The clients that send a workload and time what comes back: the gateway's gRPC Generate (one request per
prompt, or multi-turn conversations that re-send their history) and the OpenAI-compatible HTTP front (streamed
/v1/completions). Each returns a `RunResult` of per-request token arrival times; a failed request is recorded,
never fatal to the run.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any, cast

from benchmarks.stats import RequestRecord, RunResult
from benchmarks.workloads import Workload, arrival_delays, next_turn_prompt
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.tools.client import Completion, channel, complete


async def run_against_gateway(
    address: str,
    workload: Workload,
    prompts: list[str],
    on_done: Callable[[], None] = lambda: None,
    timeout: float = 600.0,
) -> RunResult:
    """Send the workload's requests (prompt i cycles through `prompts`) and record what each one saw."""
    limit = asyncio.Semaphore(workload.concurrency)
    records = [RequestRecord() for _ in range(workload.num_requests)]
    async with channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)

        async def one(i: int) -> None:
            request = gateway_pb2.GenerateRequest(
                prompt=prompts[i % len(prompts)],
                max_new_tokens=workload.output_tokens,
                ignore_eos=workload.ignore_eos,
                request_id=f"bench-{i}",
            )
            try:
                await _send(stub, request, records[i], timeout)
            finally:
                limit.release()
                on_done()

        duration = await _drive(workload, limit, one)
    return RunResult("cluster", duration, records)


async def _send(
    stub: gateway_pb2_grpc.GatewayStub, request: gateway_pb2.GenerateRequest, record: RequestRecord, timeout: float
) -> Completion | None:
    """One request into `record` (timings, usage or the error); returns the completion, None when it failed."""
    try:
        done = await complete(stub, request, timeout=timeout)
    except Exception as exc:  # a failed request is counted, not fatal to the run
        details = exc.details() if hasattr(exc, "details") else str(exc)
        record.error = f"{type(exc).__name__}: {details}"
        return None
    record.token_times = done.token_times
    record.prompt_tokens = done.prompt_tokens
    record.cached_prompt_tokens = done.cached_prompt_tokens
    if not done.token_times:
        record.error = "no tokens"
        return None
    return done


async def run_conversations(
    address: str,
    workload: Workload,
    conversations: list[list[str]] | list[list[list[int]]],
    on_done: Callable[[], None] = lambda: None,
    timeout: float = 600.0,
) -> RunResult:
    """The multi-turn workload: each conversation sends its user turns one after the other, every turn re-sending
    the history with the replies received; up to `concurrency` conversations at once, each starting at a Poisson
    arrival at `request_rate` conversations per second (inf: all at once). Record c * turns + t is turn t of
    conversation c; a failed turn ends its conversation (the turns left are counted as failed).

    User turns as text re-send the history as text (what a chat client does: the server re-encodes it, and may
    split a reply into other tokens than it generated); as token ids, the history is re-sent as the tokens sent
    and received (`prompt_token_ids`: a client that keeps the conversation's tokens)."""
    limit = asyncio.Semaphore(workload.concurrency)
    starts = list(itertools.accumulate(arrival_delays(replace(workload, num_requests=len(conversations)))))
    offsets = [sum(len(c) for c in conversations[:i]) for i in range(len(conversations))]
    records = [RequestRecord() for c in conversations for _ in c]
    async with channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)

        async def conversation(c: int) -> None:
            await asyncio.sleep(starts[c])
            async with limit:
                text, reply_text = "", ""
                ids: list[int] = []
                reply_ids: list[int] = []
                for t, user in enumerate(conversations[c]):
                    request = gateway_pb2.GenerateRequest(
                        max_new_tokens=workload.output_tokens,
                        ignore_eos=workload.ignore_eos,
                        request_id=f"bench-conv{c}-turn{t}",
                    )
                    if isinstance(user, str):
                        request.prompt = text = next_turn_prompt(text, reply_text, user)
                    else:
                        ids = [*ids, *reply_ids, *cast("list[int]", user)]
                        request.prompt_token_ids[:] = ids
                    done = await _send(stub, request, records[offsets[c] + t], timeout)
                    on_done()
                    if done is None:
                        for left in records[offsets[c] + t + 1 : offsets[c] + len(conversations[c])]:
                            left.error = "an earlier turn of the conversation failed"
                            on_done()
                        return
                    reply_text, reply_ids = done.text, done.token_ids

        started = time.perf_counter()
        await asyncio.gather(*(conversation(c) for c in range(len(conversations))))
        duration = time.perf_counter() - started
    return RunResult("cluster", duration, records)


async def _drive(
    workload: Workload, limit: asyncio.Semaphore, one: Callable[[int], Coroutine[Any, Any, None]]
) -> float:
    """Start request i at its arrival time (and when `limit` lets it); returns the seconds until all ended."""
    started = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []
    for i, delay in enumerate(arrival_delays(workload)):
        if delay:
            await asyncio.sleep(delay)
        await limit.acquire()
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - started


def spread_token_times(chunk_times: list[float], tokens: int) -> list[float]:
    """Per-token arrival times from SSE chunk times: the first chunk is the first token (always sent alone), the
    rest are spread evenly over the other chunks (exact at a stream interval of 1 token, where chunk = token)."""
    if not chunk_times or tokens <= 0:
        return []
    rest, chunks = tokens - 1, chunk_times[1:]
    times = [chunk_times[0]]
    for i, at in enumerate(chunks):
        times += [at] * (rest * (i + 1) // len(chunks) - rest * i // len(chunks))
    return times


async def run_against_openai(
    base_url: str,
    workload: Workload,
    prompts: list[str],
    model: str,
    on_done: Callable[[], None] = lambda: None,
    timeout: float = 600.0,
) -> RunResult:
    """The same workload through the OpenAI-compatible HTTP front (streamed /v1/completions, usage chunk on)."""
    import httpx2

    limit = asyncio.Semaphore(workload.concurrency)
    records = [RequestRecord() for _ in range(workload.num_requests)]
    pool = httpx2.Limits(max_connections=workload.concurrency, max_keepalive_connections=workload.concurrency)
    async with httpx2.AsyncClient(base_url=base_url, timeout=timeout, limits=pool) as http:

        async def one(i: int) -> None:
            body = {
                "model": model,
                "prompt": prompts[i % len(prompts)],
                "max_tokens": workload.output_tokens,
                "ignore_eos": workload.ignore_eos,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            chunk_times: list[float] = []
            tokens = 0
            try:
                started = time.perf_counter()
                async with http.stream("POST", "/completions", json=body) as reply:
                    if reply.status_code != 200:
                        raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
                    async for line in reply.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            raise RuntimeError(event["error"]["message"])
                        if event["choices"]:
                            chunk_times.append(time.perf_counter() - started)
                        elif usage := event.get("usage"):
                            tokens = usage["completion_tokens"]
                            records[i].prompt_tokens = usage.get("prompt_tokens", 0)
                            details = usage.get("prompt_tokens_details") or {}
                            records[i].cached_prompt_tokens = details.get("cached_tokens", 0)
                records[i].token_times = spread_token_times(chunk_times, tokens)
                if not records[i].token_times:
                    records[i].error = "no tokens"
            except Exception as exc:  # a failed request is counted, not fatal to the run
                records[i].error = f"{type(exc).__name__}: {exc}"
            finally:
                limit.release()
                on_done()

        duration = await _drive(workload, limit, one)
    return RunResult("cluster_openai", duration, records)
