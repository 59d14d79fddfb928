"""The gateway follows DNS: a worker added to a name gets traffic within the refresh interval, a removed one drains.

Real processes on loopback: one prefill worker, two decode workers on 127.0.0.1 and 127.0.0.2 with the SAME port
(what a headless Service's name resolves to: one IP per pod, one port), and the gateway's own servicer and worker
pools served in this process, so that the test can stand in for DNS: the pools take a resolver, and the test's
resolver answers from a table it changes while requests are flowing. Which decode worker served what is read from
each worker's own Prometheus counter of decoded tokens, not from the gateway.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from disagg.config import GatewayConfig
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.rpc.channel import open_channel
from disagg.rpc.services import RelayDecodeStub, RelayPrefillStub
from disagg.server import Server
from disagg.tools.client import complete
from disagg.tools.cluster import Child, free_port, stop, wait_healthy
from gateway.servicer import GatewayServicer
from gateway.worker_pool import WorkerPool, resolve_strict
from tests.conftest import GPT2_ARGS

INTERVAL = 1.0  # the gateway's health pass, which re-resolves the names
NEW_TOKENS = 12
NAME = "decode.disagg.test"


def _port_free_on(*hosts: str) -> int:
    """A port that is free on every one of these loopback addresses (the decode workers share one)."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on all of " + ", ".join(hosts))


def _spawn(name: str, role: str, host: str, port: int) -> Child:
    metrics = free_port(host)
    argv = [
        sys.executable,
        "-m",
        "disagg",
        role,
        *GPT2_ARGS,
        "--threads",
        "1",
        "--host",
        host,
        "--port",
        str(port),
        "--metrics-port",
        str(metrics),
    ]
    return Child(name, f"{host}:{port}", subprocess.Popen(argv, start_new_session=True), argv, {}, f"{host}:{metrics}")


def _decoded_tokens(child: Child) -> float:
    text = urllib.request.urlopen(f"http://{child.metrics_address}/metrics", timeout=5).read().decode()
    found = re.search(r"^disagg_generation_tokens_total(?:\{[^}]*\})? (\S+)$", text, flags=re.M)
    return float(found.group(1)) if found else 0.0


class TableResolver:
    """A DNS stand-in: `host:port` names answer from a table the test edits; anything else resolves for real."""

    def __init__(self):
        self.table: dict[str, list[str]] = {}
        self.lookups = 0

    def __call__(self, address: str) -> list[str]:
        self.lookups += 1
        if address in self.table:
            return list(self.table[address])
        return resolve_strict(address)


@pytest.fixture(scope="module")
def workers():
    decode_port = _port_free_on("127.0.0.1", "127.0.0.2")
    children = [
        _spawn("prefill", "prefill", "127.0.0.1", free_port()),
        _spawn("decode-a", "decode", "127.0.0.1", decode_port),
        _spawn("decode-b", "decode", "127.0.0.2", decode_port),
    ]
    try:
        asyncio.run(wait_healthy(children, timeout=300))
        yield children
    finally:
        stop(children)


