"""Review findings: one test per suspected engine bug (xfail until fixed) plus regressions."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from maildrop import DEFAULT_SYSCALLS, Delivery, Maildir, deliver_many

from .conftest import HeldCall, listing, open_fds, settle, wait_for

pytestmark = pytest.mark.anyio

MSG = b"From: a@example.org\nTo: b@example.org\nSubject: review\n\nhello\n"


# -- (1) durability --------------------------------------------------------------------------


async def test_concurrent_first_delivery_waits_until_the_new_maildir_is_durable(
    tmp_path: Path,
) -> None:
    """A delivery into a maildir that another delivery just created waits for its parent fsync."""
    parent = os.stat(tmp_path).st_ino
    entered, gate = threading.Event(), threading.Event()
    synced = threading.Event()

    def fsync_dir(fd: int) -> None:
        if os.fstat(fd).st_ino == parent:  # makes the new maildir's own entry durable
            entered.set()
            gate.wait(5)
            os.fsync(fd)
            synced.set()
            return
        os.fsync(fd)

    md = Maildir(tmp_path / "m", syscalls=DEFAULT_SYSCALLS.replace(fsync_dir=fsync_dir))
    seen: dict[str, bool] = {}

    async def second() -> None:
        await md.deliver(b"second")
        seen["durable"] = synced.is_set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(md.deliver, b"first")  # mkdir Maildir, then blocks in its fsync
            await wait_for(entered)
            tg.start_soon(second)  # finds the maildir made: must not return before the fsync
            await anyio.sleep(0.3)
            gate.set()
    finally:
        gate.set()
    assert seen["durable"]


async def test_group_commit_returns_only_after_a_covering_dir_fsync(
    tmp_path: Path,
) -> None:
    """Every concurrent commit returns after a directory fsync that began after its link."""
    lock = threading.Lock()
    clock = [0]
    links: dict[str, int] = {}
    syncs: list[tuple[int, int]] = []

    def tick() -> int:
        with lock:
            clock[0] += 1
            return clock[0]

    def link(src: str, dst: str, **kw: Any) -> None:
        os.link(src, dst, **kw)
        links[dst] = tick()

    def fsync_dir(fd: int) -> None:
        start = tick()
        time.sleep(0.002)
        os.fsync(fd)
        syncs.append((start, tick()))

    md = Maildir(tmp_path / "m", syscalls=DEFAULT_SYSCALLS.replace(link=link, fsync_dir=fsync_dir))
    await md.deliver(b"warm")  # the maildir exists: only new/ is fsynced below
    returned: dict[str, int] = {}

    async def one(i: int) -> None:
        d = await md.deliver(b"message %d\n" % i)
        returned[d.name] = tick()

    async with anyio.create_task_group() as tg:
        for i in range(24):
            tg.start_soon(one, i)
    assert len(returned) == 24
    for name, at in returned.items():
        linked = links[name]
        assert any(linked < s and e < at for s, e in syncs), name


# -- (2) leaks and cleanup -------------------------------------------------------------------


async def test_deliver_many_cancelled_while_staging_leaks_no_fds(tmp_path: Path) -> None:
    """Cancelling deliver_many while its staging file is fsynced leaves no fd open."""
    fsync = HeldCall(os.fsync, timeout=5)
    await Maildir(tmp_path / "a").deliver(b"warm")
    await Maildir(tmp_path / "b").deliver(b"warm")
    first = Maildir(tmp_path / "a", syscalls=DEFAULT_SYSCALLS.replace(fsync=fsync))
    second = Maildir(tmp_path / "b")
    before = open_fds()
    scopes: list[anyio.CancelScope] = []

    async def run() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await deliver_many(MSG, [first, second])

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await wait_for(fsync.entered)
            scopes[0].cancel()
            await anyio.sleep(0.05)
            fsync.release.set()
    finally:
        fsync.release.set()
    await settle(
        lambda: listing(tmp_path / "a")["tmp"] == [] and open_fds() <= before, "the cleanup"
    )


@pytest.mark.parametrize("anyio_backend", ["trio"])  # asyncio's pool runs queued jobs anyway
async def test_deliver_many_cancelled_while_a_dir_fsync_waits_for_a_thread(
    tmp_path: Path, anyio_backend: str
) -> None:
    """A cancel that lands while a target's directory fsync waits for a thread leaks no fd."""
    from maildrop._pool import THREADS, _anyio_limiter, run_sync

    hold, gate, blocked = threading.Event(), threading.Event(), threading.Event()

    def block(real: Any) -> Any:
        def inner(*args: Any, **kwargs: Any) -> Any:
            blocked.set()
            gate.wait(5)
            return real(*args, **kwargs)

        return inner

    table = DEFAULT_SYSCALLS.replace(fsync_dir=block(os.fsync), unlink=block(os.unlink))
    for name in ("a", "b"):
        await Maildir(tmp_path / name).deliver(b"warm")
    mds = [Maildir(tmp_path / name, syscalls=table) for name in ("a", "b")]
    before = open_fds()
    scopes: list[anyio.CancelScope] = []

    async def run() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await deliver_many(MSG, mds)

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(THREADS - 1):  # every thread token but one is busy elsewhere
                tg.start_soon(run_sync, hold.wait, 5)
            with anyio.fail_after(5):
                while _anyio_limiter().borrowed_tokens < THREADS - 1:  # noqa: ASYNC110
                    await anyio.sleep(0.002)
            tg.start_soon(run)
            await wait_for(blocked)  # the last token is stuck; a _sync task waits for one
            scopes[0].cancel()
            await anyio.sleep(0.05)
            gate.set()
            hold.set()
    finally:
        gate.set()
        hold.set()
    await settle(lambda: open_fds() <= before, "the workers' cleanup")


