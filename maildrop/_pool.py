"""Worker threads for the blocking half of deliveries (the thread backends of ``_backend``).

On asyncio, maildrop runs its own pool (:class:`Pool`): jobs go into one queue that idle
workers block on, and results come back in batches. A worker hands results back through an
``eventfd`` that the loop watches (``add_reader``): the loop wakes, reads it and resolves the
futures in the same iteration, which is cheaper than ``call_soon_threadsafe`` (a socket
write, two ``recv`` calls, one more iteration) and than ``anyio.to_thread.run_sync`` (a
checkpoint and the limiter's iteration); ``benchmarks/README.md`` has the figures. Under load
the queue matters more than the hop: a worker that finishes a job takes the next queued one
at once, without sleeping and without a round trip through the event loop, and a worker only
wakes the loop when no earlier completion is still waiting to be collected. A loop without
``add_reader`` (Windows' proactor) is woken with ``call_soon_threadsafe``. On every other
backend (trio) steps go through ``anyio.to_thread.run_sync`` with maildrop's own
``CapacityLimiter`` (:func:`anyio_limiter`).

Every job runs in a copy of its submitter's ``contextvars``, and to completion even when its
caller was cancelled (on asyncio even one that was still queued). Reads of sources that may
block forever (pipes) never use these workers: they get a lane of their own
(:func:`source_limiter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from anyio.lowlevel import RunVar

from . import _writer

__all__ = [
    "CORE_THREADS",
    "SERVER_CORE_THREADS",
    "SOURCE_THREADS",
    "THREADS",
    "Pool",
    "anyio_limiter",
    "retrieve",
    "source_limiter",
]

T = TypeVar("T")

#: Worker threads per event loop at most: 4 per CPU, at least 8, at most 64. Enough to keep
#: the fsyncs of concurrent deliveries in flight (deliveries/s = fsyncs in flight / fsync
#: latency) on a slow disk or a journaled filesystem, whose concurrent fsyncs share a commit.
THREADS = min(64, max(8, 4 * (os.cpu_count() or 1)))
#: Workers started as soon as a job finds none idle. A library keeps as many fsyncs in
#: flight as it has deliveries, up to THREADS (fewer cost 100 KiB deliveries at 16 and 64 in
#: flight ~10% of their rate). The LMTP/SMTP server, whose sessions bound its concurrency and
#: whose CPU per message counts, starts SERVER_CORE_THREADS (``_serve_proc``): every worker
#: comes back from each syscall wanting the GIL, and the event loop's thread queues behind
#: them; eight cost the server ~25% more CPU per message than four on a fast disk.
CORE_THREADS = THREADS
#: The server's CORE_THREADS per worker process: 4, whatever the CPU count, because the
#: server already runs two processes per CPU (``_supervisor.default_workers``).
SERVER_CORE_THREADS = min(THREADS, 4)
#: Beyond CORE_THREADS, workers are added as jobs find none idle while most message-file
#: fsyncs are slow (``_writer.SLOW_FSYNC``: a slow disk, a journaled filesystem, whose
#: concurrent fsyncs share a commit: more in flight help), and one is added when no worker
#: took a job for STUCK_AFTER while jobs wait (all blocked: jobs that wait for each other). A
#: worker beyond them goes once neither held for SHRINK_SECONDS. On a fast disk, jobs that
#: wait mean a busy CPU, which more threads only slow down.
STUCK_AFTER = 0.002
SHRINK_SECONDS = 1.0
#: Seconds a worker waits for work before it exits.
IDLE_SECONDS = 10.0
#: How often an idle worker checks whether its event loop was closed (then it exits).
POLL_SECONDS = 0.5

#: Threads per event loop that may block reading message sources (pipes, sockets,
#: terminals): a lane of their own, so a source that never sends holds none of the workers
#: that deliveries need. Past this many, further source reads wait for one another.
SOURCE_THREADS = 32

_limiter: RunVar[anyio.CapacityLimiter] = RunVar("maildrop_limiter")
_source_limiter: RunVar[anyio.CapacityLimiter] = RunVar("maildrop_source_limiter")

_Job = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]", contextvars.Context]


def anyio_limiter(var: RunVar[anyio.CapacityLimiter] = _limiter) -> anyio.CapacityLimiter:
    """Return the running loop's limiter of anyio worker threads for steps."""
    # Made lazily: a CapacityLimiter binds to the event loop that first uses it.
    try:
        return var.get()
    except LookupError:
        lim = anyio.CapacityLimiter(SOURCE_THREADS if var is _source_limiter else THREADS)
        var.set(lim)
        return lim


