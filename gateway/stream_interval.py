"""Stream interval: a sequence's tokens coalesced into one message per K tokens or T milliseconds.

Each message costs the same serialization, write and (HTTP) SSE framing whatever it carries, so at high
concurrency fewer, fuller messages leave more CPU for the model. The first message of each sequence always goes
at once (time to first token is unchanged), and a sequence's last message (finish_reason) ends its buffer. T is
checked when the sequence's next tokens arrive (no timer: decode steps keep coming while a sequence runs).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator

from disagg.config import StreamInterval
from disagg.pb.disagg.v1 import gateway_pb2


def merge(into: gateway_pb2.GenerateResponse, later: gateway_pb2.GenerateResponse) -> None:
    """Append `later` (same sequence) to `into`: text, tokens and logprobs in order, the last message's ending."""
    into.text += later.text
    into.token_ids.extend(later.token_ids)
    into.logprobs.extend(later.logprobs)
    if later.finish_reason:
        into.finish_reason = later.finish_reason
    if later.HasField("usage"):
        into.usage.CopyFrom(later.usage)
    if later.HasField("metrics"):
        into.metrics.CopyFrom(later.metrics)
    if later.request_id and not into.request_id:
        into.request_id = later.request_id


async def coalesced(
    responses: AsyncGenerator[gateway_pb2.GenerateResponse, None], interval: StreamInterval
) -> AsyncGenerator[gateway_pb2.GenerateResponse, None]:
    """`responses` with each sequence's messages merged per `interval` (unchanged when it is 1 token)."""
    async with contextlib.aclosing(responses):
        if not interval.enabled:
            async for response in responses:
                yield response
            return
        held: dict[int, tuple[gateway_pb2.GenerateResponse, float]] = {}
        started: set[int] = set()
        seconds = interval.milliseconds / 1000
        try:
            async for response in responses:
                now, index = time.monotonic(), response.index
                if index in held:
                    merge(held[index][0], response)
                else:
                    held[index] = (response, now)
                buffer, since = held[index]
                if (
                    index not in started
                    or buffer.finish_reason
                    or len(buffer.token_ids) >= interval.tokens
                    or (seconds and now - since >= seconds)
                ):
                    started.add(index)
                    del held[index]
                    yield buffer
            for buffer, _ in held.values():  # a source that ended without finishing a sequence
                yield buffer
        except Exception:
            for buffer, _ in held.values():  # what was generated before the failure still reaches the client
                yield buffer
            raise
