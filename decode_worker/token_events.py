"""One call's sequences in the engine, as the call sees them: the engine thread's token events delivered to the
call's event loop and read in order, and the sequences still running cancelled when the call ends early.

Both services of a decode worker stream this way: DecodeService (handed-over sequences) and AggregatedService
(prefilled here).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from decode_worker.forks import Deliver
from disagg.engine.decode import DecodeEngine, DecodeSequence, TokenEvent


class TokenEvents:
    """`async for index, event in events` while any of `running` (index -> sequence) runs, inside `with events`.

    `ended(seq)` is called once per sequence: when it finishes (now: a closed stream is finalized later, maybe much
    later), or on leaving the `with` block early (client gone, deadline passed, a failure), where the sequences still
    running are cancelled in the engine, which frees their KV at its next step. An engine failure is raised.
    """

    def __init__(self, engine: DecodeEngine, ended: Callable[[DecodeSequence], object]):
        self.engine, self.ended = engine, ended
        self.running: dict[int, DecodeSequence] = {}
        self._queue: asyncio.Queue[tuple[int, TokenEvent | BaseException]] = asyncio.Queue()

    def deliver_to(self, index: int) -> Deliver:
        """Sequence `index`'s delivery, called on the call's loop (the engine notifies it once per step)."""
        return lambda event: self._queue.put_nowait((index, event))

    def __enter__(self) -> TokenEvents:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for seq in self.running.values():
            self.engine.cancel(seq.request_id)
            self.ended(seq)

    def __aiter__(self) -> TokenEvents:
        return self

    async def __anext__(self) -> tuple[int, TokenEvent]:
        if not self.running:
            raise StopAsyncIteration
        index, event = await self._queue.get()
        if isinstance(event, BaseException):
            raise event
        if event.finish_reason is not None:
            self.ended(self.running.pop(index))
        return index, event
