"""Flow control of a server: the turn budget and read buffer its connections share."""

from __future__ import annotations

import asyncio

__all__ = ["READ_SIZE", "TURN_BUDGET", "ReadBuffer", "TurnBudget"]

#: Message bytes all connections together may process in one turn of the event loop.
TURN_BUDGET = 256 * 1024
#: Size of the receive buffer that every connection of a server reads into.
READ_SIZE = 256 * 1024


class ReadBuffer:
    """One receive buffer shared by the connections of a server (of one event loop).

    asyncio reads into :meth:`Connection.get_buffer`'s buffer and calls
    :meth:`Connection.buffer_updated` right after, before any other callback runs, and the
    core copies the bytes out at once: so one buffer serves every connection. Reading into
    it spares the allocation (and, for a large buffer, the ``mmap``, ``mremap`` and
    ``munmap``, and the page faults) of a fresh ``bytes`` object per ``recv``.
    """

    def __init__(self, size: int = READ_SIZE) -> None:
        self.view = memoryview(bytearray(size))


class TurnBudget:
    """Spread message processing over event-loop turns, so no turn runs long.

    asyncio runs every callback that is ready in one turn: 50 busy connections each
    scanning a buffer would hold the loop for all 50. A connection takes from this budget
    before it processes message bytes and waits for the next turn when it is spent.
    """

    def __init__(self, per_turn: int = TURN_BUDGET) -> None:
        self.per_turn = per_turn
        self.left = per_turn
        self._reset_soon = False
        self._waiters: list[asyncio.Future[None]] = []

    async def take(self, n: int) -> None:
        """Wait until this turn has budget left, then spend *n* bytes of it.

        **Cancellation:** nothing was spent.
        """
        loop = asyncio.get_running_loop()
        while self.left <= 0:
            fut = loop.create_future()
            self._waiters.append(fut)
            self._schedule(loop)
            await fut
        self.left -= n
        self._schedule(loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._reset_soon:
            self._reset_soon = True
            loop.call_soon(self._reset)

    def _reset(self) -> None:
        self._reset_soon = False
        self.left = self.per_turn
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
