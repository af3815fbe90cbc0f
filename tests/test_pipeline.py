"""Pipelined large writes: a worker writes batch N while the caller gathers batch N+1."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from maildrop import DEFAULT_SYSCALLS, Maildir, _backend, _pool
from maildrop._session import BATCH

from .conftest import Faults, listing, open_fds, settle

CHUNK = b"z" * (64 * 1024)
EMPTY = {"tmp": [], "new": [], "cur": []}


async def chunks(n: int, fail_after: int | None = None) -> AsyncIterator[bytes]:
    """Yield *n* 64 KiB chunks; raise ValueError after *fail_after* of them."""
    for i in range(n):
        if i == fail_after:
            raise ValueError("source broke")
        yield CHUNK


@pytest.mark.anyio
async def test_streamed_batches_arrive_whole_and_in_order(tmp_path: Path) -> None:
    """A multi-batch stream of distinct chunks is written completely, in order."""
    parts = [bytes([i % 251]) * (64 * 1024 + i) for i in range(70)]

    async def source() -> AsyncIterator[bytes]:
        for p in parts:
            yield p

    d = await Maildir(tmp_path / "m").deliver(source())
    assert d.path.read_bytes() == b"".join(parts)
    assert d.size == sum(map(len, parts))


@pytest.mark.anyio
async def test_error_of_a_batch_in_flight_surfaces(tmp_path: Path) -> None:
    """A write error in a background batch is raised by a later write (or commit), cleaned up."""
    md = tmp_path / "m"
    await Maildir(md).deliver(b"warm")
    before, fds = listing(md), open_fds()
    table = Faults().failing("writev", when=2, err=errno.ENOSPC)
    with pytest.raises(OSError, match="injected ENOSPC in writev") as info:
        await Maildir(md, syscalls=table).deliver(chunks(16 * 4))
    assert info.value.errno == errno.ENOSPC
    assert listing(md) == before
    assert open_fds() == fds


@pytest.mark.anyio
async def test_source_error_while_a_batch_is_in_flight(tmp_path: Path) -> None:
    """The source's own exception comes back as is; the batch in flight is cleaned up."""
    md = tmp_path / "m"
    await Maildir(md).deliver(b"warm")
    before, fds = listing(md), open_fds()
    with pytest.raises(ValueError, match="source broke"):
        await Maildir(md).deliver(chunks(64, fail_after=17))
    assert listing(md) == before
    assert open_fds() == fds


@pytest.mark.asyncio
async def test_native_cancel_while_a_batch_is_in_flight(tmp_path: Path) -> None:
    """task.cancel() while a background batch is being written: nothing stays, no fd leaks."""
    md = tmp_path / "m"
    await Maildir(md).deliver(b"warm")
    before, fds = listing(md), open_fds()
    started = threading.Event()

    def slow_writev(fd: int, bufs: Any) -> int:
        started.set()
        time.sleep(0.2)
        return DEFAULT_SYSCALLS.writev(fd, bufs)

    table = DEFAULT_SYSCALLS.replace(writev=slow_writev)
    gathered = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        for i in range(64):
            if i == 20:
                gathered.set()  # the first batch was handed off; keep the task here
                await asyncio.sleep(10)
            yield CHUNK

    task = asyncio.create_task(Maildir(md, syscalls=table).deliver(source()))
    await gathered.wait()
    assert started.wait(5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError, match=r"^$"):
        await task
    await settle(lambda: listing(md) == before and open_fds() == fds, "the worker's cleanup")


@pytest.mark.asyncio
async def test_abort_while_the_first_batch_waits_for_its_worker(tmp_path: Path) -> None:
    """Aborting before the worker picked up the first batch leaves nothing and opens nothing."""
    md = tmp_path / "m"
    session = Maildir(md).open_delivery(pipeline=True)
    await session.write(b"a" * BATCH)  # submitted; the session aborts before it can run
    await session.abort()
    await asyncio.sleep(0.05)
    assert not md.exists() or listing(md) == EMPTY


@pytest.mark.asyncio
async def test_jobs_queue_when_every_worker_is_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every worker busy a job waits in the queue and runs once a worker is free."""
    monkeypatch.setattr(_pool, "THREADS", 1)
    release = threading.Event()
    busy = asyncio.ensure_future(_backend.run_sync(release.wait))
    await asyncio.sleep(0.01)
    queued = _backend.current().submit(lambda: 42)
    assert queued is not None
    await asyncio.sleep(0.01)
    assert not queued.done()
    release.set()
    assert await busy is True
    assert await queued == 42


@pytest.mark.asyncio
async def test_a_cancelled_caller_is_released_and_the_call_still_runs() -> None:
    """Cancelling the awaiting task returns at once; the worker's call still completes."""
    release, ran = threading.Event(), threading.Event()

    def job() -> None:
        release.wait(5)
        ran.set()

    task = asyncio.ensure_future(_backend.run_sync(job))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError, match=r"^$"):
        await task
    release.set()
    assert await asyncio.to_thread(ran.wait, 5)


