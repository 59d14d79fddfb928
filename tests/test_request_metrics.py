"""Each request's phases, returned to its client: the gRPC `GenerateResponse.metrics`, the HTTP headers and the
final SSE chunk (real `openai` SDK), `disagg generate`; on every path: remote prefill over each KV transport,
local prefill on the decode worker, an aggregated worker, n > 1, and a request resumed after its decode worker died.

One cluster for the module (1 prefill worker, 2 decode workers with --local-prefill, a conditional gateway) and
extra gateways over the same workers for the other paths: no extra model loads.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from disagg.engine.decode import DecodeSequence
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2
from disagg.rpc.convert import add_decode_phases, metrics_to_dict
from disagg.telemetry.decode import decode_times
from disagg.tools.client import channel, complete
from disagg.tools.cluster import Child, free_port, stop
from gateway import openai_responses as bodies
from tests.conftest import GPT2_ARGS, HttpGateway, RunningCluster, start_cluster, start_http_gateway
from tests.reliability_helpers import start_extra, worker_load

LOCAL_PREFILL_TOKENS = 64  # the module gateway prefills prompts up to this many tokens on a decode worker
SHORT, LONG = 24, 100  # prompt tokens: local on the module gateway / remote everywhere
NEW_TOKENS = 8
FIELDS = [f.name for f in gateway_pb2.RequestMetrics.DESCRIPTOR.fields]


def kv_bytes(tokens: int) -> int:
    """distilgpt2's float32 KV cache for `tokens` tokens: layers * (K, V) * kv_heads * head_dim * tokens * 4."""
    return 6 * 2 * 12 * 64 * tokens * 4


def prompt_ids(tokens: int, seed: int) -> list[int]:
    """Token ids nobody sent before (each test its own seed): no prefix cache holds them."""
    rng = random.Random(seed)
    return [rng.randrange(1000, 50000) for _ in range(tokens)]


@dataclass
class Gateways:
    running: RunningCluster
    http: HttpGateway  # shared memory, every prompt remote, also HTTP
    direct: Child
    aggregated: Child  # --aggregated over decode worker 0 (its AggregatedService, as --local-prefill serves it)

    @property
    def conditional(self) -> str:  # the cluster's: relayed, local prefill up to LOCAL_PREFILL_TOKENS
        return self.running.address

    @property
    def decode_addresses(self) -> set[str]:
        return {c.address for c in self.running.cluster.decode}


@pytest.fixture(scope="module")
def metrics_cluster() -> Iterator[Gateways]:
    running = start_cluster(
        GPT2_ARGS,
        ["--health-interval-seconds", "0.5"],
        decode_workers=2,
        local_prefill_tokens=LOCAL_PREFILL_TOKENS,
    )
    extra: list[Child] = []
    try:
        cluster = running.cluster
        workers = ["--prefill", cluster.prefill[0].address, "--decode", ",".join(c.address for c in cluster.decode)]
        http = start_http_gateway(running, "distilgpt2", "--kv-transport", "shared-memory")
        extra.append(http.child)
        direct = asyncio.run(
            start_extra("gateway-direct", ["gateway", *workers, "--kv-transport", "direct"], free_port())
        )
        extra.append(direct)
        aggregated_command = ["gateway", "--aggregated", cluster.decode[0].address]
        aggregated = asyncio.run(start_extra("gateway-aggregated", aggregated_command, free_port()))
        extra.append(aggregated)
        yield Gateways(running, http, direct, aggregated)
    finally:
        stop(extra)
        running.cluster.stop()


async def generate(address: str, **fields) -> gateway_pb2.GenerateResponse:
    """The request's last message (the one with usage and metrics)."""
    async with channel(address) as ch:
        responses = [r async for r in gateway_pb2_grpc.GatewayStub(ch).Generate(gateway_pb2.GenerateRequest(**fields))]
    assert [r.HasField("metrics") for r in responses].count(True) == 1
    last = responses[-1]
    assert last.HasField("metrics") and last.HasField("usage")
    return last


