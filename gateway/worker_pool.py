"""The gateway's view of its workers: one channel each, opened once, health-checked, least-loaded selection.

Addresses may be DNS names that resolve to several workers (a headless service, a docker-compose service scaled
to N); they are re-resolved on every health pass, so workers that appear later are picked up and workers whose
address left the name are drained: no new requests, the ones in flight finish, then their channel is closed. A
name that fails to resolve keeps the workers it last resolved to (a DNS hiccup must not empty the pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg.config import TlsOptions
from disagg.errors import NoWorkerAvailable
from disagg.rpc.channel import open_channel

log = logging.getLogger(__name__)
Stub = TypeVar("Stub")  # the stub class a pool's workers are called through (RelayPrefillStub, RelayDecodeStub)


@dataclass
class Worker(Generic[Stub]):
    kind: str
    address: str
    channel: grpc.aio.Channel
    stub: Stub
    health: health_pb2_grpc.HealthStub
    in_flight: int = 0
    healthy: bool = True


Resolver = Callable[[str], list[str]]  # `host:port` -> `ip:port` per worker; raises OSError when it cannot tell


def resolve_strict(address: str) -> list[str]:
    """`host:port` to one `ip:port` per address the name resolves to (an IP resolves to itself); OSError if none."""
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except ValueError as error:
        raise OSError(f"bad worker address {address!r}") from error
    ips = sorted({cast(str, info[4][0]) for info in infos})  # (an AF_INET or AF_INET6 address: its host is a str)
    if not ips:
        raise OSError(f"{host} resolves to no address")
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]


def resolve(address: str) -> list[str]:
    """Like resolve_strict, but a name that does not resolve stands for itself (gRPC resolves it when it can)."""
    try:
        return resolve_strict(address)
    except OSError:
        return [address]


class WorkerPool(Generic[Stub]):
    def __init__(
        self,
        kind: str,
        addresses: tuple[str, ...],
        stub_class: Callable[[grpc.aio.Channel], Stub],
        tls: TlsOptions | None = None,
        resolver: Resolver = resolve_strict,
    ):
        if not addresses:
            raise ValueError(f"no {kind} worker addresses configured")
        self.kind, self._addresses, self._stub_class, self._tls = kind, addresses, stub_class, tls
        self._resolver = resolver
        self.workers: dict[str, Worker[Stub]] = {}  # in rotation
        self.draining: dict[str, Worker[Stub]] = {}  # gone from DNS: no new requests; closed once their last one ends
        self._resolved: dict[str, list[str]] = {}  # what each configured name last resolved to
        self._refresh_addresses()

    def _resolve(self, name: str) -> list[str]:
        try:
            self._resolved[name] = self._resolver(name)
        except OSError as error:
            if name not in self._resolved:  # never resolved: let gRPC's own resolver try the name
                log.warning("%s worker address %s does not resolve (%s); using the name", self.kind, name, error)
                self._resolved[name] = [name]
        return self._resolved[name]

    def _refresh_addresses(self) -> None:
        current = list(dict.fromkeys(a for name in self._addresses for a in self._resolve(name)))
        for address in current:
            if address in self.workers:
                continue
            if address in self.draining:  # came back before it drained: same channel, back in rotation
                self.workers[address] = self.draining.pop(address)
                log.info("%s worker %s is back in DNS", self.kind, address)
                continue
            channel = open_channel(address, self._tls)
            self.workers[address] = Worker(
                self.kind, address, channel, self._stub_class(channel), health_pb2_grpc.HealthStub(channel)
            )
            log.info("%s worker %s added", self.kind, address)
        for address in [a for a in self.workers if a not in current]:
            self.draining[address] = self.workers.pop(address)
            log.info(
                "%s worker %s left DNS; draining (%d in flight)", self.kind, address, self.draining[address].in_flight
            )

    async def _close_drained(self) -> None:
        for address, worker in list(self.draining.items()):
            if worker.in_flight <= 0:
                del self.draining[address]
                await worker.channel.close()
                log.info("%s worker %s drained and closed", self.kind, address)

    def pick(self, exclude: frozenset[str] = frozenset()) -> Worker[Stub]:
        """The healthy worker with the fewest requests in flight."""
        candidates = [w for w in self.workers.values() if w.healthy and w.address not in exclude]
        if not candidates:
            states = ", ".join(f"{w.address} {'healthy' if w.healthy else 'down'}" for w in self.workers.values())
            raise NoWorkerAvailable(f"no healthy {self.kind} worker available ({states})")
        return min(candidates, key=lambda w: w.in_flight)

    def mark_failed(self, worker: Worker[Stub]) -> None:
        """Take a worker out of rotation at once; the health loop puts it back when it answers SERVING."""
        if worker.healthy:
            log.warning("%s worker %s marked down", self.kind, worker.address)
        worker.healthy = False

    async def check(self) -> None:
        """One health pass over every worker (re-resolving names first, closing drained workers)."""
        self._refresh_addresses()
        await self._close_drained()

        async def one(worker: Worker[Stub]) -> None:
            try:
                reply = await worker.health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                up = reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                up = False
            if up != worker.healthy:
                log.warning("%s worker %s is %s", self.kind, worker.address, "up" if up else "down")
            worker.healthy = up

        await asyncio.gather(*(one(w) for w in list(self.workers.values())))

    async def monitor(self, interval: float) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.check()
            await asyncio.sleep(interval)

    async def close(self) -> None:
        for worker in [*self.workers.values(), *self.draining.values()]:
            await worker.channel.close()
