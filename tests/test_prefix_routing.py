"""KV-aware routing at the gateway (gateway.prefix_routing), in process: no workers, channels never dialled."""

from __future__ import annotations

from typing import Any

from disagg.config import GatewayConfig, add_flags, gateway_config
from disagg.kv.prefix_cache import block_keys
from disagg.pb.disagg.v1 import gateway_pb2, worker_pb2
from disagg.rpc.services import RelayDecodeStub, RelayPrefillStub
from gateway.prefix_routing import PrefixIndex, PrefixRouter, RoutingOptions, cut_points, text_keys, token_keys
from gateway.servicer import GatewayServicer
from gateway.worker_pool import LoadReading, WorkerPool

A, B, C = "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"
FINGERPRINT = "gpt2-test-fingerprint"
SYSTEM = "You are a careful assistant. " * 40  # ~1,160 bytes shared by every conversation below


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _router(n: int = 2, **options: Any) -> PrefixRouter:
    addresses = tuple(f"127.0.0.1:{i + 1}" for i in range(n))
    pool: WorkerPool[RelayPrefillStub] = WorkerPool("prefill", addresses, RelayPrefillStub, clock=Clock())
    return PrefixRouter(pool, RoutingOptions(**options))


def _load(router: PrefixRouter, address: str, active: int) -> None:
    worker = router.pool.workers[address]
    router.pool.record_load(worker, LoadReading(router.pool.now(), worker.started, active_sequences=active))


def _request(prompt: str) -> worker_pb2.PrefillRequest:
    return worker_pb2.PrefillRequest(request_id="r", prompt=prompt)


def _serve(router: PrefixRouter, address: str, prompt: str) -> None:
    """What the disaggregated attempt does after the worker's SequenceStart (token ids: one per 4 bytes, as a
    tokenizer would)."""
    raw = prompt.encode()
    start = worker_pb2.SequenceStart(prompt_token_ids=[sum(raw[i : i + 4]) for i in range(0, len(raw), 4)])
    start.kv_layout.model_fingerprint = FINGERPRINT
    router.record(router.pool.workers[address], _request(prompt), start)


def test_cut_points_and_keys_are_prefix_stable() -> None:
    assert cut_points(63) == []
    assert cut_points(3000) == [64, 128, 256, 512, 1024, 2048]
    short, long = text_keys(b"x" * 700), text_keys(b"x" * 700 + b"y" * 2000)
    assert short.cuts == long.cuts[:4]  # same beginning, same keys (the hash is not salted per process)
    assert text_keys(b"y" * 700).cuts[0][1] != short.cuts[0][1]
    tokens = list(range(40))
    assert [k for _, k in token_keys(tokens, FINGERPRINT).cuts] == block_keys(tokens, FINGERPRINT)
    assert [n for n, _ in token_keys(tokens, FINGERPRINT).cuts] == [16, 32]


async def test_shared_long_prefix_goes_to_the_worker_that_served_it() -> None:
    router = _router(3)
    _serve(router, B, SYSTEM + "user: what is a KV cache?")
    _load(router, A, 0)
    _load(router, B, 2)  # busier, but holds the prefix: 4 x (little uncached) + 2 < 4 x 1 + 0
    _load(router, C, 0)
    assert router.pick(_request(SYSTEM + "user: and a prefix cache?")).address == B
    assert router.pick(_request(SYSTEM)).address == B  # a prompt equal to the cached prefix
    assert router.pick(_request(SYSTEM + "x"), exclude=frozenset({B})).address == A  # exclude still wins
    await router.pool.close()


async def test_new_prompt_goes_least_loaded() -> None:
    router = _router(3)
    _serve(router, A, SYSTEM)
    _load(router, A, 1)
    _load(router, B, 2)
    _load(router, C, 0)
    assert router.pick(_request("a prompt nobody has seen, long enough to have cuts " * 4)).address == C
    assert router.pick(_request("short")).address == C  # under 64 bytes: no keys, pure load
    await router.pool.close()


