"""One connected trace per request on every path a request can take, exported to a real OTLP receiver.

Each test sends real requests through a real cluster (distilgpt2, dummy weights) whose processes export their
spans to the receiver in this process, and checks them with `connected_trace` (tests/test_tracing.py): one trace
per request, every span's parent in it, every process that worked on the request, that path's phase spans.
Clusters are shared where their flags allow: local prefill, the held-prefix handoff, n > 1 and HTTP on one; shared
memory and a resumption after a decode worker's death on another; aggregated mode on a third. The relayed and the
direct transport are tests/test_tracing.py's.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.tools.client import Completion, channel, complete
from disagg.tools.cluster import Child, Cluster, free_port
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.reliability_helpers import worker_load
from tests.test_tracing import (
    AGGREGATED_RPC,
    DECODE,
    DISAGGREGATED_SPANS,
    GATEWAY,
    GPT2_ARGS,
    ONE_WORKER_SPANS,
    PREFILL_RPC,
    PROMPT,
    SERVICES,
    connected_trace,
)

pytestmark = pytest.mark.cluster

THRESHOLD = 48  # the conditional cluster's --local-prefill-tokens
BLOCK = 16  # the decode worker's prefix-cache block (--prefix-block-tokens' default)
MAX_NEW_TOKENS = 4


def long_prompt(tag: str) -> str:
    """Over THRESHOLD tokens, none of them cached (a new first token): a decode worker with --local-prefill
    declines it, a prefill worker prefills it. (A decode worker keeps what it decoded: the same prompt again would
    be prefilled there.)"""
    return f"{tag}: {PROMPT * 4}"


# A conversation as token ids (any ids of the vocabulary will do): a short first turn, prefilled on the decode
# worker, which keeps prompt + reply; then the next turn with a message too long to prefill there.
TURN1 = list(range(1000, 1012))
REPLY_TOKENS = 24
MESSAGE = list(range(2000, 2080))
DECLINED = [AGGREGATED_RPC, *DISAGGREGATED_SPANS]  # offered to a decode worker first, then disaggregated


@dataclass
class TracedCluster:
    address: str
    cluster: Cluster
    receiver: OtlpReceiver
    http_url: str = ""


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    received = OtlpReceiver().start()
    yield received
    received.stop()


def _traced_cluster(receiver: OtlpReceiver, gateway_args: list[str], **kwargs) -> TracedCluster:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }
    cluster = Cluster(GPT2_ARGS, gateway_args, env=env, **kwargs)
    return TracedCluster(asyncio.run(cluster.start(timeout=300)), cluster, receiver)


@pytest.fixture(scope="module")
def conditional_cluster(receiver) -> Iterator[TracedCluster]:
    """Conditional disaggregation (relayed KV), with the OpenAI HTTP front."""
    http_port = free_port()
    gateway_args = ["--http-port", str(http_port), "--served-model-name", "distilgpt2"]
    running = _traced_cluster(receiver, gateway_args, local_prefill_tokens=THRESHOLD)
    running.http_url = f"http://127.0.0.1:{http_port}/v1"
    yield running
    running.cluster.stop()


@pytest.fixture(scope="module")
def shared_memory_cluster(receiver) -> Iterator[TracedCluster]:
    """Shared-memory KV, two decode workers (one may die: the request resumes on the other)."""
    gateway_args = ["--kv-transport", "shared-memory", "--health-interval-seconds", "0.5"]
    running = _traced_cluster(receiver, gateway_args, decode_workers=2)
    yield running
    running.cluster.stop()


@pytest.fixture(scope="module")
def aggregated_cluster(receiver) -> Iterator[TracedCluster]:
    running = _traced_cluster(receiver, [], aggregated_workers=1)
    yield running
    running.cluster.stop()


async def _complete(address: str, request_id: str, **fields) -> Completion:
    async with channel(address) as ch:
        request = gateway_pb2.GenerateRequest(request_id=request_id, ignore_eos=True, **fields)
        return await complete(gateway_pb2_grpc.GatewayStub(ch), request, timeout=300)


def _named(trace: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in trace if s.name == name]


def _root(trace: list[ReceivedSpan]) -> ReceivedSpan:
    [root] = [s for s in trace if s.service == GATEWAY and s.name.startswith("text_completion")]
    return root


# --- conditional disaggregation: local prefill, then the held-prefix handoff -------------------------------------


@pytest.fixture(scope="module")
def conversation(conditional_cluster) -> tuple[list[ReceivedSpan], list[ReceivedSpan]]:
    """Two turns: the first prefilled on the decode worker, the second (a long new message) declined there and
    handed over without the blocks that worker holds. The two requests' traces."""
    running = conditional_cluster
    first = asyncio.run(_complete(running.address, "path-local", prompt_token_ids=TURN1, max_new_tokens=REPLY_TOKENS))
    assert first.completion_tokens == REPLY_TOKENS
    turn2 = [*TURN1, *first.token_ids, *MESSAGE]
    second = asyncio.run(_complete(running.address, "path-held", prompt_token_ids=turn2, max_new_tokens=MAX_NEW_TOKENS))
    assert second.completion_tokens == MAX_NEW_TOKENS
    local = connected_trace(running.receiver, "path-local", {GATEWAY, DECODE}, ONE_WORKER_SPANS)
    held = connected_trace(running.receiver, "path-held", SERVICES, DECLINED)
    return local, held


