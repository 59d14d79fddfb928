"""A handoff that leaves out the KV its receiver already holds (decode-side prefix reuse).

A decode worker with a prefix cache (`--local-prefill`) keeps each finished sequence's prompt + reply in blocks;
the next turn of that conversation, when it is too long to prefill there, is prefilled remotely and handed back to
it. It then needs only the KV after the blocks it holds: the gateway learns how many from the worker's decline
(`LocalPrefillDeclined.held_prefix_tokens`), asks the prefill worker for the rest (`KvDestination.prefix_tokens`),
and the prefill worker's layout names the blocks left out by their chain keys (`KvLayout.prefix_block_keys`,
computed from its own tokens). The receiver checks the keys against the sequence's tokens and pins the blocks at
SequenceStart, before the cache is sent; a block evicted meanwhile is DATA_LOSS, never wrong tokens, and the
gateway hands the sequence over again, whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from disagg.errors import InvalidRequest, KvIntegrityError
from disagg.kv.prefix_cache import PrefixCache, PrefixHit, block_keys
from disagg.pb.disagg.v1 import worker_pb2


@dataclass(frozen=True)
class SkippedPrefix:
    """The leading tokens a sender leaves out, and the chain keys of their blocks."""

    tokens: int = 0
    block_tokens: int = 0
    keys: tuple[bytes, ...] = ()


def skipped_prefix(destination: worker_pb2.KvDestination, input_ids: Sequence[int], fingerprint: str) -> SkippedPrefix:
    """What the sender of `input_ids`' KV leaves out for `destination` (nothing unless it asks); INVALID_ARGUMENT
    for a prefix that is not whole blocks or not shorter than the sequence."""
    tokens, block = destination.prefix_tokens, destination.prefix_block_tokens
    if tokens == 0:
        return SkippedPrefix()
    if block <= 0 or tokens % block:
        raise InvalidRequest(
            f"kv_destination.prefix_tokens={tokens} is not a whole number of blocks of prefix_block_tokens={block}"
        )
    if tokens >= len(input_ids):
        raise InvalidRequest(
            f"kv_destination.prefix_tokens={tokens} leaves nothing of the sequence's {len(input_ids)} tokens to send"
        )
    return SkippedPrefix(tokens, block, tuple(block_keys(input_ids[:tokens], fingerprint, block)))


def set_skipped(layout: worker_pb2.KvLayout, skipped: SkippedPrefix) -> None:
    layout.prefix_tokens, layout.prefix_block_tokens = skipped.tokens, skipped.block_tokens
    layout.prefix_block_keys[:] = skipped.keys


def pin_held_prefix(cache: PrefixCache | None, start: worker_pb2.SequenceStart) -> PrefixHit | None:
    """The blocks a handoff left out (None when it left out nothing), pinned until released; DATA_LOSS when this
    worker does not hold every one of them or the keys do not name the sequence's own tokens."""
    layout = start.kv_layout
    if layout.prefix_tokens == 0:
        return None
    context = [*start.prompt_token_ids, *start.generated_token_ids]
    count = len(layout.prefix_block_keys)
    if cache is None or not cache.enabled:
        raise KvIntegrityError(
            f"the handoff leaves out {layout.prefix_tokens} tokens' KV, and this decode worker keeps no prefix cache"
        )
    if layout.prefix_block_tokens != cache.block_tokens or count * cache.block_tokens != layout.prefix_tokens:
        raise KvIntegrityError(
            f"the handoff's prefix ({layout.prefix_tokens} tokens, {count} blocks of {layout.prefix_block_tokens}) "
            f"does not match this decode worker's blocks of {cache.block_tokens} tokens"
        )
    if layout.prefix_tokens >= len(context) or list(layout.prefix_block_keys) != cache.keys(context)[:count]:
        raise KvIntegrityError("the handoff's prefix block keys are not those of the sequence's tokens")
    hit = cache.pin_blocks(context, layout.prefix_block_keys)
    if hit is None:
        raise KvIntegrityError(
            f"this decode worker no longer holds the {count} prefix blocks the handoff left out (evicted since); "
            "hand the sequence over whole"
        )
    return hit