async def test_weight_bounds_how_much_busier_a_cached_worker_may_be() -> None:
    router = _router(2, weight=4.0, balance_abs_threshold=100.0)
    _serve(router, A, SYSTEM)
    _load(router, B, 0)
    _load(router, A, 3)
    assert router.pick(_request(SYSTEM + "?")).address == A
    _load(router, A, 5)  # 5 + ~0 > 4 x 1 + 0: not worth the queue
    assert router.pick(_request(SYSTEM + "?")).address == B
    await router.pool.close()


async def test_imbalance_guard_overrides_the_cache() -> None:
    router = _router(2, weight=100.0, balance_abs_threshold=8.0, balance_rel_threshold=1.5)
    _serve(router, A, SYSTEM)
    _load(router, A, 8)
    _load(router, B, 1)  # 8 - 1 = 7 <= 8: balanced enough, the (heavy) cache weight wins
    assert router.pick(_request(SYSTEM + "?")).address == A
    _load(router, A, 10)  # 10 - 1 > 8 and 10 > 1.5 x 1: least loaded
    assert router.pick(_request(SYSTEM + "?")).address == B
    _load(router, B, 9)  # 10 - 9 small: the cache again
    assert router.pick(_request(SYSTEM + "?")).address == A
    await router.pool.close()


async def test_disabled_or_single_worker_is_least_loaded() -> None:
    router = _router(2, enabled=False)
    _serve(router, A, SYSTEM)  # not recorded when off
    assert len(router.index) == 0
    _load(router, A, 1)
    _load(router, B, 0)
    assert router.pick(_request(SYSTEM)).address == B
    await router.pool.close()
    single = _router(1)
    assert single.pick(_request(SYSTEM)).address == A
    await single.pool.close()


async def test_resumed_request_routes_by_token_keys() -> None:
    router = _router(2)
    _serve(router, B, SYSTEM)
    _load(router, A, 0)
    _load(router, B, 1)
    raw = SYSTEM.encode()
    tokens = [sum(raw[i : i + 4]) for i in range(0, len(raw), 4)]
    resumed = worker_pb2.PrefillRequest(prompt_token_ids=tokens, generated_token_ids=[1, 2])
    assert router.pick(resumed).address == B
    await router.pool.close()


def test_lru_bound_is_respected_and_evicts_oldest_first() -> None:
    index = PrefixIndex(max_entries=5)
    index.record(A, [b"a1", b"a2", b"a3"])
    index.record(B, [b"b1", b"b2", b"b3"])
    assert len(index) == 5 and index.evictions == 1
    assert index.keys_of(A) == 2  # the oldest of A's keys went (its tail: a prompt's head is kept longest)
    for i in range(1000):
        index.record(C, [f"c{i}".encode()])
    assert len(index) == 5 and index.keys_of(A) == index.keys_of(B) == 0 and index.keys_of(C) == 5


def test_lru_refreshes_keys_on_lookup() -> None:
    router_index = PrefixIndex(max_entries=8)
    hot, cold = text_keys(b"h" * 128), text_keys(b"c" * 128)  # 2 keys each
    router_index.record(A, [k for _, k in hot.cuts])
    router_index.record(B, [k for _, k in cold.cuts])
    assert router_index.matched(hot) == {A: 128}
    router_index.record(C, [b"1", b"2", b"3", b"4", b"5"])  # 9 keys: the least recently used (cold) goes
    assert router_index.matched(hot) == {A: 128}
    assert router_index.matched(cold) == {B: 64}


async def test_a_worker_marked_down_or_gone_from_dns_drops_its_entries() -> None:
    names = {"p.test:1": ["10.0.0.1:1", "10.0.0.2:1"]}
    pool: WorkerPool[RelayPrefillStub] = WorkerPool(
        "prefill", ("p.test:1",), RelayPrefillStub, resolver=names.__getitem__
    )
    router = PrefixRouter(pool)
    first, second = pool.workers["10.0.0.1:1"], pool.workers["10.0.0.2:1"]
    for worker in (first, second):
        router.record(worker, _request(SYSTEM), worker_pb2.SequenceStart(prompt_token_ids=[1] * 40))
    assert router.index.matched(text_keys(SYSTEM.encode())) == {first.address: 1024, second.address: 1024}
    pool.mark_failed(first)
    assert router.index.keys_of(first.address) == 0
    assert router.index.matched(text_keys(SYSTEM.encode())) == {second.address: 1024}
    names["p.test:1"] = ["10.0.0.1:1"]
    await pool.check()  # (health checks fail fast: nothing listens) the second left DNS: draining
    assert router.index.keys_of(second.address) == 0 and len(router.index) == 0
    await pool.close()