def test_local_prefill_is_one_trace_on_the_decode_worker(conversation):
    local, _ = conversation
    root = _root(local)
    assert root.attributes["disagg.local_prefill"] == "local"
    [call] = _named(local, AGGREGATED_RPC)
    assert call.parent_span_id == root.span_id and call.service == DECODE
    phases = [s for s in local if s.name in ONE_WORKER_SPANS[1:]]
    assert {s.parent_span_id for s in phases} == {call.span_id}
    assert _named(local, "prefill.forward")[0].attributes["disagg.prefill.tokens"] == len(TURN1)


def test_held_prefix_handoff_is_one_trace(conversation):
    _, held = conversation
    root = _root(held)
    assert root.attributes["disagg.local_prefill"] == "declined"
    assert root.attributes["disagg.held_prefix"] == "suffix"
    [decline] = _named(held, AGGREGATED_RPC)  # the offer the decode worker declined, under the root too
    assert decline.parent_span_id == root.span_id and decline.service == DECODE
    [transfer] = _named(held, "kv.transfer")
    held_tokens = (len(TURN1) + REPLY_TOKENS - 1) // BLOCK * BLOCK  # full blocks of prompt + reply
    assert transfer.attributes["disagg.kv.held_prefix_tokens"] == held_tokens > 0


# --- conditional disaggregation: n > 1, HTTP -------------------------------------------------------------------


def test_n_samples_are_one_trace_on_either_path(conditional_cluster):
    """n = 2, prefilled remotely (one prefill, its KV forked in the decode batch) and locally (one prompt, two
    sequences in the engine): one trace each, with a decode span per sequence."""
    running = conditional_cluster
    sampling = dict(n=2, max_new_tokens=MAX_NEW_TOKENS, temperature=0.8, seed=3)
    remote = asyncio.run(_complete(running.address, "path-n2-remote", prompt=long_prompt("n2"), **sampling))
    local = asyncio.run(_complete(running.address, "path-n2-local", prompt_token_ids=MESSAGE[:20], **sampling))
    assert remote.completion_tokens == local.completion_tokens == 2 * MAX_NEW_TOKENS
    remote_trace = connected_trace(running.receiver, "path-n2-remote", SERVICES, DECLINED)
    local_trace = connected_trace(running.receiver, "path-n2-local", {GATEWAY, DECODE}, ONE_WORKER_SPANS)
    assert len(_named(remote_trace, PREFILL_RPC)) == len(_named(remote_trace, "prefill.forward")) == 1
    assert len(_named(local_trace, "prefill.forward")) == 1
    for request_id, trace in (("path-n2-remote", remote_trace), ("path-n2-local", local_trace)):
        sequences = sorted(s.attributes["disagg.sequence_id"] for s in _named(trace, "decode"))
        assert sequences == [request_id, f"{request_id}#1"], [s.name for s in trace]


def test_http_requests_are_one_trace_continuing_the_callers(conditional_cluster):
    """Through the OpenAI front (the real SDK): the root continues the caller's `traceparent` header; a streamed
    request without one is a trace of its own."""
    running = conditional_cluster
    trace_id, caller_span = "5bf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b7"
    client = openai.OpenAI(base_url=running.http_url, api_key="unused", max_retries=0, timeout=300)
    whole = client.completions.create(
        model="distilgpt2",
        prompt=long_prompt("http"),
        max_tokens=MAX_NEW_TOKENS,
        extra_body={"ignore_eos": True},
        extra_headers={"traceparent": f"00-{trace_id}-{caller_span}-01"},
    )
    assert whole.usage is not None and whole.usage.completion_tokens == MAX_NEW_TOKENS
    chunks = list(
        client.completions.create(
            model="distilgpt2",
            prompt=long_prompt("http, streamed"),
            max_tokens=MAX_NEW_TOKENS,
            extra_body={"ignore_eos": True},
            stream=True,
        )
    )
    assert chunks
    request_id = whole.id.removeprefix("cmpl-")  # (the gateway's request id)
    trace = connected_trace(running.receiver, request_id, SERVICES, DECLINED, caller_span)
    assert {s.trace_id for s in trace} == {trace_id}
    streamed = connected_trace(running.receiver, chunks[0].id.removeprefix("cmpl-"), SERVICES, DECLINED)
    assert streamed[0].trace_id != trace_id


