"""KV wire formats: lossless model dtype, float16, bfloat16 and per-channel int8, through codec, proto and a cluster."""

from __future__ import annotations

import argparse
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg import config as cfg
from disagg.errors import KvIntegrityError
from disagg.kv import framing as wire
from disagg.kv.codec import Chunk, KvAssembler, KvLayout, encode_kv
from disagg.kv.framing import chunk_from_message, chunk_message
from disagg.pb.disagg.v1 import worker_pb2
from disagg.rpc.convert import layout_from_pb, layout_to_pb
from tests.conftest import GPT2_ARGS, start_cluster
from tests.test_e2e import generate, prompt_of, reference

LAYERS, HEADS, SEQ, HEAD_DIM = 3, 4, 37, 16


def cache(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (1, HEADS, SEQ, HEAD_DIM)
    # channels of very different magnitudes, as real K/V have: per-channel scales must cope
    spread = torch.logspace(-2, 1, HEAD_DIM).reshape(1, 1, 1, HEAD_DIM)
    return [
        ((torch.randn(shape, generator=g) * spread).to(dtype), (torch.randn(shape, generator=g) * spread).to(dtype))
        for _ in range(LAYERS)
    ]


def round_trip(layers, wire: str, model_dtype: str = "float32", chunk_bytes: int = 333, shuffle: bool = True):
    layout = KvLayout(model_dtype, LAYERS, HEADS, SEQ, HEAD_DIM, "fp-model", "" if wire == model_dtype else wire)
    chunks = list(encode_kv(layers, chunk_bytes, None if wire == model_dtype else wire))
    assert sum(len(c.data) for c in chunks) == layout.total_bytes
    if shuffle:
        random.Random(1).shuffle(chunks)
    pb_layout = layout_to_pb(layout, kv_included=True)
    assembler = KvAssembler(layout_from_pb(pb_layout), expected_fingerprint="fp-model")
    assert assembler.layout.total_bytes == pb_layout.total_bytes
    for chunk in chunks:
        assembler.add(chunk_from_message(chunk_message(chunk)))
    assert assembler.complete
    return layout, assembler.layers()


def test_lossless_default_is_bit_exact():
    layers = cache()
    layout, got = round_trip(layers, "float32")
    assert layout.wire == "float32" and layout.total_bytes == 2 * LAYERS * HEADS * SEQ * HEAD_DIM * 4
    for (k, v), (gk, gv) in zip(layers, got, strict=True):
        assert gk.dtype == torch.float32 and torch.equal(k, gk) and torch.equal(v, gv)


@pytest.mark.parametrize(("wire", "itemsize", "rel_tol"), [("float16", 2, 1e-3), ("bfloat16", 2, 8e-3)])
def test_half_formats_round_trip_within_their_precision(wire, itemsize, rel_tol):
    layers = cache()
    layout, got = round_trip(layers, wire)
    assert layout.total_bytes == 2 * LAYERS * HEADS * SEQ * HEAD_DIM * itemsize
    for (k, v), (gk, gv) in zip(layers, got, strict=True):
        for want, have in ((k, gk), (v, gv)):
            assert have.dtype == torch.float32 and have.shape == want.shape
            assert torch.all((have - want).abs() <= rel_tol * want.abs() + 1e-6)
            assert torch.equal(have, want.to(getattr(torch, wire)).float())  # exactly a cast, nothing else


def test_int8_round_trip_error_is_bounded_per_channel():
    layers = cache()
    layout, got = round_trip(layers, "int8")
    # one float32 scale per (head, channel) + one byte per value, per tensor: under 30% of fp32
    assert layout.total_bytes == 2 * LAYERS * HEADS * HEAD_DIM * (4 + SEQ)
    for (k, v), (gk, gv) in zip(layers, got, strict=True):
        for want, have in ((k, gk), (v, gv)):
            assert have.dtype == torch.float32 and have.shape == want.shape
            channel_max = want.abs().amax(dim=2, keepdim=True)
            # rounding to the nearest of 255 levels: at most half a step (max / 127 / 2) off, per channel
            assert torch.all((have - want).abs() <= channel_max / 127 / 2 * (1 + 1e-5) + 1e-7)
            # a channel's largest value survives exactly up to float rounding
            rel = (have - want).norm() / want.norm()
            assert rel < 0.01


def test_int8_all_zero_and_constant_channels():
    zeros = torch.zeros(1, HEADS, SEQ, HEAD_DIM)
    const = torch.full((1, HEADS, SEQ, HEAD_DIM), -3.5)
    layers = [(zeros, const)] * LAYERS
    _, got = round_trip(layers, "int8", shuffle=False)
    for gk, gv in got:
        assert torch.equal(gk, zeros)
        assert torch.allclose(gv, const, rtol=1e-6, atol=0)


@pytest.mark.parametrize("wire", ["float16", "int8"])
def test_wire_format_converts_back_to_a_half_model_dtype(wire):
    layers = cache(torch.bfloat16)
    _, got = round_trip(layers, wire, model_dtype="bfloat16")
    for (k, _), (gk, _) in zip(layers, got, strict=True):
        assert gk.dtype == torch.bfloat16
        assert (gk.float() - k.float()).abs().max() <= 0.02 * k.float().abs().max()


def test_fingerprint_still_checked_and_unknown_wire_refused():
    layout = KvLayout("float32", LAYERS, HEADS, SEQ, HEAD_DIM, "fp-model", "int8")
    with pytest.raises(KvIntegrityError, match="made by model"):
        KvAssembler(layout, expected_fingerprint="another-model")
    KvAssembler(layout, expected_fingerprint="fp-model")  # the wire dtype is not part of the fingerprint
    with pytest.raises(KvIntegrityError, match="wire dtype"):
        KvAssembler(KvLayout("float32", LAYERS, HEADS, SEQ, HEAD_DIM, "fp-model", "int4"))


def test_corrupted_int8_chunk_is_refused():
    layout = KvLayout("float32", LAYERS, HEADS, SEQ, HEAD_DIM, "fp", "int8")
    chunk = next(iter(encode_kv(cache(), 256, "int8")))
    bad = bytearray(chunk.data)
    bad[0] ^= 1
    with pytest.raises(KvIntegrityError, match="checksum"):
        KvAssembler(layout).add(type(chunk)(chunk.tensor_index, chunk.offset, bytes(bad), chunk.crc32))


def test_flag_and_environment(monkeypatch):
    def parse(argv):
        parser = argparse.ArgumentParser()
        cfg.add_flags(parser, cfg.WorkerConfig, role="prefill")
        return cfg.worker_config(parser.parse_args(argv))

    assert parse([]).kv_wire_dtype == "auto"
    assert parse(["--kv-wire-dtype", "bfloat16"]).kv_wire_dtype == "bfloat16"
    monkeypatch.setenv("DISAGG_KV_WIRE_DTYPE", "int8")
    assert parse([]).kv_wire_dtype == "int8"
    assert parse(["--kv-wire-dtype", "float16"]).kv_wire_dtype == "float16"


@pytest.fixture(scope="module", params=[["--kv-wire-dtype", "int8"], ["--kv-wire-dtype", "bfloat16", "--kv-layerwise"]])
def lossy_cluster(request):
    running = start_cluster(GPT2_ARGS, prefill_args=request.param)
    yield running
    running.cluster.stop()


@pytest.fixture(scope="module")
def layerwise_cluster():
    running = start_cluster(GPT2_ARGS, prefill_args=["--kv-layerwise"])
    yield running
    running.cluster.stop()


@pytest.mark.parametrize("n_tokens", [1, 13, 700])
async def test_layerwise_streaming_keeps_greedy_output_identical(layerwise_cluster, gpt2_model, n_tokens):
    prompt = prompt_of(gpt2_model.tokenizer, n_tokens)
    expected = reference(gpt2_model, prompt, 12)
    got = await generate(layerwise_cluster.address, prompt=prompt, max_new_tokens=12, ignore_eos=True)
    assert got.token_ids == expected and got.finish_reason == "length"


async def test_cluster_with_lossy_wire_dtype_serves(lossy_cluster, gpt2_model):
    prompt = prompt_of(gpt2_model.tokenizer, 300)  # 300 tokens: ~10 MB fp32, several chunks per tensor
    expected = reference(gpt2_model, prompt, 12)
    got = await generate(lossy_cluster.address, prompt=prompt, max_new_tokens=12, ignore_eos=True)
    assert got.finish_reason == "length" and got.completion_tokens == 12 and len(got.token_ids) == 12
    assert got.token_ids[0] == expected[0]  # the first token comes from prefill, before any conversion


@settings(max_examples=200, deadline=None)
@given(
    tensor_index=st.integers(0, 2**32 - 1),
    offset=st.integers(0, 2**64 - 1),
    data=st.binary(max_size=3000),
    crc=st.integers(0, 2**32 - 1),
)
def test_chunk_messages_by_hand_are_the_protobuf_messages(tensor_index, offset, data, crc):
    """The hand-written KvChunk codec (no upb copies) writes what protobuf writes and reads what protobuf reads."""
    fields = dict(tensor_index=tensor_index, offset=offset, data=data, crc32=crc)
    raw = chunk_message(Chunk(tensor_index, offset, memoryview(data), crc))
    for message_type in (worker_pb2.PrefillResponse, worker_pb2.DecodeRequest, worker_pb2.PushKvRequest):
        assert raw == message_type(kv_chunk=fields).SerializeToString()
    back = chunk_from_message(raw)
    assert (back.tensor_index, back.offset, bytes(back.data), back.crc32) == (tensor_index, offset, data, crc)
    # fields in another order, repeated (the last wins) or with explicit zeros are still read as protobuf reads them
    reordered = (
        worker_pb2.KvChunk(crc32=crc).SerializeToString()
        + worker_pb2.KvChunk(tensor_index=tensor_index ^ 1, offset=offset, data=data).SerializeToString()
        + bytes([0x08, 0])
    )
    raw = wire.KV_CHUNK_TAG + wire._varint(len(reordered)) + reordered
    parsed = worker_pb2.DecodeRequest.FromString(raw).kv_chunk
    back = chunk_from_message(raw)
    assert (back.tensor_index, back.offset, bytes(back.data), back.crc32) == (
        parsed.tensor_index,
        parsed.offset,
        parsed.data,
        parsed.crc32,
    )


def test_chunk_reader_leaves_anything_unexpected_to_protobuf():
    """Other events, unknown fields and malformed bytes give None: protobuf then parses them or refuses them."""
    good = chunk_message(Chunk(1, 2, b"abc", 3))
    start = worker_pb2.DecodeRequest(start=worker_pb2.SequenceStart(request_id="r")).SerializeToString()
    unknown = worker_pb2.KvChunk(data=b"x").SerializeToString() + bytes([0x28, 1])  # field 5: not in KvChunk
    for raw in (
        start,
        b"",
        good[:-1],
        good + b"\x00",
        good[:1] + b"\xff" * 11,
        wire.KV_CHUNK_TAG + wire._varint(len(unknown)) + unknown,
    ):
        assert chunk_from_message(raw) is None
    deserialize = wire.handoff_deserializer(worker_pb2.DecodeRequest)
    assert wire.event_of(deserialize(start)) == "start" and wire.event_of(deserialize(good)) == "kv_chunk"
    with pytest.raises(Exception):  # noqa: B017 (protobuf's DecodeError; gRPC turns it into a status)
        deserialize(good[:-1])


def test_every_handoff_message_carries_the_chunk_at_the_hand_framed_field_number():
    for message in wire.HANDOFF_MESSAGES:
        assert message.DESCRIPTOR.fields_by_name["kv_chunk"].number == wire.KV_CHUNK_FIELD, message