async def test_a_very_long_prompt_routes_by_its_prefix() -> None:
    """~116 KB of prompt (~29k tokens): the index keys it at its cut points and routes the next one that shares
    it (how cheap that is belongs in a benchmark, not here)."""
    router = _router(2)
    prompt = SYSTEM * 100
    _serve(router, A, prompt)
    assert router.pick(_request(prompt + " and one more question?")).address == A


async def test_flags_and_servicer_wiring() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_flags(parser, GatewayConfig, role="gateway")
    config = gateway_config(parser.parse_args(["--no-prefix-routing", "--prefix-routing-weight", "2"]))
    assert not config.prefix_routing and config.prefix_routing_weight == 2.0
    assert GatewayConfig().prefix_routing
    exact_off = gateway_config(parser.parse_args(["--no-prefix-routing-events", "--prefix-routing-tokenizer", "gpt2"]))
    assert not exact_off.prefix_routing_events and exact_off.prefix_routing_tokenizer == "gpt2"
    assert GatewayConfig().prefix_routing_events  # the exact index is on by default
    prefill = WorkerPool("prefill", (A, B), RelayPrefillStub)
    decode = WorkerPool("decode", (C,), RelayDecodeStub)
    servicer = GatewayServicer(GatewayConfig(), prefill, decode)
    assert servicer.prefix_router is not None and servicer.prefix_router.pool is prefill
    assert servicer.prefix_router.watchers is not None
    approximate_only = GatewayServicer(exact_off, prefill, decode).prefix_router
    assert approximate_only is not None and approximate_only.watchers is None
    assert approximate_only.tokenizer.model_for("distilgpt2") == "gpt2"
    await prefill.close()
    await decode.close()


async def test_decode_affinity_sends_the_next_turn_to_the_worker_that_decoded_the_last() -> None:
    """Conditional disaggregation: the decode router remembers prompt + reply under the worker that decoded them."""
    from gateway.routes import DECODE_AFFINITY_KEYS

    pool: WorkerPool[RelayDecodeStub] = WorkerPool("decode", (A, B), RelayDecodeStub, clock=Clock())
    router = PrefixRouter(pool, RoutingOptions(exact=False), fingerprint=DECODE_AFFINITY_KEYS)
    turn1 = SYSTEM + "user: what is decode?"
    reply = " It is the loop that makes one token per step for every running sequence. " * 4
    router.record_continuation(pool.workers[B], _request(turn1), list(range(300)), reply)
    _load(router, A, 0)
    _load(router, B, 1)
    assert router.pick(_request(turn1 + reply + "user: and why?")).address == B  # text history
    assert router.pick(_request("user: something new entirely, long enough to be keyed" * 3)).address == A
    by_tokens = worker_pb2.PrefillRequest(request_id="t", prompt_token_ids=[*range(300), 7, 7, 7])
    assert router.pick(by_tokens).address == B  # token history: the gateway's own keys
    chat = worker_pb2.PrefillRequest(request_id="c", messages=[gateway_pb2.ChatMessage(role="user", content=turn1)])
    router.record_continuation(pool.workers[A], chat, [], reply)
    _load(router, A, 1)
    _load(router, B, 0)
    nxt = worker_pb2.PrefillRequest(request_id="c2")
    nxt.messages.extend([*chat.messages, gateway_pb2.ChatMessage(role="assistant", content=reply)])
    nxt.messages.append(gateway_pb2.ChatMessage(role="user", content="go on"))
    assert router.pick(nxt).address == A  # chat history: an assistant message follows the prompt's messages
    await pool.close()
