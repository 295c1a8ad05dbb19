"""The bridge from the engine's thread to the event loop: a request's events as an async iterator.

A `RequestHandle` is a blocking iterator fed by the engine loop. Each handle gets one daemon thread that
iterates it and hands every item to the event loop with `call_soon_threadsafe`, so no handler ever blocks
the loop and the engine never waits on HTTP. The thread ends with the handle's `Result`, which cancelling
the handle brings at the engine's next step. The threads are as many as the requests in flight, which
the engine bounds (decode slots plus its waiting queue).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence

from serve.engine import RequestHandle, Result, TokenEvent


class MergedEvents:
    """The events of several handles (the `n` choices of one request) as `(index, item)` in arrival order;
    iteration ends once every handle has delivered its `Result`. `on_result` sees every `Result` from the
    forwarding thread, also those of requests cancelled after their client went away."""

    def __init__(self, handles: Sequence[RequestHandle], on_result: Callable[[Result], None] = lambda r: None):
        self.handles = list(handles)
        self._on_result = on_result
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        for index, handle in enumerate(self.handles):
            threading.Thread(target=self._pump, args=(index, handle), daemon=True,
                             name=f"events-{handle.id}").start()

    def _pump(self, index: int, handle: RequestHandle) -> None:
        for item in handle:
            if isinstance(item, Result):
                self._on_result(item)
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, item))
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                handle.cancel()

    async def __aiter__(self) -> AsyncIterator[tuple[int, TokenEvent | Result]]:
        remaining = len(self.handles)
        while remaining:
            index, item = await self._queue.get()
            if isinstance(item, Result):
                remaining -= 1
            yield index, item

    def cancel(self) -> None:
        """Cancel every handle that has not finished (the client went away, or a sibling failed)."""
        for handle in self.handles:
            if not handle.done:
                handle.cancel()
