"""Helpers shared by the reliability and soak tests: worker load, waiting for idle, extra processes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator

from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.rpc.channel import open_channel
from disagg.tools.cluster import Child, spawn, wait_healthy


async def worker_load(address: str, tls=None) -> worker_pb2.GetLoadResponse:
    async with open_channel(address, tls) as ch:
        return await worker_pb2_grpc.WorkerLoadServiceStub(ch).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)


async def wait_idle(children: list[Child], timeout: float = 15.0) -> list[worker_pb2.GetLoadResponse]:
    """Poll every live worker until none holds a sequence or KV bytes; returns their last loads."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [c for c in children if c.process.poll() is None]
        loads = [await worker_load(c.address) for c in alive]
        if all(load.active_sequences == 0 and load.kv_bytes == 0 for load in loads):
            return loads
        if time.monotonic() > deadline:
            raise AssertionError(f"workers not idle after {timeout}s: {loads}")
        await asyncio.sleep(0.2)


async def idle_rss(address: str, seconds: float = 2.0) -> int:
    """A worker's resident memory once idle: the least of its readings over `seconds` (its engine hands freed
    memory back to the OS half a second after its last work)."""
    deadline, least = time.monotonic() + seconds, None
    while least is None or time.monotonic() < deadline:
        rss = (await worker_load(address)).rss_bytes
        least = rss if least is None else min(least, rss)
        await asyncio.sleep(0.1)
    return least


async def start_extra(name: str, command: list[str], port: int, timeout: float = 300) -> Child:
    """One more component process (a gateway with other limits, a worker with a small budget)."""
    child = spawn(name, command, port)
    await wait_healthy([child], timeout)
    return child


@contextlib.contextmanager
def paused(children: list[Child]) -> Iterator[None]:
    """SIGSTOP the children for the block: their work cannot finish, however fast the machine (deadline tests)."""
    for child in children:
        child.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for child in children:
            child.process.send_signal(signal.SIGCONT)


async def first_token_then_deadline(stub, request, decode: list[Child], timeout: float | None = None) -> Exception:
    """Read a Generate stream until its first token, then pause the decode workers so that the deadline (client
    `timeout` or the server's limit) passes while the request is running; returns the call's final error."""
    call = stub.Generate(request, timeout=timeout)
    with contextlib.ExitStack() as stack:
        running = False
        try:
            async for response in call:
                if response.token_ids and not running:  # the first token: the request is running
                    stack.enter_context(paused(decode))
                    running = True
        except Exception as error:  # the deadline's status
            return error
    raise AssertionError("the stream finished before its deadline although its decode workers were paused")
