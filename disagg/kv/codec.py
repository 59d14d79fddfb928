"""The KV cache on the wire: tensors to ~1 MiB checksummed chunks and back, with explicit dtype and shape.

Layout: layer-major, for each layer K then V, each a C-contiguous [1, kv_heads, seq_len, head_dim] tensor as raw
little-endian bytes. Nothing here unpickles anything: bytes from the network only ever become tensor storage.

Wire formats (`KvLayout.wire_dtype`; empty = the model's own dtype, lossless): `float16` and `bfloat16` send each
tensor cast to that dtype; `int8` sends, per tensor, kv_heads * head_dim float32 scales (one per head and channel,
the channel's max |x| over the sequence / 127) followed by the int8 values round(x / scale). The receiver converts
back to the model's dtype (`layout.dtype`) once the tensor is complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from isal.isal_zlib import crc32  # zlib's CRC-32 (ISA-L: the same checksum, several times faster)

from disagg.config import KV_WIRE_FORMATS as WIRE_FORMATS  # a KvLayout's wire_dtype
from disagg.errors import KvIntegrityError
from disagg.model.dtypes import DTYPES
from disagg.model.kv_layers import KvLayers

CHUNK_BYTES = 1 << 20
INT8_MAX = 127


@dataclass(frozen=True)
class KvLayout:
    """Shape, dtype and identity of one sequence's KV cache (the domain twin of the proto message)."""

    dtype: str
    num_layers: int
    kv_heads: int
    seq_len: int
    head_dim: int
    model_fingerprint: str
    wire_dtype: str = ""  # "" = dtype (lossless); else one of WIRE_FORMATS

    @property
    def tensor_shape(self) -> tuple[int, int, int, int]:
        return (1, self.kv_heads, self.seq_len, self.head_dim)

    @property
    def wire(self) -> str:
        return self.wire_dtype or self.dtype

    @property
    def tensor_bytes(self) -> int:
        """Bytes of one tensor on the wire (int8: its float32 scales, then its values)."""
        if self.wire == "int8":
            return self.kv_heads * self.head_dim * (4 + self.seq_len)
        return self.kv_heads * self.seq_len * self.head_dim * DTYPES[self.wire].itemsize

    @property
    def cache_bytes(self) -> int:
        """Bytes of the cache once received, in the model's dtype (what the receiver holds)."""
        return 2 * self.num_layers * self.kv_heads * self.seq_len * self.head_dim * DTYPES[self.dtype].itemsize

    @property
    def total_bytes(self) -> int:
        return 2 * self.num_layers * self.tensor_bytes


@dataclass(frozen=True)
class Chunk:
    tensor_index: int
    offset: int
    data: bytes | memoryview
    crc32: int


