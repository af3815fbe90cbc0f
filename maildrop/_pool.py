"""Worker threads for the blocking half of deliveries.

On asyncio, maildrop runs its own small pool: one semaphore handoff in, one
``call_soon_threadsafe`` out. A hop through ``anyio.to_thread.run_sync`` costs two more event
loop iterations (a checkpoint and the limiter's), measured at 123 µs per idle hop against
70 µs here on the 2-vCPU dev VM; a small durable delivery is one hop, so that difference is
~10% of its time. Idle workers are reused most-recently-idle first, so a lone delivery loop
keeps hitting the same warm thread. On every other backend (trio) hops go through
``anyio.to_thread.run_sync`` with maildrop's own ``CapacityLimiter``.

Both paths abandon a cancelled caller at once; the worker finishes its call regardless
(``_session`` makes the worker clean up after a cancelled delivery).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import sniffio
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

_limiter: RunVar[anyio.CapacityLimiter] = RunVar("maildrop_limiter")
_pools: RunVar[_Pool] = RunVar("maildrop_pool")


def _anyio_limiter() -> anyio.CapacityLimiter:
    # Made lazily: a CapacityLimiter binds to the event loop that first uses it.
    try:
        return _limiter.get()
    except LookupError:
        lim = anyio.CapacityLimiter(THREADS)
        _limiter.set(lim)
        return lim


async def run_sync(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a worker thread and return its result.

    **Cancellation:** the caller is released at once; *fn* still runs to completion.
    """
    if sniffio.current_async_library() == "asyncio":
        try:
            pool = _pools.get()
        except LookupError:
            pool = _Pool(asyncio.get_running_loop())
            _pools.set(pool)
        return await pool.run(fn, args)
    return await anyio.to_thread.run_sync(
        fn, *args, abandon_on_cancel=True, limiter=_anyio_limiter()
    )


def submit(fn: Callable[..., T], *args: Any) -> asyncio.Future[T] | None:
    """Start ``fn(*args)`` in an idle (or new) worker and return its future, without waiting.

    Returns None (start nothing) when that is not possible at once: off asyncio, or with
    every worker busy; the caller then uses :func:`run_sync`. An exception of *fn* that
    nobody awaits is not reported as "never retrieved".
    """
    if sniffio.current_async_library() != "asyncio":
        return None
    try:
        pool = _pools.get()
    except LookupError:
        pool = _Pool(asyncio.get_running_loop())
        _pools.set(pool)
    fut: asyncio.Future[T] = pool.loop.create_future()
    fut.add_done_callback(_retrieve)
    while pool.idle or pool.threads < THREADS:
        if pool.idle:
            worker = pool.idle.pop()
        else:
            pool.threads += 1
            worker = _Worker(pool)
        if worker.give((fn, args, fut)):
            return fut
        pool.threads -= 1  # it retired while idle
    return None


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class _Worker:
    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.lock = threading.Lock()
        # A plain lock as a binary signal (held = no job): one handoff at a time, and
        # ~3 µs cheaper per hop than threading.Semaphore, which is written in Python.
        self.wake = threading.Lock()
        self.wake.acquire()
        self.job: tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]] | None = None
        self.dead = False
        thread = threading.Thread(target=self._main, name="maildrop worker", daemon=True)
        thread.start()

    def give(self, job: tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]) -> bool:
        """Hand *job* over; False if this worker already retired."""
        with self.lock:
            if self.dead:
                return False
            self.job = job
        self.wake.release()
        return True

    def _main(self) -> None:
        loop = self.pool.loop
        while True:
            if not self.wake.acquire(timeout=IDLE_SECONDS):
                with self.lock:
                    if self.job is None:
                        self.dead = True
                        return
                self.wake.acquire()  # a job was handed over just as we timed out
            job = self.job
            assert job is not None
            fn, args, fut = job
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as exc:
                error = exc
            with self.lock:
                self.job = None
            try:
                loop.call_soon_threadsafe(self.pool.done, self, fut, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                with self.lock:
                    self.dead = True
                return
            del job, fn, args, fut, result, error


class _Pool:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.idle: list[_Worker] = []
        self.threads = 0
        self.waiting: deque[asyncio.Future[_Worker]] = deque()

    async def run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        fut: asyncio.Future[T] = self.loop.create_future()
        while True:
            worker = await self._worker()
            if worker.give((fn, args, fut)):
                break
            self.threads -= 1  # it retired while idle
        return await fut

    async def _worker(self) -> _Worker:
        if self.idle:
            return self.idle.pop()
        if self.threads < THREADS:
            self.threads += 1
            return _Worker(self)
        wait: asyncio.Future[_Worker] = self.loop.create_future()
        self.waiting.append(wait)
        try:
            return await wait
        except asyncio.CancelledError:
            if wait.done() and not wait.cancelled():
                self._release(wait.result())
            raise

    def _release(self, worker: _Worker) -> None:
        while self.waiting:
            wait = self.waiting.popleft()
            if not wait.done():
                wait.set_result(worker)
                return
        self.idle.append(worker)

    def done(
        self, worker: _Worker, fut: asyncio.Future[Any], result: Any, error: BaseException | None
    ) -> None:
        if not fut.done():
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)
        self._release(worker)