def test_worker_threads_do_not_outlive_their_event_loop(tmp_path: Path) -> None:
    """Many short asyncio.run() calls do not pile up idle worker threads of closed loops."""
    import asyncio

    md = Maildir(tmp_path / "m", fsync=False)
    asyncio.run(md.deliver(b"warm"))
    base = threading.active_count()
    for _ in range(20):
        asyncio.run(md.deliver(MSG))
    deadline = time.monotonic() + 2.0
    while threading.active_count() > base + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= base + 2


async def test_cancel_does_not_block_the_loop_on_a_worker_cleanup(maildir_path: Path) -> None:
    """A cancel that lands while the worker cleans up does not stall the event loop."""
    in_unlink, gate = threading.Event(), threading.Event()

    def write(fd: int, data: Any) -> int:
        raise OSError(errno.EIO, "injected EIO in write")

    def unlink(*args: Any, **kwargs: Any) -> None:
        in_unlink.set()
        gate.wait(5)
        os.unlink(*args, **kwargs)

    await Maildir(maildir_path).deliver(b"warm")
    md = Maildir(maildir_path, syscalls=DEFAULT_SYSCALLS.replace(write=write, unlink=unlink))
    scopes: list[anyio.CancelScope] = []

    async def run() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await md.deliver(MSG)

    timer = threading.Timer(0.4, gate.set)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await wait_for(in_unlink)  # the worker holds tmp.lock inside cleanup()
            timer.start()
            t0 = time.monotonic()
            scopes[0].cancel()
            await anyio.sleep(0.01)  # the cancelled task runs _abort meanwhile
            stalled = time.monotonic() - t0
    finally:
        timer.cancel()
        gate.set()
    await settle(lambda: listing(maildir_path)["tmp"] == [], "the worker's cleanup")
    assert stalled < 0.2


# -- session semantics -----------------------------------------------------------------------


async def test_abort_during_group_commit_never_reports_a_removed_message(
    maildir_path: Path,
) -> None:
    """commit() racing abort() either raises or returns a message that exists."""
    lock = threading.Lock()
    entries = [0]
    gate = threading.Event()

    def fsync_dir(fd: int) -> None:
        with lock:
            entries[0] += 1
        gate.wait(5)
        os.fsync(fd)

    def count() -> int:
        with lock:
            return entries[0]

    async def until(n: int) -> None:
        with anyio.fail_after(5):
            while count() < n:  # noqa: ASYNC110 - worker threads count
                await anyio.sleep(0.002)

    await Maildir(maildir_path).deliver(b"warm")  # only publishing fsyncs directories below
    md = Maildir(maildir_path, syscalls=DEFAULT_SYSCALLS.replace(fsync_dir=fsync_dir))
    result: dict[str, Any] = {}

    async def commit(session: Any, key: str) -> None:
        try:
            result[key] = await session.commit()
        except Exception as exc:
            result[key] = exc

    try:
        async with md.open_delivery() as s1, md.open_delivery() as s2:
            await s1.write(b"one\n")
            await s2.write(b"two\n")
            async with anyio.create_task_group() as tg:
                tg.start_soon(commit, s1, "s1")  # alone: fsyncs new/ in its own hop
                await until(1)
                tg.start_soon(commit, s2, "s2")  # linked; runs the shared fsync of new/
                await until(2)
                tg.start_soon(s2.abort)
                await anyio.sleep(0.05)
                gate.set()
    finally:
        gate.set()
    d = result["s2"]
    assert not isinstance(d, Delivery) or d.path.exists(), (d, listing(maildir_path))


