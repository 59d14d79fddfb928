"""Each component serves Prometheus metrics over HTTP; after requests its histograms and counters count them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from disagg.model.lm_head import cpu_has_fast_bf16
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.tools.client import channel, complete, scrape_metrics
from disagg.tools.cluster import Cluster

GPT2_ARGS = ["--model", "distilgpt2", "--load-format", "dummy", "--seed", "0"]
MAX_NEW_TOKENS = 6
REQUESTS = 3
KV_BYTES_PER_TOKEN = 2 * 6 * 768 * 4  # distilgpt2: K and V, 6 layers, 768 wide, fp32


scrape = scrape_metrics  # {(sample name, labels): value} of one /metrics page


def value(samples, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster(GPT2_ARGS, [])  # no OTLP endpoint: metrics do not depend on tracing
    asyncio.run(cluster.start(timeout=300))
    yield cluster
    cluster.stop()


async def _run_requests(address: str) -> list:
    async with channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        done = [
            await complete(
                stub,
                gateway_pb2.GenerateRequest(
                    prompt=f"Request number {i} says hello", max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True
                ),
                timeout=300,
            )
            for i in range(REQUESTS)
        ]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await complete(stub, gateway_pb2.GenerateRequest(prompt=""), timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return done


@pytest.fixture(scope="module")
def scraped(cluster):
    completions = asyncio.run(_run_requests(cluster.gateway.address))
    children = {"gateway": cluster.gateway, "prefill": cluster.prefill[0], "decode": cluster.decode[0]}
    assert all(child.metrics_address for child in children.values())
    return completions, {name: scrape(child.metrics_address) for name, child in children.items()}


def test_gateway_latency_histograms_count_requests(scraped):
    completions, metrics = scraped
    g = metrics["gateway"]
    for name in (
        "gen_ai_server_time_to_first_token_seconds",
        "gen_ai_server_time_per_output_token_seconds",
        "gen_ai_server_request_duration_seconds",
    ):
        assert value(g, f"{name}_count", model="distilgpt2") == REQUESTS, name
        assert value(g, f"{name}_sum", model="distilgpt2") > 0, name
    assert value(g, "disagg_inter_token_latency_seconds_count", model="distilgpt2") == REQUESTS * (MAX_NEW_TOKENS - 1)
    # end-to-end latency at the gateway can only be shorter than what the client measured
    assert value(g, "gen_ai_server_request_duration_seconds_sum", model="distilgpt2") <= sum(
        c.latency for c in completions
    )
    assert value(g, "disagg_requests_total", model="distilgpt2", finish_reason="length") == REQUESTS
    assert value(g, "disagg_generation_tokens_total", model="distilgpt2") == REQUESTS * MAX_NEW_TOKENS
    assert value(g, "disagg_prompt_tokens_total", model="distilgpt2") == sum(c.prompt_tokens for c in completions)


def test_error_codes_are_counted(scraped):
    _, metrics = scraped
    assert (
        value(
            metrics["gateway"],
            "disagg_request_errors_total",
            method="/disagg.v1.Gateway/Generate",
            code="INVALID_ARGUMENT",
        )
        == 1
    )


def test_prefill_metrics(scraped):
    completions, metrics = scraped
    p = metrics["prefill"]
    assert value(p, "disagg_queue_wait_seconds_count") == REQUESTS
    assert value(p, "disagg_prefill_forward_seconds_count") == REQUESTS
    assert value(p, "disagg_prefill_forward_seconds_sum") > 0
    assert value(p, "disagg_batch_size_count") == REQUESTS
    assert value(p, "disagg_kv_transfer_seconds_count") == REQUESTS
    kv_bytes = KV_BYTES_PER_TOKEN * sum(c.prompt_tokens for c in completions)
    assert value(p, "disagg_kv_transferred_bytes_total") == kv_bytes
    assert value(p, "disagg_queue_length") == 0


def test_decode_metrics(scraped):
    completions, metrics = scraped
    d = metrics["decode"]
    assert value(d, "disagg_kv_transfer_seconds_count") == REQUESTS
    assert value(d, "disagg_kv_transferred_bytes_total") == KV_BYTES_PER_TOKEN * sum(
        c.prompt_tokens for c in completions
    )
    assert value(d, "disagg_kv_load_seconds_count") == REQUESTS
    assert value(d, "disagg_queue_wait_seconds_count") == REQUESTS
    assert value(d, "disagg_decode_time_per_output_token_seconds_count") == REQUESTS
    assert value(d, "disagg_batch_size_count") == REQUESTS * (MAX_NEW_TOKENS - 1)  # one per request and step
    assert value(d, "disagg_generation_tokens_total") == REQUESTS * (MAX_NEW_TOKENS - 1)
    assert value(d, "disagg_running_batch_size") == 0
    assert value(d, "disagg_queue_length") == 0
    kept = value(d, "disagg_greedy_screen_kept_tokens_per_row")  # greedy requests: the screen's, where it is on
    assert 1 <= kept <= 64 if cpu_has_fast_bf16() else kept == 0
