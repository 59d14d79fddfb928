"""KV caches through shared memory (co-located workers): /dev/shm segments made by prefill, adopted by decode."""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import time
import uuid
from dataclasses import dataclass

import torch

from disagg.errors import KvIntegrityError, ProtocolError
from disagg.kv.codec import KvAssembler
from disagg.pb.disagg.v1 import worker_pb2

SHM_DIR = "/dev/shm"
SHM_NAME = re.compile(r"disagg-kv-[0-9a-f]{32}")


@dataclass
class _Segment:
    name: str
    memory: mmap.mmap


class SharedMemorySegments:
    """The prefill worker's /dev/shm segments: created per handoff, removed by the decode worker that reads them,
    or here after `ttl_seconds` (a handoff nobody took) and at shutdown."""

    def __init__(self, ttl_seconds: float = 120.0, directory: str = SHM_DIR):
        self.ttl, self.directory = ttl_seconds, directory
        self._created: dict[str, float] = {}

    def create(self, size: int) -> _Segment:
        self.sweep()
        name = f"disagg-kv-{uuid.uuid4().hex}"
        fd = os.open(os.path.join(self.directory, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)  # pages up front, in bulk
        finally:
            os.close(fd)
        self._created[name] = time.monotonic()
        return _Segment(name, memory)

    def remove(self, name: str) -> None:
        self._created.pop(name, None)
        with contextlib.suppress(FileNotFoundError):  # the decode worker took it
            os.unlink(os.path.join(self.directory, name))

    def sweep(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for name in [n for n, created in self._created.items() if now - created > self.ttl]:
            self.remove(name)

    def remove_all(self) -> None:
        for name in list(self._created):
            self.remove(name)

    def remove_orphans(self) -> int:
        """At start: remove segments older than the TTL that a killed prefill worker (any, on this host) left."""
        removed, cutoff = 0, time.time() - self.ttl
        for entry in os.scandir(self.directory):
            if SHM_NAME.fullmatch(entry.name) and entry.stat().st_mtime < cutoff:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        return removed


def adopt_shared_memory(message: worker_pb2.KvSharedMemory, assembler: KvAssembler, directory: str = SHM_DIR) -> None:
    """Give the assembler the segment's tensors without copying them (checksums checked), and remove its name.

    The name comes from the network: only the project's own segment names are opened, and the size must match.
    The mapping is private (copy-on-write) and lives as long as the tensors viewing it.
    """
    layout = assembler.layout
    if not SHM_NAME.fullmatch(message.name):
        raise ProtocolError(f"shared-memory KV segment name {message.name!r} is not one of ours")
    if message.size != layout.total_bytes or len(message.tensor_crc32) != 2 * layout.num_layers:
        raise KvIntegrityError(
            f"shared-memory KV segment of {message.size} bytes, {len(message.tensor_crc32)} "
            f"checksums does not match its layout ({layout.total_bytes} bytes)"
        )
    path = os.path.join(directory, message.name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KvIntegrityError(
            f"shared-memory KV segment {message.name} does not exist on this host (are prefill "
            "and decode co-located, sharing /dev/shm?)"
        ) from None
    try:
        os.unlink(path)  # the mapping outlives the name; nobody else needs it
        if os.fstat(fd).st_size != message.size:
            raise KvIntegrityError(f"shared-memory KV segment {message.name} is not {message.size} bytes")
        memory = mmap.mmap(fd, message.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    data = torch.frombuffer(memory, dtype=torch.uint8)
    size = layout.tensor_bytes
    for index, crc in enumerate(message.tensor_crc32):
        assembler.adopt(index, data[index * size : (index + 1) * size], crc)