def assert_remote(m: gateway_pb2.RequestMetrics, gateways: Gateways, transport: str, prompt_tokens: int) -> None:
    assert m.prefill_location == gateway_pb2.PREFILL_LOCATION_REMOTE
    assert m.prefill_worker == gateways.running.cluster.prefill[0].address
    assert m.decode_worker in gateways.decode_addresses
    assert m.prefill_tokens == prompt_tokens and m.prefill_batch_size >= 1
    assert m.kv_transport == transport and m.kv_bytes == kv_bytes(prompt_tokens) and m.kv_held_prefix_tokens == 0
    assert m.prefill_ms > 0 and m.kv_transfer_ms > 0 and m.decode_ms > 0
    assert_decoded(m, NEW_TOKENS - 1)


def assert_decoded(m: gateway_pb2.RequestMetrics, tokens: int, sequences: int = 1) -> None:
    """`tokens` tokens of each of `sequences` sequences came from decode steps (the first from the prefill)."""
    assert m.decode_steps == tokens and m.decode_tokens == sequences * tokens
    assert m.decode_tokens_per_second == pytest.approx(m.decode_tokens / (m.decode_ms / 1e3))
    assert m.prefill_queue_ms >= 0 and m.decode_queue_ms >= 0 and m.kv_load_ms >= 0
    # the phases follow each other inside the request: the gateway's time covers them
    assert m.total_ms > m.prefill_ms + m.decode_ms
    assert m.attempts == 1


