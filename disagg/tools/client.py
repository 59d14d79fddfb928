"""A Gateway client: the `disagg generate` command, and the building block of tests and the benchmark."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg.config import TlsOptions
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.rpc.channel import open_channel
from disagg.rpc.convert import metrics_to_dict


@dataclass
class Completion:
    """One finished request as the client saw it, with its timings (seconds since the call started)."""

    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    token_times: list[float] = field(default_factory=list)  # arrival of each token
    latency: float = 0.0
    metrics: gateway_pb2.RequestMetrics | None = None  # the request's phases, from the last message

    def add(self, response: gateway_pb2.GenerateResponse, at: float) -> None:
        """One more message of the stream, arrived `at` seconds after the call started."""
        self.request_id = self.request_id or response.request_id
        self.text += response.text
        self.token_ids.extend(response.token_ids)
        self.token_times.extend([at] * len(response.token_ids))
        if response.finish_reason:
            self.finish_reason = response.finish_reason
            self.prompt_tokens = response.usage.prompt_tokens
            self.completion_tokens = response.usage.completion_tokens
            self.cached_prompt_tokens = response.usage.cached_prompt_tokens
        if response.HasField("metrics"):
            self.metrics = response.metrics
        self.latency = at

    def record(self) -> dict[str, Any]:
        """The request as JSON (`disagg generate --json`): text, usage, the gateway's phases, the client's timings."""
        return {
            "request_id": self.request_id,
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cached_prompt_tokens": self.cached_prompt_tokens,
            },
            "metrics": metrics_to_dict(self.metrics) if self.metrics is not None else None,
            "client": {
                "time_to_first_token_ms": round(self.ttft * 1e3, 3) if self.token_times else None,
                "total_ms": round(self.latency * 1e3, 3),
            },
        }

    @property
    def ttft(self) -> float:
        return self.token_times[0] if self.token_times else float("nan")

    @property
    def tpot(self) -> float:
        """Time per output token after the first."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else float("nan")


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the gateway's bearer token (none when empty)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


async def stream(
    stub: gateway_pb2_grpc.GatewayStub,
    request: gateway_pb2.GenerateRequest,
    timeout: float | None = None,
    auth_token: str = "",
) -> AsyncIterator[tuple[gateway_pb2.GenerateResponse, float]]:
    """Responses with their arrival time (seconds since the call started)."""
    started = time.perf_counter()
    async for response in stub.Generate(request, timeout=timeout, metadata=bearer(auth_token)):
        yield response, time.perf_counter() - started


async def complete(
    stub: gateway_pb2_grpc.GatewayStub,
    request: gateway_pb2.GenerateRequest,
    timeout: float | None = None,
    auth_token: str = "",
) -> Completion:
    result = Completion()
    async for response, at in stream(stub, request, timeout, auth_token):
        result.add(response, at)
    return result


def phases_record(metrics: gateway_pb2.RequestMetrics) -> str:
    """The request's phases in one line for people (`disagg generate`, on stderr)."""
    m = metrics_to_dict(metrics)
    prefill = (
        f"prefill {m['prefill_location']} on {m['prefill_worker']}: {m['prefill_tokens']} tokens "
        f"({m['prefill_cached_tokens']} cached), queue {m['prefill_queue_ms']:.1f} ms, "
        f"forward {m['prefill_ms']:.1f} ms (batch of {m['prefill_batch_size']})"
    )
    if m["kv_transport"]:
        held = f", {m['kv_held_prefix_tokens']} tokens held there" if m["kv_held_prefix_tokens"] else ""
        kv = f"KV {m['kv_bytes']} bytes {m['kv_transport']} in {m['kv_transfer_ms']:.1f} ms{held}"
    else:
        kv = "KV not handed over"
    decode = "no decode"
    if m["decode_worker"]:
        decode = (
            f"decode on {m['decode_worker']}: queue {m['decode_queue_ms']:.1f} ms, KV load {m['kv_load_ms']:.1f} ms, "
            f"{m['decode_steps']} steps, {m['decode_tokens']} tokens in {m['decode_ms']:.1f} ms "
            f"({m['decode_tokens_per_second']:.1f} tokens/s)"
        )
    attempts = f", {m['attempts']} attempts" if m["attempts"] > 1 else ""
    return f"[{prefill}; {kv}; {decode}; total {m['total_ms']:.1f} ms{attempts}]"


async def wait_serving(ch: grpc.aio.Channel, timeout: float) -> None:
    """Poll the standard health service until it reports SERVING (a server still loading is not an error)."""
    stub = health_pb2_grpc.HealthStub(ch)
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"not serving after {timeout:.0f}s")
        await asyncio.sleep(0.25)


def channel(address: str, tls: TlsOptions | None = None) -> grpc.aio.Channel:
    return open_channel(address, tls)


def scrape_metrics(address: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} of a process's Prometheus /metrics page at `address` (host:port)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
