"""A Gateway client: the `disagg generate` command, and the building block of tests and the benchmark."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg.config import TlsOptions
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.rpc.channel import open_channel


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
        result.request_id = result.request_id or response.request_id
        result.text += response.text
        result.token_ids.extend(response.token_ids)
        result.token_times.extend([at] * len(response.token_ids))
        if response.finish_reason:
            result.finish_reason = response.finish_reason
            result.prompt_tokens = response.usage.prompt_tokens
            result.completion_tokens = response.usage.completion_tokens
            result.cached_prompt_tokens = response.usage.cached_prompt_tokens
        result.latency = at
    return result


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