# --- remote prefill, every transport ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["relayed", "shared-memory", "direct"])
async def test_remote_prefill_reports_its_worker_the_kv_bytes_of_the_prompt_and_the_decode_loop(
    metrics_cluster, transport
):
    address = {
        "relayed": metrics_cluster.conditional,  # (a prompt over LOCAL_PREFILL_TOKENS: declined, remote)
        "shared-memory": metrics_cluster.http.grpc_address,
        "direct": metrics_cluster.direct.address,
    }[transport]
    seed = ["relayed", "shared-memory", "direct"].index(transport)
    last = await generate(address, prompt_token_ids=prompt_ids(LONG, seed), max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert_remote(last.metrics, metrics_cluster, transport, LONG)
    assert last.metrics.prefill_cached_tokens == last.usage.cached_prompt_tokens == 0


async def test_n_sequences_share_one_prefill_and_one_handoff(metrics_cluster):
    last = await generate(
        metrics_cluster.http.grpc_address,
        prompt_token_ids=prompt_ids(LONG, 7),
        max_new_tokens=NEW_TOKENS,
        ignore_eos=True,
        n=3,
        temperature=1.0,
        seed=1,
    )
    m = last.metrics
    assert m.prefill_tokens == LONG and m.kv_bytes == kv_bytes(LONG)  # the KV once, for all three
    assert_decoded(m, NEW_TOKENS - 1, sequences=3)
    assert last.usage.completion_tokens == 3 * NEW_TOKENS


# --- no handoff: local prefill, aggregated worker ---------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2])
async def test_local_prefill_reports_the_decode_worker_and_no_kv_transfer(metrics_cluster, n):
    last = await generate(
        metrics_cluster.conditional,
        prompt_token_ids=prompt_ids(SHORT, 100 + n),
        max_new_tokens=NEW_TOKENS,
        ignore_eos=True,
        n=n,
        temperature=1.0 if n > 1 else 0.0,
    )
    m = last.metrics
    assert m.prefill_location == gateway_pb2.PREFILL_LOCATION_LOCAL
    assert m.prefill_worker == m.decode_worker and m.decode_worker in metrics_cluster.decode_addresses
    assert m.prefill_tokens == SHORT and m.prefill_ms > 0
    assert (m.kv_transport, m.kv_bytes, m.kv_transfer_ms) == ("", 0, 0)
    assert_decoded(m, NEW_TOKENS - 1, sequences=n)


async def test_aggregated_worker_reports_itself_and_no_kv_transfer(metrics_cluster):
    last = await generate(
        metrics_cluster.aggregated.address,
        prompt_token_ids=prompt_ids(LONG, 11),
        max_new_tokens=NEW_TOKENS,
        ignore_eos=True,
    )
    m = last.metrics
    assert m.prefill_location == gateway_pb2.PREFILL_LOCATION_AGGREGATED
    assert m.prefill_worker == m.decode_worker == metrics_cluster.running.cluster.decode[0].address
    assert m.prefill_tokens == LONG and m.prefill_ms > 0
    assert (m.kv_transport, m.kv_bytes, m.kv_transfer_ms) == ("", 0, 0)
    assert_decoded(m, NEW_TOKENS - 1)


async def test_a_request_that_ends_at_its_first_token_has_no_decode_phase(metrics_cluster):
    last = await generate(metrics_cluster.http.grpc_address, prompt_token_ids=prompt_ids(LONG, 13), max_new_tokens=1)
    m = last.metrics
    assert m.prefill_location == gateway_pb2.PREFILL_LOCATION_REMOTE and m.prefill_ms > 0
    assert (m.decode_worker, m.kv_bytes, m.decode_steps, m.decode_tokens, m.decode_ms) == ("", 0, 0, 0, 0)


async def test_a_handoff_that_leaves_out_the_blocks_the_decode_worker_holds_reports_them(metrics_cluster):
    turn1 = prompt_ids(40, 29)  # short: prefilled on a decode worker, which keeps prompt + reply in its cache
    async with channel(metrics_cluster.conditional) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        request = gateway_pb2.GenerateRequest(prompt_token_ids=turn1, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        first = await complete(stub, request, 120)
        turn2 = [*turn1, *first.token_ids, *prompt_ids(LONG, 31)]  # too much new: declined, prefilled remotely
        request = gateway_pb2.GenerateRequest(prompt_token_ids=turn2, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        second = await complete(stub, request, 120)
    assert first.metrics is not None and second.metrics is not None
    assert first.metrics.prefill_location == gateway_pb2.PREFILL_LOCATION_LOCAL
    m = second.metrics
    held = (len(turn1) + NEW_TOKENS - 1) // 16 * 16  # every full block of prompt + reply (not the newest token)
    assert m.prefill_location == gateway_pb2.PREFILL_LOCATION_REMOTE and m.prefill_tokens == len(turn2)
    assert m.decode_worker == first.metrics.decode_worker  # back to the worker that holds the history
    assert m.kv_held_prefix_tokens == held and m.kv_bytes == kv_bytes(len(turn2) - held)  # only the rest travelled
    assert_decoded(m, NEW_TOKENS - 1)


# --- the HTTP front: headers, body, final SSE chunk -------------------------------------------------------------


def http_client(gw: HttpGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=60)


async def test_http_headers_and_body_carry_the_grpc_fields_for_the_same_prompt(metrics_cluster):
    gw, ids = metrics_cluster.http, prompt_ids(40, 17)
    over_grpc = (
        await generate(gw.grpc_address, prompt_token_ids=ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    ).metrics
    raw = await asyncio.to_thread(
        http_client(gw).completions.with_raw_response.create,
        model="distilgpt2",
        prompt=ids,
        max_tokens=NEW_TOKENS,
        extra_body={"ignore_eos": True},
    )
    body = raw.parse().model_extra[bodies.METRICS_KEY]
    headers = {k: v for k, v in raw.headers.items() if k.startswith(bodies.METRICS_HEADER_PREFIX)}
    # one header per field, the body's numbers
    assert headers == {bodies.METRICS_HEADER_PREFIX + name.replace("_", "-"): str(body[name]) for name in FIELDS}
    assert float(headers["x-disagg-prefill-ms"]) > 0 and int(headers["x-disagg-kv-bytes"]) == kv_bytes(40)
    # the same fields as the gRPC message, and the same values wherever they do not depend on timing
    grpc_dict = metrics_to_dict(over_grpc)
    assert list(body) == list(grpc_dict) == FIELDS
    steady = ["prefill_location", "prefill_worker", "prefill_tokens", "kv_transport", "kv_bytes"]
    steady += ["kv_held_prefix_tokens", "decode_steps", "decode_tokens", "attempts"]
    assert {k: body[k] for k in steady} == {k: grpc_dict[k] for k in steady}
    assert body["decode_worker"] in metrics_cluster.decode_addresses
    assert body["prefill_location"] == "remote" and body["kv_transport"] == "shared-memory"
    # the gRPC request left the prompt's whole blocks in the prefill worker's cache: the HTTP one found them
    assert (grpc_dict["prefill_cached_tokens"], body["prefill_cached_tokens"]) == (0, 32)
    assert raw.parse().usage.prompt_tokens_details.cached_tokens == 32


@pytest.mark.parametrize("include_usage", [True, False])
async def test_final_sse_chunk_carries_the_metrics(metrics_cluster, include_usage):
    gw, ids = metrics_cluster.http, prompt_ids(40, 19 + include_usage)

    def chunks() -> list:
        options = {"stream_options": {"include_usage": True}} if include_usage else {}
        stream = http_client(gw).completions.create(
            model="distilgpt2",
            prompt=ids,
            max_tokens=NEW_TOKENS,
            stream=True,
            extra_body={"ignore_eos": True},
            **options,
        )
        return list(stream)

    received = await asyncio.to_thread(chunks)
    carrying = [i for i, c in enumerate(received) if c.model_extra and bodies.METRICS_KEY in c.model_extra]
    assert carrying == [len(received) - 1]  # the last chunk only
    last = received[-1]
    if include_usage:
        assert last.choices == [] and last.usage.completion_tokens == NEW_TOKENS
    else:
        assert last.choices[0].finish_reason == "length"
    metrics = last.model_extra[bodies.METRICS_KEY]
    assert list(metrics) == FIELDS
    assert metrics["kv_bytes"] == kv_bytes(40) and metrics["decode_tokens"] == NEW_TOKENS - 1
    assert metrics["prefill_ms"] > 0 and metrics["decode_ms"] > 0 and metrics["total_ms"] > 0


# --- disagg generate --------------------------------------------------------------------------------------------


def run_generate(address: str, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "disagg", "generate", "--address", address, "--max-new-tokens", str(NEW_TOKENS)]
    out = subprocess.run(
        [*command, "--ignore-eos", *flags, "Why does batching help? " * 4], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out


async def test_disagg_generate_prints_the_phases_and_json_for_scripts(metrics_cluster):
    address = metrics_cluster.http.grpc_address  # as `disagg up` runs by default: shared memory, every prompt remote
    human = await asyncio.to_thread(run_generate, address)
    assert human.stdout.strip()
    *_, phases, summary = human.stderr.strip().splitlines()
    assert f"{NEW_TOKENS} tokens" in summary and "time to first token" in summary
    number = r"\d+(?:\.\d+)?"
    assert re.search(rf"prefill remote on 127\.0\.0\.1:\d+: \d+ tokens .*forward {number} ms", phases), phases
    assert re.search(rf"KV \d+ bytes shared-memory in {number} ms", phases), phases
    assert re.search(rf"{NEW_TOKENS - 1} tokens in {number} ms \({number} tokens/s\)", phases), phases

    machine = await asyncio.to_thread(run_generate, address, "--json")
    record = json.loads(machine.stdout)  # the whole of stdout: one object
    metrics, usage = record["metrics"], record["usage"]
    assert record["text"] and record["finish_reason"] == "length" and usage["completion_tokens"] == NEW_TOKENS
    assert list(metrics) == FIELDS and metrics["prefill_location"] == "remote"
    assert metrics["prefill_tokens"] == usage["prompt_tokens"] and metrics["kv_bytes"] == kv_bytes(
        usage["prompt_tokens"]
    )
    assert metrics["prefill_ms"] > 0 and metrics["kv_transfer_ms"] > 0 and metrics["decode_ms"] > 0
    assert record["client"]["total_ms"] >= metrics["total_ms"]  # the client's wait includes the gateway's


# --- pure parts (no processes) ----------------------------------------------------------------------------------


def test_decode_times_of_n_sequences_count_together():
    def seq(enqueued, admitted, loaded, last, steps):
        stamps = dict(admitted_at=admitted, kv_loaded_at=loaded, last_token_at=last, batch_sizes=[4] * steps)
        return DecodeSequence("r", [1, 2], None, None, print, enqueued_at=enqueued, **stamps)

    times = decode_times([seq(1.0, 1.5, 1.75, 3.0, 6), seq(1.25, 2.0, 2.5, 4.0, 4)], now=9.0)
    assert (times.queue_seconds, times.kv_load_seconds, times.decode_seconds) == (1.0, 0.5, 1.5)
    assert (times.steps, times.tokens) == (6, 10)
    never = decode_times([seq(1.0, 0.0, 0.0, 0.0, 0)], now=9.0)  # cancelled before it joined the batch
    assert (never.queue_seconds, never.kv_load_seconds, never.decode_seconds, never.tokens) == (0, 0, 0, 0)


def test_metrics_as_json_and_headers():
    metrics = gateway_pb2.RequestMetrics(prefill_location=gateway_pb2.PREFILL_LOCATION_LOCAL, prefill_ms=12.3456789)
    add_decode_phases(metrics, "w:1", worker_pb2.DecodePhases(decode_seconds=0.5, steps=10, tokens=20))
    as_dict = metrics_to_dict(metrics)
    assert list(as_dict) == FIELDS
    assert (as_dict["prefill_location"], as_dict["prefill_ms"], as_dict["decode_ms"]) == ("local", 12.346, 500.0)
    assert as_dict["decode_tokens_per_second"] == 40.0 and as_dict["decode_worker"] == "w:1"
    headers = bodies.metrics_headers(as_dict)
    assert headers["x-disagg-prefill-ms"] == "12.346" and headers["x-disagg-prefill-location"] == "local"


# --- resumption (last: it kills a decode worker) ----------------------------------------------------------------


async def test_resumed_request_reports_the_attempt_that_finished_it(metrics_cluster):
    total = 48
    ids = prompt_ids(LONG, 23)
    tokens, killed, last = 0, None, None
    async with channel(metrics_cluster.conditional) as ch:
        request = gateway_pb2.GenerateRequest(prompt_token_ids=ids, max_new_tokens=total, ignore_eos=True)
        async for response in gateway_pb2_grpc.GatewayStub(ch).Generate(request, timeout=300):
            tokens += len(response.token_ids)
            if tokens >= 8 and killed is None:
                for child in metrics_cluster.running.cluster.decode:
                    if (await worker_load(child.address)).active_sequences > 0:
                        killed = child
                        child.process.send_signal(signal.SIGKILL)
            last = response
    assert killed is not None and last is not None and tokens == total
    m = last.metrics
    assert m.attempts == 2
    assert m.decode_worker in metrics_cluster.decode_addresses - {killed.address}
    # the second prefill took the prompt and the tokens already sent; it made one more, the decode loop the rest
    assert m.prefill_tokens > LONG and m.prefill_tokens + 1 + m.decode_tokens == LONG + total
    assert m.kv_bytes == kv_bytes(m.prefill_tokens) and m.kv_transport == "relayed"