@pytest.mark.asyncio
async def test_idle_workers_retire(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker with nothing to do for IDLE_SECONDS exits; the next job starts a new one."""
    monkeypatch.setattr(_pool, "IDLE_SECONDS", 0.05)
    pool = _backend.current().pool
    await _backend.run_sync(lambda: None)
    deadline = time.monotonic() + 5
    while pool.threads and time.monotonic() < deadline:  # noqa: ASYNC110 - thread state
        await asyncio.sleep(0.01)
    assert pool.threads == 0
    assert await _backend.run_sync(lambda: 7) == 7


@pytest.mark.asyncio
async def test_an_unawaited_failed_batch_is_not_reported(tmp_path: Path) -> None:
    """A background batch's exception nobody awaits is retrieved (no 'never retrieved' log)."""
    fut = _backend.current().submit(_raise)
    assert fut is not None
    while not fut.done():  # noqa: ASYNC110 - polling a future on purpose
        await asyncio.sleep(0.001)
    # the done-callback ran: asyncio would log at garbage collection otherwise
    assert fut._log_traceback is False  # type: ignore[attr-defined]


def _raise() -> None:
    raise OSError(errno.EIO, "boom")


@pytest.mark.anyio
async def test_submit_is_asyncio_only(anyio_backend: str) -> None:
    """Off asyncio submit() declines, and batches are written before write() returns."""
    got = _backend.current().submit(lambda: None)
    if anyio_backend == "trio":
        assert got is None
    else:
        assert got is not None
        await got


def test_a_worker_outliving_its_loop_exits() -> None:
    """A call that finishes after its event loop closed ends its worker quietly."""
    release = threading.Event()
    loop = asyncio.new_event_loop()

    async def start() -> tuple[Any, Any]:
        return _backend.current().submit(release.wait), _backend.current().pool

    _, pool = loop.run_until_complete(start())
    wakeup = pool.wakeup
    assert wakeup.fd >= 0
    loop.close()
    release.set()
    deadline = time.monotonic() + 5
    while pool.threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.threads == 0
    # The result nobody collected is dropped: it would keep the loop (and its eventfd) alive.
    ref = weakref.ref(loop)
    del loop, pool, _
    gc.collect()
    assert ref() is None
    assert wakeup.fd == -1  # closed with the loop


def test_a_closed_loop_is_not_kept_alive_by_its_pool() -> None:
    """The pool refers to its loop weakly: a closed loop can be garbage-collected."""
    loop = asyncio.new_event_loop()
    assert loop.run_until_complete(_backend.run_sync(lambda: 5)) == 5
    ref = weakref.ref(loop)
    loop.close()
    del loop
    gc.collect()
    assert ref() is None


def _eventfds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
        except FileNotFoundError:  # the fd was closed meanwhile
            continue
    return n


def test_each_loop_s_wakeup_fd_is_closed_with_the_loop() -> None:
    """A pool's eventfd lives as long as its loop: 20 asyncio.run() leave none behind."""
    gc.collect()
    before = _eventfds()
    for _ in range(20):
        assert asyncio.run(_backend.run_sync(lambda: 5)) == 5
    # The last pools' workers notice their closed loop within POLL_SECONDS and let go.
    deadline = time.monotonic() + 5 * _pool.POLL_SECONDS + 2
    while _eventfds() != before and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert _eventfds() == before


def test_a_loop_without_add_reader_is_woken_with_call_soon_threadsafe() -> None:
    """On a loop that cannot watch fds (Windows' proactor) results still arrive."""

    class NoReaderLoop(asyncio.SelectorEventLoop):
        def add_reader(self, fd: Any, callback: Any, *args: Any) -> None:
            raise NotImplementedError

    loop = NoReaderLoop()
    fds = _eventfds()
    try:
        assert loop.run_until_complete(_backend.run_sync(lambda: 6)) == 6
        assert _backend.current(loop).pool.wakeup.fd == -1
        assert _eventfds() == fds  # the eventfd it could not use was closed
    finally:
        loop.close()