def tensor_bytes_view(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is already contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    # numpy declares ndarray.__buffer__ only for Python >= 3.12 (it has the buffer protocol on every version)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def quantize_int8(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales [1, heads, 1, head_dim] float32, values int8) of a [1, heads, seq, head_dim] tensor."""
    x = tensor.float()
    amax = x.abs().amax(dim=2, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return scale, torch.round(x / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def dequantize_int8(scale: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (values.float() * scale).to(dtype)


def wire_bytes(tensor: torch.Tensor, wire: str) -> memoryview:
    """The bytes of one tensor in wire format `wire` (a dtype name, or "int8")."""
    tensor = tensor.detach().cpu()
    if wire == "int8":
        scale, values = quantize_int8(tensor)
        packed = torch.cat([scale.reshape(-1).view(torch.uint8), values.reshape(-1).view(torch.uint8)]).numpy()
        return memoryview(packed).cast("B")  # type: ignore[arg-type]  # (numpy's stubs: see tensor_bytes_view)
    return tensor_bytes_view(tensor.to(DTYPES[wire]))


def encode_tensor(
    tensor_index: int, tensor: torch.Tensor, chunk_bytes: int = CHUNK_BYTES, wire: str | None = None
) -> Iterator[Chunk]:
    """Chunks of one tensor (bfloat16 has no numpy dtype, hence the uint8 view); `wire` None = its own dtype."""
    raw = tensor_bytes_view(tensor.cpu()) if wire is None else wire_bytes(tensor, wire)
    for offset in range(0, len(raw), chunk_bytes):
        piece = raw[offset : offset + chunk_bytes]
        yield Chunk(tensor_index, offset, piece, crc32(piece))


def encode_kv(layers: KvLayers, chunk_bytes: int = CHUNK_BYTES, wire: str | None = None) -> Iterator[Chunk]:
    """Chunks of a whole cache, in layout order; `wire` names the wire format (None = the tensors' own dtype)."""
    for layer, (key, value) in enumerate(layers):
        yield from encode_tensor(2 * layer, key, chunk_bytes, wire)
        yield from encode_tensor(2 * layer + 1, value, chunk_bytes, wire)


class KvAssembler:
    """Receives chunks in any order and writes them straight into preallocated tensors.

    Each chunk is checked (index, bounds, CRC-32) before it touches memory; the cache is usable once every byte
    has arrived exactly once.
    """

    def __init__(self, layout: KvLayout, expected_fingerprint: str | None = None):
        if layout.dtype not in DTYPES:
            raise KvIntegrityError(f"unknown KV dtype {layout.dtype!r}")
        if layout.wire not in WIRE_FORMATS:
            raise KvIntegrityError(f"unknown KV wire dtype {layout.wire_dtype!r}")
        if expected_fingerprint is not None and layout.model_fingerprint != expected_fingerprint:
            raise KvIntegrityError(
                f"KV cache was made by model {layout.model_fingerprint!r}, this worker serves {expected_fingerprint!r}"
            )
        if min(layout.num_layers, layout.kv_heads, layout.seq_len, layout.head_dim) <= 0:
            raise KvIntegrityError(f"bad KV layout {layout}")
        self.layout = layout
        if layout.wire == "int8":  # scales + values per tensor, converted in layers()
            self._tensors = [torch.empty(layout.tensor_bytes, dtype=torch.uint8) for _ in range(2 * layout.num_layers)]
        else:
            dtype = DTYPES[layout.wire]
            self._tensors = [torch.empty(layout.tensor_shape, dtype=dtype) for _ in range(2 * layout.num_layers)]
        self._raw = [t.view(-1).view(torch.uint8).numpy() for t in self._tensors]
        self._seen: set[tuple[int, int]] = set()
        self.received = 0

    def add(self, chunk: Chunk) -> None:
        if not 0 <= chunk.tensor_index < len(self._raw):
            raise KvIntegrityError(f"KV chunk names tensor {chunk.tensor_index}, layout has {len(self._raw)}")
        target = self._raw[chunk.tensor_index]
        end = chunk.offset + len(chunk.data)
        if chunk.offset < 0 or end > target.size:
            raise KvIntegrityError(f"KV chunk [{chunk.offset}, {end}) outside tensor of {target.size} bytes")
        if (chunk.tensor_index, chunk.offset) in self._seen:
            raise KvIntegrityError(f"KV chunk of tensor {chunk.tensor_index} at {chunk.offset} arrived twice")
        if crc32(chunk.data) != chunk.crc32:
            raise KvIntegrityError(f"KV chunk of tensor {chunk.tensor_index} at {chunk.offset} fails its checksum")
        if self.received + len(chunk.data) > self.layout.total_bytes:
            raise KvIntegrityError("more KV bytes than the layout announced")
        target[chunk.offset : end] = np.frombuffer(chunk.data, dtype=np.uint8)
        self._seen.add((chunk.tensor_index, chunk.offset))
        self.received += len(chunk.data)

    def adopt(self, tensor_index: int, data: torch.Tensor, crc32_of_data: int) -> None:
        """Take one whole tensor's wire bytes (a uint8 tensor, e.g. over shared memory) without copying them.

        Checked like a chunk that covers the tensor; the cache then keeps `data` (and what it views) alive.
        """
        if not 0 <= tensor_index < len(self._tensors) or data.numel() != self._raw[tensor_index].size:
            raise KvIntegrityError(f"KV tensor {tensor_index} of {data.numel()} bytes does not fit the layout")
        if any(index == tensor_index for index, _ in self._seen):
            raise KvIntegrityError(f"KV tensor {tensor_index} arrived twice")
        if crc32(data.numpy()) != crc32_of_data:
            raise KvIntegrityError(f"KV tensor {tensor_index} fails its checksum")
        target = self._tensors[tensor_index]
        self._tensors[tensor_index] = data.view(target.dtype).reshape(target.shape)
        self._seen.add((tensor_index, 0))
        self.received += data.numel()

    @property
    def complete(self) -> bool:
        return self.received == self.layout.total_bytes

    def layers(self) -> KvLayers:
        if not self.complete:
            raise KvIntegrityError(f"KV cache incomplete: {self.received} of {self.layout.total_bytes} bytes")
        tensors = [self._to_model_dtype(t) for t in self._tensors]
        return [(tensors[2 * i], tensors[2 * i + 1]) for i in range(self.layout.num_layers)]

    def _to_model_dtype(self, tensor: torch.Tensor) -> torch.Tensor:
        layout, dtype = self.layout, DTYPES[self.layout.dtype]
        if layout.wire != "int8":
            return tensor if tensor.dtype == dtype else tensor.to(dtype)
        split = 4 * layout.kv_heads * layout.head_dim
        scale = tensor[:split].view(torch.float32).reshape(1, layout.kv_heads, 1, layout.head_dim)
        values = tensor[split:].view(torch.int8).reshape(layout.tensor_shape)
        return dequantize_int8(scale, values, dtype)
