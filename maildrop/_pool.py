"""Worker threads for the blocking half of deliveries.

On asyncio, maildrop runs its own pool: jobs go into one queue that idle workers block on, and
results come back in batches. A hop through ``anyio.to_thread.run_sync`` costs two more event
loop iterations (a checkpoint and the limiter's), measured at 123 µs per idle hop against
~70 µs here on the 2-vCPU dev VM; a small durable delivery is one hop, so that difference is
~10% of its time. Under load the queue matters more than the hop: a worker that finishes a
job takes the next queued one at once, without sleeping and without a round trip through the
event loop, and a worker only pokes the loop (``call_soon_threadsafe``, a write to its
self-pipe) when no earlier completion is still waiting to be collected. At 64 concurrent
2 KiB deliveries that halved the context switches per delivery. On every other backend
(trio) hops go through ``anyio.to_thread.run_sync`` with maildrop's own ``CapacityLimiter``.

Both paths abandon a cancelled caller at once; the worker still runs the call (even one that
was still queued) to completion (``_session`` makes the worker clean up after a cancelled
delivery).
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from anyio.lowlevel import RunVar

__all__ = ["THREADS", "run_sync", "submit"]

T = TypeVar("T")

#: Worker threads per event loop: 8 per CPU, at least 16, at most 64. Enough to keep the
#: fsyncs of concurrent deliveries in flight (deliveries/s = fsyncs in flight / fsync
#: latency), and no more: a worker finishing its fsync competes for the GIL with the event
#: loop's thread. On the 2-vCPU dev VM, 1,000 deliveries at concurrency 64 ran as fast with
#: 8 or 16 workers as with 64, and the loop's longest stall fell from 55-98 ms to 12-27 ms.
THREADS = min(64, max(16, 8 * (os.cpu_count() or 1)))
#: Seconds a worker waits for work before it exits.
IDLE_SECONDS = 10.0
#: How often an idle worker checks whether its event loop was closed (then it exits).
POLL_SECONDS = 0.5

_limiter: RunVar[anyio.CapacityLimiter] = RunVar("maildrop_limiter")
_pools: RunVar[_Pool] = RunVar("maildrop_pool")

_Job = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


def _anyio_limiter() -> anyio.CapacityLimiter:
    # Made lazily: a CapacityLimiter binds to the event loop that first uses it.
    try:
        return _limiter.get()
    except LookupError:
        lim = anyio.CapacityLimiter(THREADS)
        _limiter.set(lim)
        return lim


def _pool() -> _Pool:
    try:
        return _pools.get()
    except LookupError:
        pool = _Pool(asyncio.get_running_loop())
        _pools.set(pool)
        return pool


def _on_asyncio() -> bool:
    # anyio >= 4.12 no longer depends on sniffio: ask asyncio itself. Under trio there is no
    # running asyncio loop in this thread.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def run_sync(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a worker thread and return its result.

    **Cancellation:** the caller is released at once; *fn* still runs to completion.
    """
    if _on_asyncio():
        return await _pool().submit(fn, args)
    return await anyio.to_thread.run_sync(
        fn, *args, abandon_on_cancel=True, limiter=_anyio_limiter()
    )


def submit(fn: Callable[..., T], *args: Any) -> asyncio.Future[T] | None:
    """Queue ``fn(*args)`` for a worker and return its future, without waiting.

    Returns None (queues nothing) off asyncio; the caller then uses :func:`run_sync`. An
    exception of *fn* that nobody awaits is not reported as "never retrieved".
    """
    if not _on_asyncio():
        return None
    fut = _pool().submit(fn, args)
    fut.add_done_callback(_retrieve)
    return fut


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class _Pool:
    """The worker threads of one asyncio event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: anyio keeps this pool in a WeakKeyDictionary keyed by the loop, so a strong
        # reference back would keep every closed loop (and its pool) alive forever.
        self.loop_ref = weakref.ref(loop)
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.lock = threading.Lock()  # guards every counter and list below
        self.threads = 0
        self.idle = 0  # workers waiting in jobs.get()
        self.queued = 0  # jobs put and not yet taken
        self.results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self.collecting = False  # a _collect() call is scheduled on the loop

    def submit(self, fn: Callable[..., T], args: tuple[Any, ...]) -> asyncio.Future[T]:
        """Queue ``fn(*args)``; start a worker if none is free and the cap allows."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self.lock:
            self.queued += 1
            spawn = self.queued > self.idle and self.threads < THREADS
            if spawn:
                self.threads += 1
        self.jobs.put((fn, args, fut))
        if spawn:
            threading.Thread(target=self._main, name="maildrop worker", daemon=True).start()
        return fut

    def _main(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self.lock:
                self.idle += 1
            try:
                fn, args, fut = self.jobs.get(timeout=POLL_SECONDS)
            except queue.Empty:
                # Exit once idle for IDLE_SECONDS, or at once when the loop is gone (one
                # asyncio.run() per message must not pile up a thread per run).
                loop = self.loop_ref()
                retire = loop is None or loop.is_closed()
                del loop
                retire = retire or time.monotonic() - idle_since >= IDLE_SECONDS
                with self.lock:
                    self.idle -= 1
                    if self.queued > self.idle:  # pragma: no cover - a narrow race
                        continue  # a job arrived as we timed out: nobody else may take it
                    if not retire:
                        continue
                    self.threads -= 1
                    return
            with self.lock:
                self.idle -= 1
                self.queued -= 1
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as exc:
                error = exc
            with self.lock:
                self.results.append((fut, result, error))
                poke = not self.collecting
                self.collecting = True
            del fn, args, fut, result, error
            idle_since = time.monotonic()
            if poke:
                loop = self.loop_ref()
                try:
                    if loop is None:
                        raise RuntimeError("the event loop is gone")
                    loop.call_soon_threadsafe(self._collect)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    with self.lock:
                        self.threads -= 1
                    return
                finally:
                    del loop

    def _collect(self) -> None:
        """Hand every finished call's outcome to its future (on the loop)."""
        with self.lock:
            results, self.results = self.results, []
            self.collecting = False
        for fut, result, error in results:
            if fut.done():  # the caller was cancelled
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)
