"""KV transports: direct push (prefill -> decode, the gateway passes a handle) and shared memory, next to relayed.

Units: the shared-memory segment round trip and its refusals, and the decode worker's KvInbox pairing pushes with
claims in either order. Clusters: greedy output identical to generate() on each transport, nothing left behind,
and a dead decode worker on the direct path blamed (and avoided) rather than the prefill worker.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal

import pytest
import torch

from disagg.errors import KvIntegrityError, Overloaded, ProtocolError
from disagg.handoff.inbox import KvInbox
from disagg.handoff.senders import SharedMemorySender
from disagg.handoff.shared_memory import SharedMemorySegments, adopt_shared_memory
from disagg.kv.budget import KvBudget
from disagg.kv.codec import KvAssembler, KvLayout, encode_kv
from disagg.kv.framing import chunk_from_message, chunk_message
from disagg.pb.disagg.v1 import worker_pb2
from disagg.rpc.convert import layout_to_pb
from disagg.rpc.streams import ReadAhead
from tests.conftest import GPT2_ARGS, start_cluster
from tests.reliability_helpers import wait_idle
from tests.test_e2e import generate, prompt_of, reference

LAYERS, HEADS, SEQ, HEAD_DIM = 3, 4, 37, 16


def cache(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (1, HEADS, SEQ, HEAD_DIM)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(LAYERS)]


def layout(wire: str = "", fingerprint: str = "fp") -> KvLayout:
    return KvLayout("float32", LAYERS, HEADS, SEQ, HEAD_DIM, fingerprint, wire)


def segment_names(directory) -> set[str]:
    return {p.name for p in pathlib.Path(directory).iterdir() if p.name.startswith("disagg-kv-")}


async def write_segment(segments: SharedMemorySegments, kv, wire: str = "") -> worker_pb2.KvSharedMemory:
    sender = SharedMemorySender(layout(wire), 1 << 20, segments)
    for i, (k, v) in enumerate(kv):
        assert await sender.send_layer(i, k, v) == []  # nothing goes in the stream until the segment is complete
    (message,) = await sender.finish()
    return message.shared_memory


@pytest.mark.parametrize("wire", ["", "bfloat16", "int8"])
async def test_shared_memory_round_trip_removes_the_segment(tmp_path, wire):
    kv = cache()
    segments = SharedMemorySegments(directory=str(tmp_path))
    message = await write_segment(segments, kv, wire)
    assert segment_names(tmp_path) == {message.name} and message.size == layout(wire).total_bytes
    assembler = KvAssembler(layout(wire), expected_fingerprint="fp")
    adopt_shared_memory(message, assembler, directory=str(tmp_path))
    assert segment_names(tmp_path) == set()  # the reader removed it; its mapping lives on in the tensors
    for (k, v), (gk, gv) in zip(kv, assembler.layers(), strict=True):
        if wire:
            torch.testing.assert_close(gk, k, atol=0.05, rtol=0.02)
        else:
            assert torch.equal(gk, k) and torch.equal(gv, v)


async def test_shared_memory_refuses_foreign_names_sizes_and_corruption(tmp_path):
    segments = SharedMemorySegments(directory=str(tmp_path))
    message = await write_segment(segments, cache())

    def read(msg):
        adopt_shared_memory(msg, KvAssembler(layout(), expected_fingerprint="fp"), directory=str(tmp_path))

    with pytest.raises(ProtocolError, match="not one of ours"):
        read(worker_pb2.KvSharedMemory(name="../etc/passwd", size=message.size, tensor_crc32=message.tensor_crc32))
    with pytest.raises(KvIntegrityError, match="does not match its layout"):
        read(worker_pb2.KvSharedMemory(name=message.name, size=message.size - 1, tensor_crc32=message.tensor_crc32))
    corrupt = worker_pb2.KvSharedMemory()
    corrupt.CopyFrom(message)
    corrupt.tensor_crc32[2] ^= 1
    with pytest.raises(KvIntegrityError, match="checksum"):
        read(corrupt)
    with pytest.raises(KvIntegrityError, match="does not exist on this host"):
        read(message)  # the failed read above removed it: a segment is read once


async def test_segments_nobody_took_are_removed(tmp_path):
    segments = SharedMemorySegments(ttl_seconds=30, directory=str(tmp_path))
    first = await write_segment(segments, cache())
    aborted = SharedMemorySender(layout(), 1 << 20, segments)
    aborted.abort()  # a request that ended before its handoff
    assert segment_names(tmp_path) == {first.name}
    segments.sweep(now=10**9)
    assert segment_names(tmp_path) == set()


async def test_orphans_of_a_killed_worker_are_removed_at_start(tmp_path):
    left = await write_segment(SharedMemorySegments(directory=str(tmp_path)), cache())  # its writer "died"
    fresh = await write_segment(SharedMemorySegments(directory=str(tmp_path)), cache())
    (tmp_path / "unrelated").write_text("x")
    old = (tmp_path / left.name).stat().st_mtime - 3600
    os.utime(tmp_path / left.name, (old, old))
    assert SharedMemorySegments(ttl_seconds=120, directory=str(tmp_path)).remove_orphans() == 1
    assert segment_names(tmp_path) == {fresh.name} and (tmp_path / "unrelated").exists()


def pushes(handle: str, kv, lay: KvLayout):
    async def stream():
        yield worker_pb2.PushKvRequest(
            header=worker_pb2.KvPushHeader(handle=handle, request_id="r", kv_layout=layout_to_pb(lay, kv_included=True))
        )
        for chunk in encode_kv(kv, 500):
            yield chunk_from_message(chunk_message(chunk))  # as DecodeService deserializes it

    return stream()


@pytest.mark.parametrize("claim_first", [True, False])
async def test_inbox_pairs_push_and_claim_in_either_order(claim_first):
    inbox, kv = KvInbox("fp"), cache()
    if claim_first:
        claim = asyncio.create_task(inbox.claim("h", layout(), timeout=10))
        await asyncio.sleep(0.01)
        assert await inbox.receive(pushes("h", kv, layout())) == layout().total_bytes
        got = await claim
    else:
        await inbox.receive(pushes("h", kv, layout()))
        assert inbox.bytes_held == layout().total_bytes
        got = await inbox.claim("h", layout(), timeout=10)
    assert all(torch.equal(a, b) for pair, got_pair in zip(kv, got, strict=True) for a, b in zip(pair, got_pair))
    assert inbox.bytes_held == 0


async def test_inbox_refusals():
    inbox = KvInbox("fp", KvBudget(layout().cache_bytes), ttl_seconds=60)
    with pytest.raises(KvIntegrityError, match="was made by model"):
        await inbox.receive(pushes("other-model", cache(), layout(fingerprint="other")))
    await inbox.receive(pushes("a", cache(), layout()))
    with pytest.raises(Overloaded, match="KV budget"):
        await inbox.receive(pushes("b", cache(), layout()))
    with pytest.raises(KvIntegrityError, match="has layout"):
        await inbox.claim("a", layout(wire="float16"), timeout=1)
    with pytest.raises(KvIntegrityError, match="not pushed within"):
        await inbox.claim("never", layout(), timeout=0.05)
    with pytest.raises(ProtocolError, match="has ended"):  # the Decode call gave up first: its push is refused
        await inbox.receive(pushes("never", cache(), layout()))
    assert inbox.bytes_held == 0


async def test_inbox_drops_what_nobody_claims():
    inbox = KvInbox("fp", KvBudget(0), ttl_seconds=0.05)
    await inbox.receive(pushes("lost", cache(), layout()))
    assert inbox.budget.used == layout().cache_bytes  # reserved from the header, before anything was allocated
    await asyncio.sleep(0.1)
    with pytest.raises(KvIntegrityError, match="not pushed within"):
        await inbox.claim("other", layout(), timeout=0.01)  # any call sweeps expired entries
    assert inbox.bytes_held == 0 and inbox.budget.used == 0


@pytest.fixture(scope="module", params=["direct", "shared-memory"])
def transport_cluster(request):
    prefill_args = ["--kv-layerwise"] if request.param == "direct" else []  # both handoff modes on some transport
    running = start_cluster(GPT2_ARGS, ["--kv-transport", request.param], prefill_args=prefill_args, decode_workers=2)
    running.transport = request.param
    yield running
    running.cluster.stop()


async def test_transport_keeps_greedy_output_identical_and_frees_everything(transport_cluster, gpt2_model):
    segments_before = segment_names("/dev/shm")
    lengths = (1, 13, 700)
    prompts = [prompt_of(gpt2_model.tokenizer, n) for n in lengths]
    expected = [reference(gpt2_model, p, 10) for p in prompts]
    got = await asyncio.gather(
        *(
            generate(transport_cluster.address, prompt=p, max_new_tokens=10, ignore_eos=True)
            for p in [*prompts, *prompts]
        )
    )
    assert [g.token_ids for g in got] == [*expected, *expected]
    cluster = transport_cluster.cluster
    await wait_idle([*cluster.prefill, *cluster.decode])
    assert segment_names("/dev/shm") <= segments_before  # every shared-memory handoff was taken and removed


@pytest.mark.parametrize("transport_cluster", ["direct"], indirect=True)
async def test_direct_push_to_a_dead_decode_worker_moves_the_request(transport_cluster, gpt2_model):
    victim = transport_cluster.cluster.decode[0]
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    prompt = prompt_of(gpt2_model.tokenizer, 60)
    expected = reference(gpt2_model, prompt, 8)
    # sent at once, before the health loop notices: the least-loaded choice sends some to the dead worker
    got = await asyncio.gather(
        *(generate(transport_cluster.address, prompt=prompt, max_new_tokens=8, ignore_eos=True) for _ in range(4))
    )
    assert all(g.token_ids == expected for g in got)


async def test_read_ahead_keeps_order_then_raises_the_source_error():
    async def source():
        for i in range(20):  # more than the read-ahead depth
            yield i
        raise ProtocolError("source failed")

    got = []
    with ReadAhead(source(), depth=4) as messages:
        with pytest.raises(ProtocolError, match="source failed"):
            async for item in messages:
                got.append(item)
        with pytest.raises(ProtocolError):  # the end stays the end
            await messages.__anext__()
    assert got == list(range(20))


async def test_a_decode_call_that_ends_before_its_claim_drops_the_pushed_cache(gpt2_model):
    """The client went away between the push and the claim: the cache goes at once, not after the TTL."""
    from disagg.handoff.receive import receive_handoff

    lay = KvLayout("float32", *gpt2_model.kv_shape()[:2], 4, gpt2_model.kv_shape()[2], gpt2_model.fingerprint)
    inbox = KvInbox(gpt2_model.fingerprint)
    kv = [(torch.zeros(lay.tensor_shape), torch.zeros(lay.tensor_shape)) for _ in range(lay.num_layers)]
    await inbox.receive(pushes("h", kv, lay))
    assert inbox.bytes_held == lay.total_bytes

    async def decode_stream():  # SequenceStart naming the pushed cache, then the caller is gone
        pb = layout_to_pb(lay, kv_included=True)
        pb.transport, pb.handle = worker_pb2.KV_TRANSPORT_DIRECT, "h"
        yield worker_pb2.DecodeRequest(start=worker_pb2.SequenceStart(request_id="r", kv_layout=pb))
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await receive_handoff(decode_stream(), gpt2_model, kv_cache=True, inbox=inbox)
    assert inbox.bytes_held == 0 and inbox.budget.used == 0
    with pytest.raises(ProtocolError, match="has ended"):
        await inbox.receive(pushes("h", kv, lay))  # a second push of it (a retry) is refused too


async def test_read_ahead_passes_on_a_cancelled_source_instead_of_hanging():
    async def source():
        yield 1
        raise asyncio.CancelledError  # what a stream of a cancelled call may do

    async def consume():
        with ReadAhead(source()) as messages:
            return [item async for item in messages]

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(consume(), 5)


async def test_a_segment_nobody_took_goes_at_its_request_deadline(tmp_path):
    segments = SharedMemorySegments(ttl_seconds=120, directory=str(tmp_path))
    sender = SharedMemorySender(layout(), 1 << 20, segments, deadline_seconds=0.05)
    for i, (k, v) in enumerate(cache()):
        await sender.send_layer(i, k, v)
    await sender.finish()  # its message is then lost (a partition): nobody adopts the segment
    assert list(tmp_path.iterdir())
    await asyncio.sleep(0.2)
    assert not list(tmp_path.iterdir())  # long before the 120 s TTL