async def _until(condition, timeout: float, what: str) -> float:
    """Seconds until condition() holds, polled every 50 ms; fails the test after timeout."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what} did not happen within {timeout:.1f}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.timeout(300)
@pytest.mark.cluster
async def test_gateway_follows_dns_adds_and_drains_workers_without_losing_requests(workers):
    prefill, decode_a, decode_b = workers
    name = f"{NAME}:{decode_a.address.rpartition(':')[2]}"
    resolver = TableResolver()
    resolver.table[name] = [decode_a.address]
    config = GatewayConfig(prefill=(prefill.address,), decode=(name,), health_interval_seconds=INTERVAL)
    prefill_pool = WorkerPool("prefill", config.prefill, RelayPrefillStub, resolver=resolver)
    decode_pool = WorkerPool("decode", config.decode, RelayDecodeStub, resolver=resolver)
    assert list(decode_pool.workers) == [decode_a.address]
    monitors = [asyncio.create_task(p.monitor(INTERVAL)) for p in (prefill_pool, decode_pool)]
    server = Server("127.0.0.1", 0)
    servicer = GatewayServicer(config, prefill_pool, decode_pool)
    server.add_service(
        gateway_pb2.DESCRIPTOR.services_by_name["Gateway"],
        lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s),
    )
    await server.start()

    results, failures, stopping = [], [], asyncio.Event()
    a_marked_down = []

    async def client(ch: grpc.aio.Channel, index: int) -> None:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        n = 0
        while not stopping.is_set():
            n += 1
            request = gateway_pb2.GenerateRequest(
                prompt=f"client {index} request {n}: tell me about DNS",
                max_new_tokens=NEW_TOKENS,
                ignore_eos=True,
                request_id=f"c{index}-{n}",
            )
            try:
                results.append(await complete(stub, request, timeout=60))
            except grpc.aio.AioRpcError as error:
                failures.append((request.request_id, error.code(), error.details()))

    async def watch_a() -> None:  # a drained worker is never marked down: draining is not failing over
        while not stopping.is_set():
            worker = decode_pool.workers.get(decode_a.address) or decode_pool.draining.get(decode_a.address)
            if worker is not None and not worker.healthy:
                a_marked_down.append(time.monotonic())
            await asyncio.sleep(0.02)

    try:
        async with open_channel(server.address) as ch:
            tasks = [asyncio.create_task(client(ch, i)) for i in range(3)] + [asyncio.create_task(watch_a())]
            await _until(lambda: len(results) >= 3, 120, "first requests")
            assert _decoded_tokens(decode_b) == 0, "decode-b served before it was in DNS"
            a_before = _decoded_tokens(decode_a)
            assert a_before > 0

            # Scale up: the name now resolves to both pods.
            resolver.table[name] = [decode_a.address, decode_b.address]
            in_pool = await _until(lambda: decode_b.address in decode_pool.workers, 2 * INTERVAL, "decode-b joining")
            served = await _until(lambda: _decoded_tokens(decode_b) > 0, INTERVAL + 30, "decode-b serving")
            print(
                f"decode-b joined the pool after {in_pool:.2f}s and decoded its first token {served:.2f}s after "
                f"it was added to the name (refresh interval {INTERVAL}s)"
            )
            assert in_pool <= INTERVAL + 0.5

            # Scale down while requests are in flight on decode-a: it drains, and nothing is lost.
            await _until(lambda: decode_pool.workers[decode_a.address].in_flight > 0, 30, "a request on decode-a")
            removed_at_tokens, removed_at_results = _decoded_tokens(decode_a), len(results)
            resolver.table[name] = [decode_b.address]
            left = await _until(lambda: decode_a.address not in decode_pool.workers, 2 * INTERVAL, "decode-a leaving")
            drained = await _until(lambda: decode_a.address not in decode_pool.draining, 60, "decode-a draining")
            print(f"decode-a left the pool after {left:.2f}s, drained and closed {drained:.2f}s later")
            assert left <= INTERVAL + 0.5
            a_after_drain = _decoded_tokens(decode_a)
            assert a_after_drain > removed_at_tokens, "requests in flight on decode-a did not finish there"

            b_at_drain = _decoded_tokens(decode_b)
            await _until(lambda: len(results) >= removed_at_results + 12, 120, "requests after the drain")
            assert _decoded_tokens(decode_a) == a_after_drain, "decode-a got requests after it left DNS"
            # (its metrics count a request when its stream is finalized, which can trail the client's last token)
            await _until(lambda: _decoded_tokens(decode_b) > b_at_drain, 30, "decode-b serving after the drain")

            stopping.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        stopping.set()
        for task in monitors:
            task.cancel()
        await server.grpc.stop(0)
        await prefill_pool.close()
        await decode_pool.close()

    assert not failures, f"requests lost: {failures[:5]}"
    assert not a_marked_down, "decode-a was marked down: the drain must not look like a failure"
    assert all(r.finish_reason == "length" and len(r.token_ids) == NEW_TOKENS for r in results), [
        (r.request_id, r.finish_reason, len(r.token_ids)) for r in results if len(r.token_ids) != NEW_TOKENS
    ]
    assert len({r.request_id for r in results}) == len(results) >= 18
    assert resolver.lookups > 0


def test_a_name_that_stops_resolving_keeps_its_workers():
    """A DNS failure (OSError from the resolver) must not empty the pool; a name never resolved stands for itself."""
    answers: dict[str, list[str] | OSError] = {"w.test:1": ["127.0.0.1:1", "127.0.0.2:1"], "x.test:2": OSError("no")}

    def resolver(address: str) -> list[str]:
        answer = answers[address]
        if isinstance(answer, OSError):
            raise answer
        return answer

    async def run() -> None:
        pool = WorkerPool("decode", ("w.test:1", "x.test:2"), RelayDecodeStub, resolver=resolver)
        assert sorted(pool.workers) == ["127.0.0.1:1", "127.0.0.2:1", "x.test:2"]
        answers["w.test:1"] = OSError("SERVFAIL")
        pool._refresh_addresses()
        assert sorted(pool.workers) == ["127.0.0.1:1", "127.0.0.2:1", "x.test:2"] and not pool.draining
        answers["x.test:2"] = ["127.0.0.3:2"]
        answers["w.test:1"] = ["127.0.0.2:1"]
        pool._refresh_addresses()
        assert sorted(pool.workers) == ["127.0.0.2:1", "127.0.0.3:2"]
        assert sorted(pool.draining) == ["127.0.0.1:1", "x.test:2"]
        pool.draining["127.0.0.1:1"].in_flight = 1  # still has a request: stays open
        answers["w.test:1"] = ["127.0.0.2:1", "127.0.0.1:1"]  # and comes back before it drained
        await pool._close_drained()
        pool._refresh_addresses()
        assert sorted(pool.workers) == ["127.0.0.1:1", "127.0.0.2:1", "127.0.0.3:2"] and not pool.draining
        await pool.close()

    asyncio.run(run())
