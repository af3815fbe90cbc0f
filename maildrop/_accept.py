"""Accepting connections: one :class:`Acceptor` per listening socket, and the
:class:`Share` that spreads connections evenly over forked worker processes.

Why not asyncio's own server: worker processes share one accept queue per socket, and
asyncio accepts every queued connection of a burst in whichever process wakes first. A
client that opens its sessions at once (a Postfix LMTP client, ``smtp-source -s 8``) then
often lands all of them in one process, and one CPU serves them while the other idles. So
each worker publishes how many connections it holds in a map shared with its siblings, and
takes a queued connection only while it holds no more than any sibling; the others leave
the connection in the queue for it. A worker that holds back looks again after
:data:`HOLD_BACK` seconds, and once it has waited :data:`MAX_DEFER` (the sibling may be
stuck, resting or gone) it takes every queued connection: a client is never kept waiting
longer than that for a balance. A worker counts for its siblings from its first
:meth:`Acceptor.start` until its server closes.

Accept errors that mean "out of resources" (``EMFILE``...) pause the listener for
:data:`RETRY_SECONDS`; the errors Linux says to retry (a network or protocol error of one
queued connection) move on to the next one. Either is logged once per :data:`LOG_EVERY`
seconds at most.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import socket
from collections.abc import Callable

__all__ = ["HOLD_BACK", "MAX_DEFER", "RETRY_SECONDS", "Acceptor", "Share"]

log = logging.getLogger("maildrop")

#: Seconds a worker that holds more connections than a sibling waits before looking again.
HOLD_BACK = 0.002
#: Seconds after which a worker takes a queued connection whatever its siblings hold.
MAX_DEFER = 0.05
#: Seconds a listener rests after an accept failed for want of resources (EMFILE...).
RETRY_SECONDS = 1.0
#: A listener's accept-error line is logged at most once per this many seconds.
LOG_EVERY = 1.0
#: Connections taken per wake-up at most (then the loop runs other work first).
BURST = 16

_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept(2), "Error handling": pending network errors of the new socket, to be retried.
_RETRY = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN,
    errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EPERM,
})  # fmt: skip
_GONE = 1 << 62  # a slot without a worker: never the least loaded


class Share:
    """Connection counts of sibling worker processes, in one map shared across ``fork()``.

    The supervisor makes it before forking; each worker :meth:`join`\\ s its slot, counts
    in it from its first listen (:meth:`open`) until its server closes (:meth:`leave`) and
    writes only that slot; the supervisor :meth:`vacate`\\ s the slot of a worker that
    exited. Reads of a sibling's count may be a moment stale: that only costs balance.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self._map = mmap.mmap(-1, 8 * workers)  # anonymous and shared with forked children
        self._counts = memoryview(self._map).cast("q")
        for slot in range(workers):
            self._counts[slot] = _GONE
        self.slot = -1

    def join(self, slot: int) -> None:
        """Make this process the worker of *slot*, not counted until :meth:`open`."""
        self.slot = slot

    def open(self) -> None:
        """Start counting this process's slot (it accepts now), if it is not yet."""
        if self.slot >= 0 and self._counts[self.slot] == _GONE:
            self._counts[self.slot] = 0

    def leave(self) -> None:
        """Stop counting this process's slot (it accepts no more): siblings take it all."""
        if self.slot >= 0:
            self.vacate(self.slot)

    def vacate(self, slot: int) -> None:
        """Forget *slot*'s worker (it exited): siblings no longer leave connections to it."""
        self._counts[slot] = _GONE

    def add(self, n: int) -> None:
        """Count *n* more (or fewer) connections for this process's slot."""
        if self.slot >= 0:
            self._counts[self.slot] += n

    def least_loaded(self) -> bool:
        """Whether this process holds no more connections than any sibling."""
        if self.slot < 0:
            return True
        counts = self._counts
        return counts[self.slot] <= min(counts)

    def held(self) -> int:
        """The connections this process's slot holds."""
        return 0 if self.slot < 0 else self._counts[self.slot]


#: The share of this process, set in a forked worker; None: no siblings, accept everything.
SHARE: Share | None = None


class Acceptor:
    """Accept connections on one listening socket into *factory*'s protocols on *loop*.

    Call :meth:`start` to listen, :meth:`close` to stop. Each accepted connection counts
    in :data:`SHARE` (when set) until its protocol calls :meth:`release` when it loses the
    connection.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: Callable[[], asyncio.BaseProtocol],
    ) -> None:
        self.sock, self._loop, self._factory = sock, loop, factory
        self._fd = sock.fileno()
        self._reading = self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._deferred_since: float | None = None
        self._logged = -LOG_EVERY
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Start accepting (the socket is bound and listening)."""
        if not self.closed and not self._reading:
            self._timer = None
            self._reading = True
            self._loop.add_reader(self._fd, self._ready)
            if SHARE is not None:
                SHARE.open()

    def close(self) -> None:
        """Stop accepting and close the socket; connections already accepted stay open
        (:meth:`settled` waits for those whose setup is still running)."""
        self.closed = True
        self._rest(None)
        self.sock.close()
        if SHARE is not None:
            SHARE.leave()

    async def settled(self) -> None:
        """Wait until every accepted connection has its protocol (or failed to get one)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @staticmethod
    def release() -> None:
        """Count one accepted connection as gone (its protocol lost it)."""
        if SHARE is not None:
            SHARE.add(-1)

    def _rest(self, seconds: float | None) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if seconds is not None:
            self._timer = self._loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        self.start()
        if self._reading:
            self._ready()  # an empty queue ends a deferral (EAGAIN), or it would outlive it

    def _ready(self) -> None:
        for _ in range(BURST):
            if not self._may_take():
                self._rest(HOLD_BACK)
                return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                self._deferred_since = None
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued: nothing to say
            except OSError as exc:
                if exc.errno in _RETRY:  # that connection's own error: on to the next one
                    self._log(exc, "")
                    continue
                self._failed(exc)
                return
            if SHARE is not None:
                SHARE.add(1)
            task = self._loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _may_take(self) -> bool:
        """Whether to take a queued connection now. A deferral lasts until the queue is
        empty (EAGAIN): once it has run MAX_DEFER, every connection queued is taken."""
        if SHARE is None or SHARE.least_loaded():
            self._deferred_since = None
            return True
        now = self._loop.time()
        if self._deferred_since is None:
            self._deferred_since = now
        return now - self._deferred_since >= MAX_DEFER

    def _failed(self, exc: OSError) -> None:
        hint = "; raise the file descriptor limit (ulimit -n) or lower --max-connections"
        self._log(exc, hint if exc.errno in _RESOURCES else "")
        self._rest(RETRY_SECONDS)

    def _log(self, exc: OSError, hint: str) -> None:
        now = self._loop.time()
        if now - self._logged >= LOG_EVERY:
            self._logged = now
            log.warning("cannot accept connections: %s (retrying)%s", exc, hint)

    async def _connect(self, conn: socket.socket) -> None:
        made = False

        def factory() -> asyncio.BaseProtocol:
            nonlocal made
            protocol = self._factory()
            made = True  # from here on its connection_lost releases the connection
            return protocol

        try:
            conn.setblocking(False)
            await self._loop.connect_accepted_socket(factory, conn)
        except BaseException as exc:
            if not made:  # else the protocol's connection_lost releases the connection
                conn.close()
                self.release()
            if not isinstance(exc, Exception):
                raise
            log.warning("cannot set up an accepted connection: %s", exc)
