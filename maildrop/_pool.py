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
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import sniffio
from anyio.lowlevel import RunVar

__all__ = ["THREADS", "run_sync"]

T = TypeVar("T")

#: Worker threads per event loop: enough to keep the fsyncs of concurrent deliveries busy.
THREADS = 64
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


class _Worker:
    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.lock = threading.Lock()
        self.wake = threading.Semaphore(0)
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
