"""A handoff that leaves out the KV blocks its decode worker already holds (disagg/kv/held_prefix.py).

In process: the prefix cache's held-prefix count, exact pinning by keys and the join of held blocks with a received
suffix; the sender's and the receiver's checks (INVALID_ARGUMENT for a bad request, DATA_LOSS for blocks that are
not there or keys that are not the sequence's).

Through clusters (decode worker `--local-prefill`, gateway `--local-prefill-tokens 48`), for each KV transport: a
conversation's first turn is prefilled on the decode worker, its second turn (a long new message) is declined there
and prefilled remotely, and the prefill worker sends only the KV after the blocks the decode worker holds; the
output is generate()'s and the bytes received are the suffix's. With a decode worker that declines naming blocks it
does not hold (a block evicted between the decline and the handoff), the handoff is refused with DATA_LOSS at
admission and the gateway hands the sequence over again, whole: same tokens, no error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
import torch

from disagg.errors import InvalidRequest, KvIntegrityError
from disagg.kv.held_prefix import pin_held_prefix, set_skipped, skipped_prefix
from disagg.kv.prefix_cache import PrefixCache, block_keys
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2
from disagg.tools.client import channel, complete
from disagg.tools.cluster import free_port, spawn, stop, wait_healthy
from tests.conftest import GPT2_ARGS, RunningCluster, start_cluster
from tests.test_aggregated import reference
from tests.test_batching import wait_until
from tests.test_metrics import scrape

BLOCK = 16
THRESHOLD = 48
FINGERPRINT = "test-model"


def _kv(tokens: int, layers: int = 2, heads: int = 3, head_dim: int = 4, offset: float = 0.0):
    """Distinct values per (layer, kind, position): a misplaced block shows."""
    position = torch.arange(tokens, dtype=torch.float32).view(1, 1, tokens, 1) + offset
    return [
        tuple((position + 1000 * layer + 100 * kind).expand(1, heads, tokens, head_dim).contiguous() for kind in (0, 1))
        for layer in range(layers)
    ]


def test_held_prefix_pins_exact_blocks_and_joins_a_suffix():
    cache = PrefixCache(FINGERPRINT, 1 << 20, BLOCK)
    tokens = list(range(100, 150))  # 50 tokens: 3 full blocks
    whole = _kv(len(tokens))
    cache.insert(tokens, whole)
    assert cache.held_prefix(tokens) == 3 * BLOCK
    assert cache.held_prefix(tokens[:48]) == 2 * BLOCK  # all 48 held: the last block's KV travels anyway
    assert cache.held_prefix([1, *tokens[1:]]) == 0
    keys = block_keys(tokens, FINGERPRINT, BLOCK)[:2]
    hit = cache.pin_blocks(tokens, keys)
    assert hit is not None and hit.tokens == 2 * BLOCK and cache.pinned_blocks == 2
    assert cache.clear() == 1  # the pinned two stay
    joined = hit.joined([(k[:, :, 2 * BLOCK :], v[:, :, 2 * BLOCK :]) for k, v in whole])
    for (jk, jv), (k, v) in zip(joined, whole):
        assert torch.equal(jk, k) and torch.equal(jv, v)
    cache.release(hit)
    assert cache.pin_blocks(tokens, block_keys(tokens, FINGERPRINT, BLOCK)) is None  # the third was dropped


def test_sender_and_receiver_check_the_left_out_prefix():
    tokens = list(range(40))
    ask = worker_pb2.KvDestination(prefix_tokens=32, prefix_block_tokens=BLOCK)
    skipped = skipped_prefix(ask, tokens, FINGERPRINT)
    assert skipped.tokens == 32 and list(skipped.keys) == block_keys(tokens, FINGERPRINT, BLOCK)[:2]
    assert skipped_prefix(worker_pb2.KvDestination(), tokens, FINGERPRINT).tokens == 0
    for tokens_asked, block, message in ((20, BLOCK, "whole number"), (40, 8, "leaves nothing"), (16, 0, "whole")):
        with pytest.raises(InvalidRequest, match=message):
            skipped_prefix(worker_pb2.KvDestination(prefix_tokens=tokens_asked, prefix_block_tokens=block), tokens, "f")

    start = worker_pb2.SequenceStart(prompt_token_ids=tokens)
    set_skipped(start.kv_layout, skipped)
    cache = PrefixCache(FINGERPRINT, 1 << 20, BLOCK)
    with pytest.raises(KvIntegrityError, match="no longer holds"):
        pin_held_prefix(cache, start)
    with pytest.raises(KvIntegrityError, match="keeps no prefix cache"):
        pin_held_prefix(None, start)
    cache.insert(tokens, _kv(len(tokens)))
    hit = pin_held_prefix(cache, start)
    assert hit is not None and hit.tokens == 32
    other = worker_pb2.SequenceStart(prompt_token_ids=[7, *tokens[1:]])  # other tokens, the same keys claimed
    set_skipped(other.kv_layout, skipped)
    with pytest.raises(KvIntegrityError, match="not those of the sequence's tokens"):
        pin_held_prefix(cache, other)
    assert pin_held_prefix(cache, worker_pb2.SequenceStart(prompt_token_ids=tokens)) is None  # nothing left out


# --- through clusters --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["relayed", "shared-memory", "direct"])
def held_cluster(request) -> Iterator[RunningCluster]:
    running = start_cluster(GPT2_ARGS, ["--kv-transport", request.param], local_prefill_tokens=THRESHOLD)
    yield running
    running.cluster.stop()


def _sample(metrics_address: str, name: str, **labels: str) -> float:
    return scrape(metrics_address).get((name, frozenset(labels.items())), 0.0)


def _kv_bytes(lm, tokens: int) -> int:
    layers, heads, head_dim = lm.kv_shape()
    return 2 * layers * heads * head_dim * tokens * lm.dtype.itemsize


def _conversation(lm) -> tuple[list[int], str]:
    turn1 = lm.tokenizer.encode("User: hold my history, decode worker.\nAssistant:")
    long_message = " ".join(["a long new message the decode worker will not prefill itself"] * 8)
    return turn1, "\nUser: " + long_message + "\nAssistant:"


async def test_second_turn_hands_over_only_what_the_decode_worker_lacks(held_cluster, gpt2_model):
    lm, running = gpt2_model, held_cluster
    [decode] = running.cluster.decode
    gateway = running.cluster.gateway
    assert gateway is not None
    turn1, message = _conversation(lm)
    async with channel(running.address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        request = gateway_pb2.GenerateRequest(prompt_token_ids=turn1, max_new_tokens=40, ignore_eos=True)
        first = await complete(stub, request, 300)  # short: prefilled on the decode worker, which keeps it
        assert first.token_ids == reference(lm, turn1, 40)
        turn2 = [*turn1, *first.token_ids, *lm.tokenizer.encode(message)]
        held = (len(turn1) + 40 - 1) // BLOCK * BLOCK  # every full block of prompt + reply (not the newest token)
        assert len(turn2) - held > THRESHOLD  # too much new: declined, prefilled remotely
        received = _sample(decode.metrics_address, "disagg_kv_transferred_bytes_total")
        request = gateway_pb2.GenerateRequest(prompt_token_ids=turn2, max_new_tokens=8, ignore_eos=True)
        second = await complete(stub, request, 300)
    assert second.token_ids == reference(lm, turn2, 8)
    assert _sample(gateway.metrics_address, "disagg_held_prefix_handoffs_total", outcome="suffix") == 1
    wait_until(lambda: _sample(decode.metrics_address, "disagg_kv_held_prefix_tokens_total") == held)
    sent = _sample(decode.metrics_address, "disagg_kv_transferred_bytes_total") - received
    assert sent == _kv_bytes(lm, len(turn2) - held)  # only the suffix travelled


# A decode worker that declines naming blocks it does not hold: the gateway sees what it would see had the worker
# evicted them between its decline and the handoff. A real gRPC server in front of the real decode worker that
# forwards every call byte for byte, except AggregatedService/Generate, which it answers with that decline.

GENERATE = "/disagg.v1.AggregatedService/Generate"


class _LyingDecline(grpc.GenericRpcHandler):
    def __init__(self, upstream: str, held_tokens: int):
        self.channel = grpc.insecure_channel(upstream)
        self.held_tokens = held_tokens

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        if method == GENERATE:
            return grpc.unary_stream_rpc_method_handler(
                self._decline,
                request_deserializer=worker_pb2.AggregatedServiceGenerateRequest.FromString,
                response_serializer=worker_pb2.AggregatedServiceGenerateResponse.SerializeToString,
            )
        upstream = self.channel.stream_stream(method)

        def forward(requests, context: grpc.ServicerContext):
            call = upstream(requests, metadata=context.invocation_metadata(), timeout=context.time_remaining())
            context.send_initial_metadata(call.initial_metadata())
            try:
                yield from call
            except grpc.RpcError as error:
                context.abort(error.code(), error.details())

        return grpc.stream_stream_rpc_method_handler(forward)

    def _decline(self, request, context):
        tokens = len(request.request.prompt_token_ids)
        declined = worker_pb2.LocalPrefillDeclined(
            prompt_tokens=tokens, uncached_tokens=tokens, held_prefix_tokens=self.held_tokens, block_tokens=BLOCK
        )
        yield worker_pb2.AggregatedServiceGenerateResponse(declined=declined)


@pytest.fixture(scope="module")
def lying_cluster() -> Iterator[tuple[RunningCluster, str, str]]:
    running = start_cluster(GPT2_ARGS, local_prefill_tokens=THRESHOLD)
    [prefill], [decode] = running.cluster.prefill, running.cluster.decode
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    port = free_port()
    server.add_generic_rpc_handlers((_LyingDecline(decode.address, held_tokens=2 * BLOCK),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    argv = [
        "gateway",
        *("--prefill", prefill.address, "--decode", f"127.0.0.1:{port}"),
        *("--local-prefill-tokens", str(THRESHOLD)),
    ]
    gateway = spawn("gateway-lied-to", argv, free_port(), metrics_port=free_port())
    try:
        asyncio.run(wait_healthy([gateway], 120))
        yield running, gateway.metrics_address, gateway.address
    finally:
        stop([gateway])
        server.stop(0)
        running.cluster.stop()


async def test_blocks_gone_at_handoff_mean_a_whole_handoff_not_an_error(lying_cluster, gpt2_model):
    running, metrics_address, address = lying_cluster
    lm = gpt2_model
    prompt = lm.tokenizer.encode(" ".join(["the decode worker said it held these blocks"] * 6))
    async with channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        request = gateway_pb2.GenerateRequest(prompt_token_ids=prompt, max_new_tokens=8, ignore_eos=True)
        result = await complete(stub, request, 300)
    assert result.token_ids == reference(lm, prompt, 8)
    assert _sample(metrics_address, "disagg_held_prefix_handoffs_total", outcome="gone") == 1
    assert _sample(metrics_address, "disagg_held_prefix_handoffs_total", outcome="suffix") == 0
    [decode] = running.cluster.decode
    assert _sample(decode.metrics_address, "disagg_kv_held_prefix_tokens_total") == 0
