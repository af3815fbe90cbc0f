"""The bytes an append task queued for the engine, and the loop that feeds them to it.

``write()`` on the task only queues bytes (:meth:`Feed.push`) and wakes the pump; the pump
(:meth:`Feed.run`, an asyncio task) hands everything queued to the maildrop session in one
``write`` per wake-up, then commits once the message has ended. The producer's flow control
reads :attr:`Feed.backlog`: bytes waiting here plus the batch the engine is writing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from maildrop import Delivery, DeliverySession

__all__ = ["Feed"]


class Feed:
    """One append task's queue of bytes for the engine."""

    __slots__ = ("_inflight", "_queue", "_queued", "_wake")

    def __init__(self) -> None:
        self._queue: list[bytes] = []
        self._queued = 0
        self._inflight = 0
        self._wake: asyncio.Future[None] | None = None

    @property
    def backlog(self) -> int:
        """Bytes queued for the engine: waiting here, or in a write batch not yet done."""
        return self._queued + self._inflight

    def push(self, data: bytes) -> None:
        """Queue *data* and wake the pump."""
        self._queue.append(data)
        self._queued += len(data)
        self.wake()

    def wake(self) -> None:
        """Wake the pump if it waits for bytes (or for the end of the message)."""
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _take(self) -> bytes:
        chunks, self._queue, self._queued = self._queue, [], 0
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def run(
        self,
        session: DeliverySession,
        loop: asyncio.AbstractEventLoop,
        ended: Callable[[], bool],
        drained: Callable[[], None],
    ) -> Delivery:
        """Write what is queued into *session* until *ended*, then commit it.

        *drained* is called after each batch the engine took. Raises what the session
        raises (the caller aborts it).

        **Cancellation:** the session's write or commit is cancelled (maildrop then cleans
        up); the caller aborts the session.
        """
        while True:
            if self._queue:
                data = self._take()
                self._inflight = len(data)
                await session.write(data)
                self._inflight = 0
                drained()
            elif ended():
                break
            else:
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
        return await session.commit()
