"""Async stream helpers shared by the gateway's relay and the decode worker's handoff receive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


class ReadAhead:
    """An async iterator over `messages` with up to `depth` of them received ahead by a separate task.

    Receiving the next message then overlaps with what the consumer does with this one (the gateway's relay of a
    KV cache from one call to another, the decode worker's checks and copies of its chunks). An error of
    `messages` is raised here, after the messages that came before it. Use it as a context manager: leaving the
    block stops the reading task.
    """

    def __init__(self, messages: AsyncIterator[Any], depth: int = 8):
        # (True, message) for each message, then (False, the error or None) for the end
        self._queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue(depth)
        self._closed = False
        self._task = asyncio.create_task(self._pump(messages))

    async def _pump(self, messages: AsyncIterator[Any]) -> None:
        end: BaseException | None = None
        try:
            async for message in messages:
                await self._queue.put((True, message))
        except BaseException as error:  # even a cancellation of the source reaches the consumer, which would
            if self._closed:  # otherwise wait forever; only our own close ends the pump quietly
                raise
            end = error
        await self._queue.put((False, end))

    def __aiter__(self) -> ReadAhead:
        return self

    async def __anext__(self) -> Any:
        more, item = await self._queue.get()
        if more:
            return item
        self._queue.put_nowait((False, item))  # the end stays the end
        if item is not None:
            raise item
        raise StopAsyncIteration

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the reading task (what leaving the `with` block does)."""
        self._closed = True
        self._task.cancel()