# -- (7) what the source hands over ----------------------------------------------------------


async def test_readonly_view_of_a_mutable_buffer_is_copied(maildir_path: Path) -> None:
    """write() owns its data once it returns, even for a read-only view of a bytearray."""
    buf = bytearray(MSG)
    async with Maildir(maildir_path).open_delivery() as s:
        await s.write(memoryview(buf).toreadonly())
        buf[:4] = b"XXXX"  # the caller reuses its buffer
        d = await s.commit()
    assert d.path.read_bytes() == MSG


async def test_caller_may_release_its_view_once_write_returns(maildir_path: Path) -> None:
    """write() keeps no reference that the caller's memoryview.release() can invalidate."""
    async with Maildir(maildir_path).open_delivery() as s:
        view = memoryview(MSG)
        await s.write(view)
        view.release()
        d = await s.commit()
    assert d.path.read_bytes() == MSG


async def test_compressed_file_source_delivers_what_read_returns(
    tmp_path: Path, maildir_path: Path
) -> None:
    """A file object that decodes on read() delivers its decoded bytes, not its fd's bytes."""
    import gzip

    packed = tmp_path / "msg.gz"
    with gzip.open(packed, "wb") as g:
        g.write(MSG)
    with gzip.open(packed, "rb") as f:
        d = await Maildir(maildir_path).deliver(f)
    assert d.path.read_bytes() == MSG


async def test_nonblocking_file_without_data_is_not_the_end(maildir_path: Path) -> None:
    """A non-blocking file with no data available yet is never delivered truncated."""
    r, w = os.pipe()
    try:
        os.write(w, b"Subject: part one\n\n")
        os.set_blocking(r, False)
        with (
            open(r, "rb", closefd=False) as f,
            pytest.raises(BlockingIOError, match="non-blocking and had no data"),
        ):
            await Maildir(maildir_path).deliver(f)
    finally:
        os.close(r)
        os.close(w)
    assert listing(maildir_path)["new"] == []


async def test_str_chunks_never_get_through(maildir_path: Path) -> None:
    """str from any source kind is refused with TypeError and leaves nothing behind."""

    class AsyncReader:
        async def read(self, n: int) -> Any:
            return "text"

    async def agen() -> AsyncIterator[Any]:
        yield b"ok"
        yield "text"

    class SyncReader:
        def read(self, n: int = -1) -> Any:
            return "text"

    md = Maildir(maildir_path)
    for source in (AsyncReader(), agen(), SyncReader()):
        with pytest.raises(TypeError):
            await md.deliver(source)
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}


# -- (6) the caller's exceptions -------------------------------------------------------------


async def test_deliver_many_raises_a_source_oserror(tmp_path: Path) -> None:
    """An OSError raised by the source propagates from deliver_many as the same object."""
    boom = ConnectionResetError(errno.ECONNRESET, "peer went away")

    async def src() -> AsyncIterator[bytes]:
        yield MSG
        raise boom

    with pytest.raises(ConnectionResetError) as info:
        await deliver_many(src(), [Maildir(tmp_path / "a"), Maildir(tmp_path / "b")])
    assert info.value is boom


async def test_source_oserror_propagates_from_deliver(maildir_path: Path) -> None:
    """deliver() raises the source's OSError as the same object and leaves nothing."""
    boom = ConnectionResetError(errno.ECONNRESET, "peer went away")

    async def src() -> AsyncIterator[bytes]:
        yield b"x" * (2 * 1024 * 1024)  # a batch is in flight when the source fails
        raise boom

    with pytest.raises(ConnectionResetError) as info:
        await Maildir(maildir_path).deliver(src())
    assert info.value is boom
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}
