"""Group commit: concurrent deliveries into one directory share its fsync.

A directory fsync covers every link that completed before it started. Links are numbered in
the order the event loop sees them complete; a fsync started when ``linked`` was N covers
links 1..N, and a delivery returns once a fsync covered its number. A delivery with nothing
else in flight does the fsync inside its own step instead (see ``_session``), so a lone
message costs one backend call.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

import anyio

from ._backend import Backend
from ._handoff import run_owned
from ._loops import per_loop
from ._writer import DeliveryFiles

__all__ = ["STATS", "GroupCommit", "group", "release", "sync_and_close"]

#: Process-wide counters (read by the benchmarks): deliveries committed, directory fsyncs.
STATS = {"deliveries": 0, "dir_fsyncs": 0}

_Key = tuple[str, str]  # (maildir path, "new" or "cur")


_Table = dict[_Key, "GroupCommit"]
#: What :meth:`GroupCommit.on_durable` calls: with None, or the failed fsync's error.
Durable = Callable[[OSError | None], None]


def _table(loop: asyncio.AbstractEventLoop | None) -> _Table:
    return {}


_groups = per_loop("maildrop_group_commit", _table)


class GroupCommit:
    """Group-commit bookkeeping for one destination directory on one event loop.

    The fsync runs as a job of its own (``Backend.spawn``), not as part of the delivery that
    started it: a delivery cancelled (or aborted) while it waits must not take the fsync
    that the other deliveries wait for down with it.
    """

    def __init__(self, key: _Key, table: _Table) -> None:
        self.key = key
        self.table = table
        self.inflight = 0  # deliveries between commit() entry and return
        self.linked = 0  # links completed (as seen by the loop)
        self.synced = 0  # every link numbered <= this is durable
        self.failed = 0  # every link numbered <= this saw a failed fsync
        self.error: OSError | None = None
        self.running: anyio.Event | None = None  # set when the fsync in flight ends
        # Linked deliveries waiting for a directory fsync: the one that covers them closes
        # their directory fds in its worker (see sync_and_close).
        self.waiting: list[DeliveryFiles] = []
        # Callers of on_durable() waiting for a fsync: (link number, callback).
        self.callbacks: list[tuple[int, Durable]] = []

    def alone(self) -> bool:
        """Whether the one delivery in flight may fsync the directory in its own step."""
        return self.inflight == 1 and self.running is None

    def add(self, tmp: DeliveryFiles) -> int:
        """Count *tmp*'s completed link; return its number for :meth:`wait_durable`."""
        self.linked += 1
        self.waiting.append(tmp)
        return self.linked

    async def wait_durable(self, seq: int, backend: Backend) -> None:
        """Return once a directory fsync covered link number *seq*; raise if one failed.

        A fsync this call starts runs on *backend*.
        """
        while self.synced < seq:
            if self.failed >= seq and self.error is not None:
                raise _failed(self.error)
            if self.running is None:
                self._start(backend)
            else:
                await self.running.wait()

    def on_durable(self, seq: int, backend: Backend, then: Durable) -> None:
        """Call ``then(None)`` once a directory fsync covered link number *seq*, or
        ``then(error)`` once one failed (:meth:`wait_durable` without a task, on the loop's
        thread; a fsync this call starts runs on *backend*)."""
        if self.synced >= seq:
            then(None)
        elif self.failed >= seq and self.error is not None:
            then(_failed(self.error))
        else:
            self.callbacks.append((seq, then))
            if self.running is None:
                self._start(backend)

    def _call_back(self, backend: Backend) -> None:
        """Call the callbacks whose link a fsync covered or failed; start the next fsync
        for those it did not cover."""
        waiting, self.callbacks = self.callbacks, []
        error: Exception | None = None
        for seq, then in waiting:
            try:
                self.on_durable(seq, backend, then)
            except Exception as exc:  # a callback's bug: the others still get their outcome
                error = error or exc
        if error is not None:
            raise error

    def _start(self, backend: Backend) -> None:
        target = self.linked
        covered, self.waiting = self.waiting, []
        done = self.running = anyio.Event()
        STATS["dir_fsyncs"] += 1

        def finish(error: BaseException | None) -> None:
            if error is None:
                self.synced = max(self.synced, target)
            else:
                if not isinstance(error, OSError):  # pragma: no cover - a bug, not the disk
                    error = OSError(errno.EIO, f"the directory fsync failed: {error!r}")
                self.failed, self.error = max(self.failed, target), error
            self.running = None
            done.set()
            try:
                if self.callbacks:
                    self._call_back(backend)
            finally:
                release(self)

        # The job belongs to no delivery: a waiter cancelled meanwhile leaves at once, the
        # others are woken when it ends.
        backend.spawn(sync_and_close, covered, done=finish)


def _failed(err: OSError) -> OSError:
    return OSError(err.errno, f"fsync of the maildir failed: {err.strerror}")


def sync_and_close(covered: list[DeliveryFiles]) -> None:
    """Fsync the destination directory of the deliveries in *covered*, then close their
    directory fds (runs in a worker).

    The fsync goes through the fd of the first delivery this worker can take over, so a
    cancelled delivery's cleanup cannot close the fd under it; a delivery cleaned up already
    is skipped. If none is left, every one of them was either made durable by an earlier
    fsync or gave up: nothing to do.

    The fds are closed here, not on the event loop: ``os.close`` releases the GIL, and a
    loop thread that gives the GIL to a busy worker waits to get it back. After a failed
    fsync nothing is closed: each delivery then removes its own link, which needs its fds.
    """
    for t in covered:
        if run_owned(t, t.sync_dest):
            break
    for t in covered:
        run_owned(t, t.close_dirs)


def groups(loop: asyncio.AbstractEventLoop) -> _Table:
    """Return *loop*'s group commits by directory (to pass to :func:`group`)."""
    return _groups(loop)


def group(key: _Key, table: _Table | None = None) -> GroupCommit:
    """Return the running loop's group commit of the directory *key* (*table*: the loop's
    :func:`groups`, looked up once by a caller that knows its loop); count one more in flight."""
    if table is None:
        table = _groups()
    gc = table.get(key)
    if gc is None:
        gc = table[key] = GroupCommit(key, table)
    gc.inflight += 1
    return gc


def release(gc: GroupCommit) -> None:
    """Forget *gc* once no delivery is in flight and no fsync runs (after ``inflight -= 1``)."""
    if gc.inflight == 0 and gc.running is None:
        table = gc.table
        if table.get(gc.key) is gc:
            del table[gc.key]
