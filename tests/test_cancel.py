"""Cancellation: native asyncio task.cancel() and anyio/trio cancel scopes clean up."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from maildrop import DEFAULT_SYSCALLS, Maildir, Syscalls

from .conftest import listing, open_fds

EMPTY = {"tmp": [], "new": [], "cur": []}


def slow(step: str, started: threading.Event, delay: float = 0.3) -> Syscalls:
    """A table whose *step* signals *started* then blocks the worker for *delay* seconds."""
    real = getattr(DEFAULT_SYSCALLS, step)

    def inner(*a: Any, **k: Any) -> Any:
        started.set()
        time.sleep(delay)
        return real(*a, **k)

    return DEFAULT_SYSCALLS.replace(**{step: inner})


async def wait_for(ev: threading.Event) -> None:
    """Poll a threading.Event from the loop."""
    while not ev.is_set():  # noqa: ASYNC110 - a thread's event, not a loop's
        await asyncio.sleep(0.001)


@pytest.mark.asyncio
@pytest.mark.parametrize("step", ["write", "fsync", "open"])
async def test_native_cancel_during_a_worker_call(tmp_path: Path, step: str) -> None:
    """task.cancel() while the worker is inside a syscall: once the task ends, nothing stays."""
    md = tmp_path / "m"
    await Maildir(md).deliver(b"warm")
    before = listing(md)
    fds = open_fds()
    started = threading.Event()
    table = slow(step, started)
    task = asyncio.create_task(Maildir(md, syscalls=table).deliver(b"x" * 4096))
    await wait_for(started)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert listing(md) == before
    assert open_fds() == fds


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
    with pytest.raises(asyncio.CancelledError):
        await task
    assert listing(md) == EMPTY


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
    with contextlib.suppress(asyncio.CancelledError):
        await t2
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
    with anyio.move_on_after(0.05):
        await Maildir(md, syscalls=table).deliver(b"x" * 4096)
    assert listing(md) == EMPTY


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
    assert listing(md) == EMPTY


@pytest.mark.anyio
async def test_session_semantics(tmp_path: Path, anyio_backend: str) -> None:
    """Leaving the block without commit aborts; an exception aborts and propagates."""
    md = Maildir(tmp_path / "m")
    async with md.open_delivery() as w:
        await w.write(b"a" * (2 * 1024 * 1024))
        assert w.size == 2 * 1024 * 1024
    assert w.closed
    assert listing(tmp_path / "m") == EMPTY
    with pytest.raises(KeyError):
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
