"""Names of the KV transports (`--kv-transport`), derived from worker.proto's KvTransport enum."""

from __future__ import annotations

from typing import cast

from disagg.pb.disagg.v1 import worker_pb2

RELAYED = worker_pb2.KV_TRANSPORT_RELAYED
DIRECT = worker_pb2.KV_TRANSPORT_DIRECT
SHARED_MEMORY = worker_pb2.KV_TRANSPORT_SHARED_MEMORY
_PREFIX = "KV_TRANSPORT_"


def _flag_name(enum_name: str) -> str:
    return enum_name.removeprefix(_PREFIX).lower().replace("_", "-")


# "relayed" -> KV_TRANSPORT_RELAYED, ...: every value but UNSPECIFIED (which means relayed on the wire).
# (EnumTypeWrapper.items() is typed as plain ints; they are this enum's values.)
TRANSPORT_VALUES: dict[str, worker_pb2.KvTransport] = {
    _flag_name(name): cast("worker_pb2.KvTransport", value)
    for name, value in worker_pb2.KvTransport.items()
    if value != 0
}
TRANSPORT_NAMES: dict[int, str] = {value: name for name, value in TRANSPORT_VALUES.items()}
KV_TRANSPORTS: tuple[str, ...] = tuple(TRANSPORT_VALUES)


def transport_name(value: int) -> str:
    """The flag name of a KvTransport value; unset (0) is the default, relayed."""
    return TRANSPORT_NAMES.get(value or RELAYED, "relayed")