# --- shared memory; resumption on another decode worker ----------------------------------------------------------


def test_shared_memory_handoff_is_one_trace(shared_memory_cluster):
    running = shared_memory_cluster
    got = asyncio.run(_complete(running.address, "path-shm", prompt=long_prompt("shm"), max_new_tokens=MAX_NEW_TOKENS))
    assert got.completion_tokens == MAX_NEW_TOKENS
    trace = connected_trace(running.receiver, "path-shm", SERVICES, DISAGGREGATED_SPANS)
    [transfer], [serialize] = _named(trace, "kv.transfer"), _named(trace, "kv.serialize")
    assert transfer.attributes["disagg.kv.transport"] == serialize.attributes["disagg.kv.transport"] == "shared-memory"


async def _generate_killing_its_decode_worker(running: TracedCluster, request_id: str, tokens: int) -> Child:
    """A request whose decode worker is killed (SIGKILL) once the client has 4 tokens; returns that worker."""
    killed: Child | None = None
    received = []
    async with channel(running.address) as ch:
        request = gateway_pb2.GenerateRequest(
            request_id=request_id, prompt=long_prompt("resumed"), max_new_tokens=tokens, ignore_eos=True
        )
        async for response in gateway_pb2_grpc.GatewayStub(ch).Generate(request, timeout=300):
            received.extend(response.token_ids)
            if len(received) >= 4 and killed is None:
                for child in running.cluster.decode:
                    if (await worker_load(child.address)).active_sequences > 0:
                        killed = child
                        child.process.send_signal(signal.SIGKILL)
                        break
    assert killed is not None, "no decode worker held the sequence"
    assert len(received) == tokens  # resumed elsewhere, none lost
    killed.process.wait()
    return killed


def test_resumed_request_is_one_trace_with_the_second_decode_worker(shared_memory_cluster):
    """After its decode worker died, the request's trace goes on: the gateway's second prefill (prompt + tokens sent)
    and the surviving decode worker's spans, under the same root. The dead worker's spans died with it."""
    running = shared_memory_cluster
    tokens = 48
    killed = asyncio.run(_generate_killing_its_decode_worker(running, "path-resumed", tokens))
    [survivor] = [c for c in running.cluster.decode if c is not killed]
    trace = connected_trace(running.receiver, "path-resumed", SERVICES, DISAGGREGATED_SPANS)
    assert {s.resource["process.pid"] for s in trace if s.service == DECODE} == {survivor.process.pid}
    prefills = sorted(_named(trace, "prefill.forward"), key=lambda s: s.start_ns)
    assert len(prefills) == len(_named(trace, PREFILL_RPC)) == 2
    first, again = (s.attributes["disagg.prefill.tokens"] for s in prefills)
    assert 4 <= again - first < tokens  # the prompt and the tokens the client already had
    assert _named(trace, "decode")[0].attributes["disagg.decode.tokens"] == tokens - (again - first) - 1


# --- aggregated mode -------------------------------------------------------------------------------------------


def test_aggregated_request_is_one_trace(aggregated_cluster):
    running = aggregated_cluster
    got = asyncio.run(
        _complete(running.address, "path-aggregated", prompt=long_prompt("aggregated"), max_new_tokens=MAX_NEW_TOKENS)
    )
    assert got.completion_tokens == MAX_NEW_TOKENS
    trace = connected_trace(running.receiver, "path-aggregated", {GATEWAY, DECODE}, ONE_WORKER_SPANS)
    root = _root(trace)
    assert "disagg.local_prefill" not in root.attributes
    [call] = _named(trace, AGGREGATED_RPC)
    assert call.parent_span_id == root.span_id
    assert _named(trace, "decode")[0].attributes["disagg.decode.tokens"] == MAX_NEW_TOKENS - 1
