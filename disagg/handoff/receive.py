"""The receiving end of a KV handoff: SequenceStart, then FirstToken and the cache, by whichever transport.

The decode worker's Decode call and the handoff benchmark both receive through here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from disagg.errors import DisaggError, KvIntegrityError, ProtocolError
from disagg.handoff.inbox import KvInbox
from disagg.handoff.shared_memory import adopt_shared_memory
from disagg.kv.codec import KvAssembler
from disagg.kv.framing import HandoffMessage, event_of
from disagg.kv.transports import DIRECT
from disagg.model.kv_layers import KvLayers
from disagg.model.loading import LoadedModel
from disagg.pb.disagg.v1 import worker_pb2
from disagg.rpc.convert import layout_from_pb
from disagg.rpc.streams import ReadAhead


@dataclass
class Handoff:
    start: worker_pb2.SequenceStart
    first_token: worker_pb2.FirstToken  # sequence 0's
    kv: KvLayers | None
    first_tokens: list[worker_pb2.FirstToken] = field(default_factory=list)  # all n, by index (n > 1: one prefill)


async def receive_handoff(
    requests: AsyncIterator[HandoffMessage],
    lm: LoadedModel,
    kv_cache: bool,
    inbox: KvInbox | None = None,
    timeout: float = 60.0,
    admit: Callable[[worker_pb2.SequenceStart], Awaitable[None]] | None = None,
) -> Handoff:
    """Read SequenceStart, then FirstToken and the KV cache in any order, until both are complete.

    The cache comes as KvChunk messages in this stream (relayed), as one KvSharedMemory message (co-located
    workers), or pushed by the prefill worker to `inbox` under the layout's handle (direct). `admit(start)` runs
    after SequenceStart and before anything is allocated for the cache (the KV budget's reservation); its refusal
    ends the call at once, before the sender has sent the cache.
    """
    start: worker_pb2.SequenceStart | None = None
    try:
        with ReadAhead(requests) as messages:  # the next chunk arrives while this one is checked and copied
            admitting = False
            try:
                start = await _sequence_start(messages)
                admitting = admit is not None
                if admit is not None:
                    await admit(start)
                admitting = False
                return await _receive_cache(start, messages, lm, kv_cache, inbox, timeout)
            except DisaggError:
                if not admitting:  # (a refused admission: the sender waits for it before the cache, nothing to read)
                    await drain(messages)  # the same reader: no read is cancelled and restarted in between
                raise
    except BaseException:  # failed or cancelled: a directly pushed cache nobody will claim goes now, not at its TTL
        if start is not None and start.kv_layout.transport == DIRECT and inbox is not None:
            inbox.abandon(start.kv_layout.handle)
        raise


async def _sequence_start(messages: AsyncIterator[HandoffMessage]) -> worker_pb2.SequenceStart:
    async for message in messages:
        kind = event_of(message)
        if kind != "start":
            raise ProtocolError(f"{kind} before SequenceStart")
        return message.start
    raise ProtocolError("stream ended before SequenceStart")


async def _receive_cache(
    start: worker_pb2.SequenceStart,
    requests: AsyncIterator[HandoffMessage],
    lm: LoadedModel,
    kv_cache: bool,
    inbox: KvInbox | None,
    timeout: float,
) -> Handoff:
    """After SequenceStart: the n FirstTokens and the cache, in any order."""
    assembler: KvAssembler | None = None
    expected = max(1, start.sampling.n)
    firsts: dict[int, worker_pb2.FirstToken] = {}
    if kv_cache:
        if start.kv_layout.total_bytes == 0:
            raise ProtocolError(
                "this decode worker needs the KV cache, the prefill worker sent none "
                "(is one of them running with --no-kv-cache?)"
            )
        if start.kv_layout.transport != DIRECT:
            assembler = KvAssembler(layout_from_pb(start.kv_layout), expected_fingerprint=lm.fingerprint)
            if assembler.layout.total_bytes != start.kv_layout.total_bytes:
                raise KvIntegrityError("KV layout's total_bytes does not match its shape")
        elif inbox is None or not start.kv_layout.handle:
            raise ProtocolError("a directly pushed KV cache needs a handle and a decode worker that takes pushes")
    async for message in requests:
        kind = event_of(message)
        if kind == "start":
            raise ProtocolError("SequenceStart sent twice")
        if kind in ("kv_chunk", "shared_memory"):
            if assembler is None:
                raise ProtocolError(
                    f"{kind} sent to a decode worker running with --no-kv-cache, or with a directly pushed KV cache"
                )
            if kind == "kv_chunk":
                assembler.add(message)  # a Chunk: see wire.handoff_deserializer
            else:
                adopt_shared_memory(message.shared_memory, assembler)
        elif kind == "first_token":
            index = message.first_token.index
            if not 0 <= index < expected or index in firsts:
                raise ProtocolError(f"FirstToken index {index} repeated or outside the sampling's n={expected}")
            firsts[index] = message.first_token
        if len(firsts) == expected and (assembler is None or assembler.complete):
            ordered = [firsts[i] for i in range(expected)]
            if kv_cache and assembler is None:  # direct: the prefill worker pushes the cache to the inbox
                assert inbox is not None  # (a direct push without an inbox was refused above)
                layers = await inbox.claim(start.kv_layout.handle, layout_from_pb(start.kv_layout), timeout)
                return Handoff(start, ordered[0], layers, ordered)
            return Handoff(start, ordered[0], assembler.layers() if assembler else None, ordered)
    if len(firsts) < expected:
        raise ProtocolError(f"stream ended after {len(firsts)} of {expected} FirstToken messages")
    assert assembler is not None  # every FirstToken came, so only a cache still incomplete keeps us here
    raise KvIntegrityError(f"KV cache incomplete: {assembler.received} of {assembler.layout.total_bytes} bytes")


async def drain(requests: AsyncIterator[HandoffMessage], max_messages: int = 256, seconds: float = 5.0) -> None:
    """Read and drop what the client is still sending before refusing its handoff.

    A gRPC client whose write races with the server's early abort sees a local INTERNAL error instead of the
    server's status; letting it finish writing (within bounds) lets it see why the handoff was refused.
    """

    async def consume() -> None:
        count = 0
        async for _ in requests:
            count += 1
            if count >= max_messages:
                return

    with contextlib.suppress(Exception):
        await asyncio.wait_for(consume(), seconds)
