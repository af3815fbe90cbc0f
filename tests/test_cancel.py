"""Cancellation: native asyncio task.cancel() and anyio/trio cancel scopes clean up."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from maildrop import DEFAULT_SYSCALLS, Delivery, Maildir, Syscalls, deliver_many

from .conftest import HeldCall, listing, open_fds, settle, wait_for

EMPTY = {"tmp": [], "new": [], "cur": []}
MSG = b"Subject: held\n\nbody\n"
#: How soon a cancelled caller must be back although its worker is stuck (issue 13).
RELEASED_WITHIN = 0.05


def slow(step: str, started: threading.Event, delay: float = 0.3) -> Syscalls:
    """A table whose *step* signals *started* then blocks the worker for *delay* seconds."""
    real = getattr(DEFAULT_SYSCALLS, step)

    def inner(*a: Any, **k: Any) -> Any:
        started.set()
        time.sleep(delay)
        return real(*a, **k)

    return DEFAULT_SYSCALLS.replace(**{step: inner})


@pytest.mark.asyncio
@pytest.mark.parametrize("step", ["write", "fsync", "open"])
async def test_native_cancel_during_a_worker_call(tmp_path: Path, step: str) -> None:
    """task.cancel() while the worker is inside a syscall: after its cleanup nothing stays."""
    md = tmp_path / "m"
    await Maildir(md).deliver(b"warm")
    before = listing(md)
    fds = open_fds()
    started = threading.Event()
    table = slow(step, started)
    task = asyncio.create_task(Maildir(md, syscalls=table).deliver(b"x" * 4096))
    await wait_for(started)
    task.cancel()
    with pytest.raises(asyncio.CancelledError, match=r"^$"):
        await task
    await settle(lambda: listing(md) == before and open_fds() == fds, "the worker's cleanup")


@pytest.mark.asyncio
async def test_native_cancel_while_reading_the_source(tmp_path: Path) -> None:
    """task.cancel() while the source is awaited, after a batch was written: tmp/ is emptied."""
    md = tmp_path / "m"
    gate = asyncio.Event()

    async def src() -> AsyncIterator[bytes]:
        yield b"a" * (2 * 1024 * 1024)
        gate.set()
        await asyncio.sleep(3600)
        yield b"never"

    task = asyncio.create_task(Maildir(md).deliver(src()))
    await gate.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError, match=r"^$"):
        await task
    await settle(lambda: listing(md) == EMPTY, "the cleanup job")


@pytest.mark.asyncio
async def test_native_cancel_after_link_keeps_the_message(tmp_path: Path) -> None:
    """Cancelled after the link: the complete message stays in new/ (delivered, not lost)."""
    md = tmp_path / "m"
    started = threading.Event()
    table = slow("fsync_dir", started)
    m = Maildir(md, syscalls=table)
    await Maildir(md).deliver(b"warm")
    # Two concurrent deliveries so the second waits on the first one's shared dir fsync.
    t1 = asyncio.create_task(m.deliver(b"one"))
    t2 = asyncio.create_task(m.deliver(b"two"))
    await wait_for(started)
    t2.cancel()
    await t1
    (outcome,) = await asyncio.gather(t2, return_exceptions=True)
    # Either outcome is right, as long as a returned delivery is in new/.
    assert isinstance(outcome, asyncio.CancelledError | Delivery), outcome
    assert isinstance(outcome, asyncio.CancelledError) or outcome.path.exists(), outcome
    files = listing(md)
    assert files["tmp"] == []
    bodies = sorted((md / "new" / n).read_bytes() for n in files["new"])
    assert b"one" in bodies
    assert set(bodies) <= {b"one", b"two", b"warm"}


@pytest.mark.asyncio
async def test_cancel_of_a_session_while_queued_for_a_thread(tmp_path: Path) -> None:
    """Cancelling many deliveries at random points leaves only complete messages."""
    md = tmp_path / "m"
    m = Maildir(md)
    await m.deliver(b"warm")
    tasks = [asyncio.create_task(m.deliver(b"z" * 3000)) for _ in range(200)]
    await asyncio.sleep(0.01)
    for t in tasks[::2]:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    files = listing(md)
    assert files["tmp"] == []
    for name in files["new"]:
        assert (md / "new" / name).read_bytes() in (b"warm", b"z" * 3000)
    done = [r for r in results if not isinstance(r, BaseException)]
    assert len(files["new"]) >= len(done) + 1


@pytest.mark.anyio
async def test_cancel_scope_during_worker_call(tmp_path: Path, anyio_backend: str) -> None:
    """An anyio cancel scope (asyncio or trio) expiring mid-write cleans up."""
    md = tmp_path / "m"
    started = threading.Event()
    table = slow("write", started, delay=0.2)

    async def cancel_once_writing(scope: anyio.CancelScope) -> None:
        with anyio.fail_after(10):  # a loaded machine may take a while to start the write
            while not started.is_set():  # noqa: ASYNC110 - set by a worker thread
                await anyio.sleep(0.001)
        scope.cancel()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_once_writing, scope)
            await Maildir(md, syscalls=table).deliver(b"x" * 4096)
    assert scope.cancelled_caught  # cancelled mid-write (the write sleeps 0.2 s)
    await settle(lambda: listing(md) == EMPTY, "the worker's cleanup")


@pytest.mark.anyio
async def test_cancel_scope_while_reading_source(tmp_path: Path, anyio_backend: str) -> None:
    """An anyio cancel scope expiring while the source waits cleans up the written batch."""
    md = tmp_path / "m"

    async def src() -> AsyncIterator[bytes]:
        yield b"a" * (2 * 1024 * 1024)
        await anyio.sleep(3600)
        yield b"never"

    with anyio.move_on_after(0.3):
        await Maildir(md).deliver(src())
    await settle(lambda: listing(md) == EMPTY, "the cleanup job")


@pytest.mark.anyio
async def test_session_semantics(tmp_path: Path, anyio_backend: str) -> None:
    """Leaving the block without commit aborts; an exception aborts and propagates."""
    md = Maildir(tmp_path / "m")
    async with md.open_delivery() as w:
        await w.write(b"a" * (2 * 1024 * 1024))
        assert w.size == 2 * 1024 * 1024
    assert w.closed
    assert listing(tmp_path / "m") == EMPTY
    with pytest.raises(KeyError, match="mine"):
        async with md.open_delivery() as w:
            await w.write(b"a" * (2 * 1024 * 1024))
            raise KeyError("mine")
    assert listing(tmp_path / "m") == EMPTY
    async with md.open_delivery() as w:
        await w.write(b"hello ")
        await w.write(b"world")
        d = await w.commit()
    assert d.path.read_bytes() == b"hello world"
    with pytest.raises(RuntimeError, match="already committed"):
        await w.write(b"more")
    with pytest.raises(RuntimeError, match="already committed"):
        await w.commit()
    await w.abort()  # a no-op after commit
    assert d.path.exists()
    w2 = md.open_delivery()
    await w2.write(b"x")
    await w2.abort()
    with pytest.raises(RuntimeError, match="already aborted"):
        await w2.write(b"y")


# -- a worker stuck in a syscall never holds up a cancelled caller ------------------------------


async def released_after_cancel(
    run: Callable[[], Awaitable[object]], ready: Callable[[], bool]
) -> float:
    """Start *run*, cancel it once *ready()* holds, and return how long it took to end."""
    scope = anyio.CancelScope()
    ended: list[float] = []

    async def call() -> None:
        with scope:
            await run()
        ended.append(time.monotonic())

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await settle(ready, "the held call")
        cancelled = time.monotonic()
        scope.cancel()
    assert scope.cancelled_caught
    return ended[0] - cancelled


@pytest.mark.anyio
@pytest.mark.parametrize("step", ["write", "fsync", "link", "fsync_dir"])
async def test_cancelled_deliver_returns_while_its_worker_is_blocked(
    tmp_path: Path, anyio_backend: str, step: str
) -> None:
    """Cancelled while its worker is stuck in *step*: back within 50 ms, cleaned up once freed."""
    md = tmp_path / "m"
    await Maildir(md).deliver(b"warm")
    before, fds = listing(md), open_fds()
    held = HeldCall(getattr(DEFAULT_SYSCALLS, step))
    m = Maildir(md, syscalls=DEFAULT_SYSCALLS.replace(**{step: held}))
    try:
        took = await released_after_cancel(lambda: m.deliver(MSG), held.entered.is_set)
        assert listing(md)["tmp"] != [] or step == "fsync_dir"  # the worker still owns it
    finally:
        held.release.set()
    assert took < RELEASED_WITHIN
    await settle(lambda: listing(md)["tmp"] == [] and open_fds() == fds, "the worker's cleanup")
    new = listing(md)["new"]
    if step in ("write", "fsync"):
        assert new == before["new"]  # never linked: nothing delivered
    else:  # linked before the cancel: delivered, as after any cancel past the link
        assert len(new) == len(before["new"]) + 1


@pytest.mark.anyio
async def test_cancelled_group_commit_waiters_return_while_the_dir_fsync_is_blocked(
    tmp_path: Path, anyio_backend: str
) -> None:
    """Deliveries cancelled while the shared fsync of new/ is stuck are back within 50 ms."""
    md = tmp_path / "m"
    await Maildir(md).deliver(b"warm")
    fds = open_fds()
    held = HeldCall(os.fsync)
    m = Maildir(md, syscalls=DEFAULT_SYSCALLS.replace(fsync_dir=held))

    async def two() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(m.deliver, MSG)

    try:
        # One delivery fsyncs new/ in its own hop, a shared fsync job covers the other.
        took = await released_after_cancel(two, lambda: held.calls == 2)
    finally:
        held.release.set()
    assert took < RELEASED_WITHIN
    await settle(lambda: listing(md)["tmp"] == [] and open_fds() == fds, "the jobs' cleanup")
    assert len(listing(md)["new"]) == 3  # both were linked: each stays delivered


@pytest.mark.anyio
@pytest.mark.parametrize("step", ["write", "fsync", "link", "fsync_dir"])
async def test_cancelled_deliver_many_returns_while_its_worker_is_blocked(
    tmp_path: Path, anyio_backend: str, step: str
) -> None:
    """deliver_many cancelled while a worker is stuck in *step*: back within 50 ms; the staging
    file is gone and every fd closed once the call is freed."""
    paths = [tmp_path / n for n in "abc"]
    for p in paths:
        await Maildir(p).deliver(b"warm")
    fds = open_fds()
    held = HeldCall(getattr(DEFAULT_SYSCALLS, step))
    mds = [Maildir(p, syscalls=DEFAULT_SYSCALLS.replace(**{step: held})) for p in paths]
    try:
        took = await released_after_cancel(lambda: deliver_many(MSG, mds), held.entered.is_set)
    finally:
        held.release.set()
    assert took < RELEASED_WITHIN
    await settle(
        lambda: all(listing(p)["tmp"] == [] for p in paths) and open_fds() == fds,
        "the worker's cleanup",
    )
    for p in paths:
        for name in listing(p)["new"]:
            assert (p / "new" / name).read_bytes() in (b"warm", MSG)


@pytest.mark.anyio
async def test_abort_from_another_task_waits_for_the_workers_cleanup(
    tmp_path: Path, anyio_backend: str
) -> None:
    """abort() while commit()'s worker is stuck in fsync: commit raises, abort() returns only
    once the worker has removed the tmp file, and nothing is published."""
    md = tmp_path / "m"
    await Maildir(md).deliver(b"warm")
    before = listing(md)
    held = HeldCall(os.fsync)
    m = Maildir(md, syscalls=DEFAULT_SYSCALLS.replace(fsync=held))
    errors: list[BaseException] = []

    async def commit(session: Any) -> None:
        try:
            await session.commit()
        except RuntimeError as exc:
            errors.append(exc)

    try:
        async with m.open_delivery() as session, anyio.create_task_group() as tg:
            await session.write(MSG)
            tg.start_soon(commit, session)
            await wait_for(held.entered)
            threading.Timer(0.1, held.release.set).start()
            await session.abort()
            assert listing(md) == before  # abort() returned after the worker's cleanup
    finally:
        held.release.set()
    assert len(errors) == 1
    assert "aborted while a worker was writing it" in str(errors[0])