def source_limiter() -> anyio.CapacityLimiter:
    """Return the running loop's limiter of source-reading threads."""
    return anyio_limiter(_source_limiter)


def retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark the outcome of *fut* as seen, so an error nobody awaits is not logged."""
    if not fut.cancelled():
        fut.exception()


class _Wakeup:
    """How workers wake their loop: an eventfd the loop watches, else call_soon_threadsafe."""

    def __init__(self, loop: asyncio.AbstractEventLoop, collect: Callable[[], None]) -> None:
        self.lock = threading.Lock()  # a worker's write never races the close below
        self.fd = -1
        self.collect = collect
        if hasattr(os, "eventfd"):
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                # In an empty context: the handle lives as long as the loop, and a copy of
                # the first caller's context would keep whatever its variables refer to.
                contextvars.Context().run(loop.add_reader, fd, self._readable)
            except NotImplementedError:  # a loop without add_reader (proactor)
                os.close(fd)
            else:
                self.fd = fd
                # Closed with the loop object; never earlier, since the loop still watches it.
                weakref.finalize(loop, self.close)

    def _readable(self) -> None:
        # Read (reset) the counter before collecting: a result added after this read
        # writes the eventfd again, so it is never left behind.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)
        self.collect()

    def poke(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake *loop* to collect results (called by workers); RuntimeError if it is closed."""
        with self.lock:
            if self.fd >= 0 and not loop.is_closed():
                os.eventfd_write(self.fd, 1)
                return
        loop.call_soon_threadsafe(self.collect)

    def close(self) -> None:
        with self.lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class Pool:
    """The worker threads of one asyncio event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: the pool lives in a WeakKeyDictionary keyed by the loop, so a strong
        # reference back would keep every closed loop (and its pool) alive forever.
        self.loop_ref = weakref.ref(loop)
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.lock = threading.Lock()  # guards every counter and list below
        self.threads = 0
        self.idle = 0  # workers waiting in jobs.get()
        self.queued = 0  # jobs put and not yet taken
        self.results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self.collecting = False  # the loop was woken and has not collected yet
        self.stuck = 0.0  # when fsyncs were last slow or the workers all blocked
        self.taken = 0  # jobs taken by workers so far
        #: Jobs submitted whose outcome the loop has not collected yet (only the loop's
        #: thread changes it): whether the pool has work in flight (``_uring_backend``).
        self.pending = 0
        self.watching = False  # a _watch is scheduled on the loop
        self.wakeup = _Wakeup(loop, self._collect)

    def submit(self, fn: Callable[..., T], args: tuple[Any, ...]) -> asyncio.Future[T]:
        """Queue ``fn(*args)`` (on the loop); start a worker if none is free and fewer than
        CORE_THREADS run (THREADS while fsyncs are slow; see also :meth:`_watch`)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self.pending += 1
        with self.lock:
            self.queued += 1
            waits = self.queued > self.idle
            slow = _writer.slow_fsyncs > 0.5
            if slow:
                self.stuck = time.monotonic()
            spawn = waits and self.threads < (THREADS if slow else min(CORE_THREADS, THREADS))
            if spawn:
                self.threads += 1
            watch = waits and not spawn and not self.watching and self.threads < THREADS
            self.watching = self.watching or watch
        self.jobs.put((fn, args, fut, contextvars.copy_context()))
        if spawn:
            self._start()
        if watch:
            loop.call_later(STUCK_AFTER, self._watch, self.taken)
        return fut

    def _watch(self, taken: int) -> None:
        """On the loop, STUCK_AFTER after a job found every worker busy: if no worker took a
        job since (all are blocked: a slow disk, or jobs that wait for each other), start
        one more; keep watching while jobs wait."""
        with self.lock:
            waits = self.queued > self.idle and self.threads < THREADS
            spawn = waits and self.taken == taken
            if spawn:
                self.threads += 1
                self.stuck = time.monotonic()
            self.watching = waits
            taken = self.taken
        if spawn:
            self._start()
        if waits:
            loop = self.loop_ref()
            if loop is not None and not loop.is_closed():
                loop.call_later(STUCK_AFTER, self._watch, taken)
            else:  # pragma: no cover - a pool outlives its loop only while it winds down
                self.watching = False

    def _start(self) -> None:
        threading.Thread(target=self._main, name="maildrop worker", daemon=True).start()

    def _took(self) -> bool:
        """Count a job taken; return whether this worker, one beyond CORE_THREADS, should go
        once the job is done (fsyncs were fast and no worker blocked for a while)."""
        with self.lock:
            self.idle -= 1
            self.queued -= 1
            self.taken += 1
            surplus = (
                self.threads > CORE_THREADS and time.monotonic() - self.stuck >= SHRINK_SECONDS
            )
            if surplus:
                self.threads -= 1
        return surplus

    def _main(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self.lock:
                self.idle += 1
            try:
                fn, args, fut, ctx = self.jobs.get(timeout=POLL_SECONDS)
            except queue.Empty:
                # Exit once idle for IDLE_SECONDS, or at once when the loop is gone (one
                # asyncio.run() per message must not pile up a thread per run).
                loop = self.loop_ref()
                retire = loop is None or loop.is_closed()
                del loop
                if retire:
                    self._drop_results()
                retire = retire or time.monotonic() - idle_since >= IDLE_SECONDS
                with self.lock:
                    self.idle -= 1
                    if self.queued > self.idle:  # pragma: no cover - a narrow race
                        continue  # a job arrived as we timed out: nobody else may take it
                    if not retire:
                        continue
                    self.threads -= 1
                    return
            surplus = self._took()
            result: Any = None
            error: BaseException | None = None
            try:
                result = ctx.run(fn, *args)
            except BaseException as exc:
                error = exc
            with self.lock:
                self.results.append((fut, result, error))
                poke = not self.collecting
                self.collecting = True
            del fn, args, fut, ctx, result, error
            idle_since = time.monotonic()
            if poke:
                loop = self.loop_ref()
                try:
                    if loop is None:
                        raise RuntimeError("the event loop is gone")
                    self.wakeup.poke(loop)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    self._drop_results()
                    with self.lock:
                        self.threads -= not surplus  # a surplus worker was counted out
                    return
                finally:
                    del loop
            if surplus:
                return  # counted out in _took

    def _drop_results(self) -> None:
        """Forget results a closed loop will never collect: their futures refer to the loop,
        and this pool (kept in a dict weakly keyed by that loop) would keep it alive."""
        with self.lock:
            self.results.clear()
            self.collecting = False

    def _collect(self) -> None:
        """Hand every finished call's outcome to its future (on the loop)."""
        with self.lock:
            results, self.results = self.results, []
            self.collecting = False
        self.pending -= len(results)
        for fut, result, error in results:
            if fut.done():  # the caller was cancelled
                continue
            if isinstance(error, StopIteration):  # which a future refuses (TypeError)
                error = _stop_iteration(error)
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)


def _stop_iteration(exc: StopIteration) -> RuntimeError:
    """Return what a step's StopIteration becomes (as in a coroutine: PEP 479)."""
    error = RuntimeError(f"a worker's call raised StopIteration: {exc!r}")
    error.__cause__ = exc
    return error
