"""The gateway's view of its workers: one channel each, opened once, health-checked, least-loaded selection.

Addresses may be DNS names that resolve to several workers (a headless service, a docker-compose service scaled
to N); they are re-resolved on every health pass, so workers that appear later are picked up and workers whose
address left the name are drained: no new requests, the ones in flight finish, then their channel is closed. A
name that fails to resolve keeps the workers it last resolved to (a DNS hiccup must not empty the pool).

Choice of worker. Each health pass also asks every healthy worker for its load (WorkerLoadService/GetLoad) and
keeps the reading with the time it was asked. `pick()` takes the healthy worker with the lowest score:

    fresh reading (younger than `load_ttl`, by default two health intervals):
        score = active_sequences + queued + started_since + kv_weight * kv_bytes / kv_budget_bytes
    no fresh reading (never answered, an old worker, or stale):
        score = in_flight

`started_since` is the requests this gateway started on the worker after it asked for the reading and that are
still in flight (the worker could not count them yet); the KV term is 0 where the budget is 0 (unlimited, and
always for prefill workers), and `kv_weight` (gateway `--load-kv-weight`, default 4) is how many sequences a full
KV budget weighs: a worker close to its budget is avoided before it has to refuse. Ties go to the worker listed
first. A worker that refused a request (RESOURCE_EXHAUSTED) stays healthy but is deprioritised, picked only when no
other candidate is left, until a reading asked after the refusal shows its load changed (or `refusal_hold` seconds
passed, so that an idle worker that refused one request too big for it is not shunned for ever).

The prefill pool's choice can be KV-aware instead (gateway.prefix_routing, which reads `candidates()`, `score()`
and `deprioritised()`); `on_gone` callbacks hear of every worker marked down or gone from DNS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg.config import TlsOptions
from disagg.errors import NoWorkerAvailable
from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.rpc.channel import open_channel

log = logging.getLogger(__name__)
Stub = TypeVar("Stub")  # the stub class a pool's workers are called through (RelayPrefillStub, RelayDecodeStub)


@dataclass(frozen=True)
class LoadReading:
    """One GetLoad answer, with when it was asked and how many requests this gateway had started by then."""

    taken_at: float  # the pool's clock (time.monotonic) when GetLoad was sent
    started_before: int  # Worker.started when GetLoad was sent: later requests are not in the numbers
    active_sequences: int = 0
    queued: int = 0
    kv_bytes: int = 0
    kv_budget_bytes: int = 0  # 0 = unlimited
    rss_bytes: int = 0

    @property
    def kv_fullness(self) -> float:
        return self.kv_bytes / self.kv_budget_bytes if self.kv_budget_bytes > 0 else 0.0

    def counts(self) -> tuple[int, int, int, int]:
        """What "its load changed" compares (not RSS, which moves without any request)."""
        return self.active_sequences, self.queued, self.kv_bytes, self.kv_budget_bytes


@dataclass
class Refusal:
    at: float  # the pool's clock when the worker refused
    load: LoadReading | None  # the reading the gateway had then


@dataclass
class Worker(Generic[Stub]):
    kind: str
    address: str
    channel: grpc.aio.Channel
    stub: Stub
    health: health_pb2_grpc.HealthStub
    load_stub: worker_pb2_grpc.WorkerLoadServiceStub = field(init=False)
    in_flight: int = 0
    started: int = 0  # requests ever started here (begin()), to tell which ones a load reading already counts
    healthy: bool = True
    load: LoadReading | None = None  # the latest GetLoad reading
    refused: Refusal | None = None  # its last RESOURCE_EXHAUSTED, while it deprioritises the worker

    def __post_init__(self) -> None:
        self.load_stub = worker_pb2_grpc.WorkerLoadServiceStub(self.channel)

    def begin(self) -> None:
        """A request (a Prefill or Decode call) starts on this worker."""
        self.in_flight += 1
        self.started += 1

    def end(self) -> None:
        self.in_flight -= 1


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
        load_ttl: float = 2.0,
        kv_weight: float = 4.0,
        refusal_hold: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not addresses:
            raise ValueError(f"no {kind} worker addresses configured")
        self.kind, self._addresses, self._stub_class, self._tls = kind, addresses, stub_class, tls
        self._resolver = resolver
        self.load_ttl, self.kv_weight, self.refusal_hold, self._clock = load_ttl, kv_weight, refusal_hold, clock
        self.workers: dict[str, Worker[Stub]] = {}  # in rotation
        self.draining: dict[str, Worker[Stub]] = {}  # gone from DNS: no new requests; closed once their last one ends
        self._resolved: dict[str, list[str]] = {}  # what each configured name last resolved to
        # called with the address of a worker marked down or gone from DNS (gateway.prefix_routing drops its keys)
        self.on_gone: list[Callable[[str], object]] = []
        self._refresh_addresses()

    def _gone(self, address: str) -> None:
        for callback in self.on_gone:
            callback(address)

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
            self._gone(address)
            log.info(
                "%s worker %s left DNS; draining (%d in flight)", self.kind, address, self.draining[address].in_flight
            )

    async def _close_drained(self) -> None:
        for address, worker in list(self.draining.items()):
            if worker.in_flight <= 0:
                del self.draining[address]
                await worker.channel.close()
                log.info("%s worker %s drained and closed", self.kind, address)

    def score(self, worker: Worker[Stub], now: float | None = None) -> float:
        """The worker's load as pick() ranks it (the module docstring has the formula)."""
        now = self._clock() if now is None else now
        reading = worker.load
        if reading is None or now - reading.taken_at > self.load_ttl:
            return float(worker.in_flight)
        started_since = min(worker.started - reading.started_before, worker.in_flight)  # (not those that ended)
        return reading.active_sequences + reading.queued + started_since + self.kv_weight * reading.kv_fullness

    def deprioritised(self, worker: Worker[Stub], now: float | None = None) -> bool:
        now = self._clock() if now is None else now
        return worker.refused is not None and now - worker.refused.at < self.refusal_hold

    def now(self) -> float:
        return self._clock()

    def candidates(self, exclude: frozenset[str] = frozenset()) -> list[Worker[Stub]]:
        """The healthy workers in rotation, less `exclude`; NoWorkerAvailable when there is none."""
        candidates = [w for w in self.workers.values() if w.healthy and w.address not in exclude]
        if not candidates:
            states = ", ".join(f"{w.address} {'healthy' if w.healthy else 'down'}" for w in self.workers.values())
            raise NoWorkerAvailable(f"no healthy {self.kind} worker available ({states})")
        return candidates

    def pick(self, exclude: frozenset[str] = frozenset()) -> Worker[Stub]:
        """The healthy worker with the lowest score, one that recently refused only when no other is left."""
        candidates = self.candidates(exclude)
        now = self._clock()
        return min(candidates, key=lambda w: (self.deprioritised(w, now), self.score(w, now)))

    def note_refusal(self, worker: Worker[Stub]) -> None:
        """The worker answered RESOURCE_EXHAUSTED: it is healthy but full, so other workers go first for a while."""
        log.debug("%s worker %s refused a request; deprioritised until its load changes", self.kind, worker.address)
        worker.refused = Refusal(self._clock(), worker.load)

    def record_load(self, worker: Worker[Stub], reading: LoadReading) -> None:
        """Keep a GetLoad reading; one asked after a refusal that shows a changed load lifts the refusal."""
        worker.load = reading
        refused = worker.refused
        if (
            refused is not None
            and reading.taken_at > refused.at
            and (refused.load is None or reading.counts() != refused.load.counts())
        ):
            worker.refused = None

    async def read_load(self, worker: Worker[Stub]) -> None:
        """Ask the worker for its load; no answer (a slow or an older worker) leaves the last one to go stale."""
        taken_at, started = self._clock(), worker.started
        try:
            reply = await worker.load_stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=1.0)
        except grpc.aio.AioRpcError:
            return
        self.record_load(
            worker,
            LoadReading(
                taken_at,
                started,
                reply.active_sequences,
                reply.queued,
                reply.kv_bytes,
                reply.kv_budget_bytes,
                reply.rss_bytes,
            ),
        )

    def mark_failed(self, worker: Worker[Stub]) -> None:
        """Take a worker out of rotation at once; the health loop puts it back when it answers SERVING."""
        if worker.healthy:
            log.warning("%s worker %s marked down", self.kind, worker.address)
            self._gone(worker.address)
        worker.healthy = False

    async def check(self) -> None:
        """One health pass over every worker (re-resolving names first, closing drained workers), reading the
        load of each healthy one."""
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
                if not up:
                    self._gone(worker.address)
            worker.healthy = up
            if up:
                await self.read_load(worker)

        await asyncio.gather(*(one(w) for w in list(self.workers.values())))

    async def monitor(self, interval: float) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.check()
            await asyncio.sleep(interval)

    async def close(self) -> None:
        for worker in [*self.workers.values(), *self.draining.values()]:
            await worker.channel.close()
