"""Group commit's directory fds: closed by the worker whose fsync covered them."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from maildrop import DEFAULT_SYSCALLS, Maildir

from .conftest import listing, open_fds

pytestmark = pytest.mark.anyio


class GatedDirSync:
    """A syscall table piece: the first *hold* directory fsyncs wait for ``gate``."""

    def __init__(self, hold: int = 1, fail_call: int | None = None) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.hold = hold
        self.fail_call = fail_call
        self.gate = threading.Event()
        self.closers: set[str] = set()

    def fsync_dir(self, fd: int) -> None:
        with self.lock:
            self.calls += 1
            n = self.calls
        if n <= self.hold:
            self.gate.wait(5)
        if n == self.fail_call:
            raise OSError(errno.EIO, "injected EIO in the shared fsync of new/")
        os.fsync(fd)

    def close_dir(self, fd: int) -> None:
        with self.lock:
            self.closers.add(threading.current_thread().name)
        os.close(fd)

    async def until_calls(self, n: int) -> None:
        with anyio.fail_after(5):
            while True:
                with self.lock:
                    if self.calls >= n:
                        return
                await anyio.sleep(0.002)


class Held:
    """A maildir holding one message whose first *hold* directory fsyncs wait for a gate,
    and a record of the bodies delivered into it."""

    def __init__(self, maildir_path: Path, hold: int) -> None:
        self.path = maildir_path
        self.probe = GatedDirSync(hold=hold)
        self.md = Maildir(
            maildir_path, syscalls=DEFAULT_SYSCALLS.replace(fsync_dir=self.probe.fsync_dir)
        )
        self.done: list[bytes] = []

    @classmethod
    async def make(cls, maildir_path: Path, hold: int) -> Held:
        await Maildir(maildir_path).deliver(b"warm")  # only publishing fsyncs new/ below
        return cls(maildir_path, hold)

    async def one(self, body: bytes) -> None:
        await self.md.deliver(body)
        self.done.append(body)


async def test_the_event_loop_closes_no_directory_fd(maildir_path: Path) -> None:
    """64 concurrent deliveries: every directory fd is closed, none by the loop's thread."""
    await Maildir(maildir_path).deliver(b"warm")
    probe = GatedDirSync(hold=0)
    md = Maildir(
        maildir_path,
        syscalls=DEFAULT_SYSCALLS.replace(fsync_dir=probe.fsync_dir, close_dir=probe.close_dir),
    )
    before = open_fds()
    async with anyio.create_task_group() as tg:
        for i in range(64):
            tg.start_soon(md.deliver, b"message %d\n" % i)
    assert len(listing(maildir_path)["new"]) == 65
    assert open_fds() == before
    assert probe.closers
    assert threading.current_thread().name not in probe.closers


async def test_a_waiter_cancelled_before_the_shared_fsync_leaks_nothing(
    maildir_path: Path,
) -> None:
    """Deliveries cancelled while they wait for the shared fsync: their fds closed once,
    their (complete) messages kept, the others durable. (On trio the one running the shared
    fsync finishes it first, shielded, and may return.)"""
    # 1: "first"'s own fsync; 2: the shared one the first waiter starts (both held).
    box = await Held.make(maildir_path, hold=2)
    probe, one, done = box.probe, box.one, box.done
    before = open_fds()
    scope = anyio.CancelScope()

    async def waiters() -> None:
        with scope:
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(one, b"waiter %d\n" % i)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, b"first\n")  # alone: its own fsync of new/ waits for the gate
        await probe.until_calls(1)
        tg.start_soon(waiters)
        await probe.until_calls(2)
        await anyio.sleep(0.1)  # all three linked, waiting for a shared fsync
        scope.cancel()
        tg.start_soon(one, b"last\n")
        await anyio.sleep(0.05)
        probe.gate.set()
    assert {b"first\n", b"last\n"} <= set(done)
    assert len(done) <= 3  # at most the waiter that ran the shared fsync (trio) got through
    assert len(listing(maildir_path)["new"]) == 6  # kept: complete, durable with "last"
    assert listing(maildir_path)["tmp"] == []
    assert open_fds() == before


async def test_a_cancelled_leader_leaves_the_shared_fsync_to_the_others(
    maildir_path: Path,
) -> None:
    """The delivery that started the shared fsync is cancelled: the fsync still runs to its
    end before another starts (none runs on a closed fd), the others return durable, and
    every directory fd is closed."""
    # 1: "first"'s own fsync, then the leader's shared one (both held).
    box = await Held.make(maildir_path, hold=2)
    probe, one, done = box.probe, box.one, box.done
    before = open_fds()
    leader = anyio.CancelScope()

    async def lead() -> None:
        with leader:
            await one(b"leader\n")

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, b"first\n")
        await probe.until_calls(1)
        tg.start_soon(lead)
        await probe.until_calls(2)  # the leader linked and started the shared fsync
        tg.start_soon(one, b"other 1\n")
        tg.start_soon(one, b"other 2\n")
        await anyio.sleep(0.1)  # both linked, waiting behind the leader's fsync
        leader.cancel()
        await anyio.sleep(0.1)
        assert probe.calls == 2  # no second shared fsync while the first is in flight
        probe.gate.set()
    assert {b"first\n", b"other 1\n", b"other 2\n"} <= set(done)
    assert len(listing(maildir_path)["new"]) == 5
    assert listing(maildir_path)["tmp"] == []
    assert open_fds() == before


async def test_a_failed_shared_fsync_unlinks_every_covered_message(maildir_path: Path) -> None:
    """The shared fsync of new/ fails: every delivery it covered raises EIO and removes its
    own link (its directory fds were left open for that), and no fd leaks."""
    await Maildir(maildir_path).deliver(b"warm")
    # 1: "first"'s own fsync, 2: the shared one covering the first linked waiter (both
    # held until all are linked), 3: the shared one covering the other two: it fails.
    probe = GatedDirSync(hold=2, fail_call=3)
    md = Maildir(maildir_path, syscalls=DEFAULT_SYSCALLS.replace(fsync_dir=probe.fsync_dir))
    before = open_fds()
    outcomes: list[Any] = []

    async def one(body: bytes) -> None:
        try:
            outcomes.append(await md.deliver(body))
        except OSError as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, b"first\n")
        await probe.until_calls(1)
        for i in range(3):
            tg.start_soon(one, b"covered %d\n" % i)
        await probe.until_calls(2)
        await anyio.sleep(0.1)
        probe.gate.set()
    errors = [o for o in outcomes if isinstance(o, OSError)]
    assert len(errors) == 2
    assert all(e.errno == errno.EIO for e in errors)
    assert len(listing(maildir_path)["new"]) == 3  # "warm", "first" and one covered
    assert listing(maildir_path)["tmp"] == []
    assert open_fds() == before


# -- regressions --------------------------------------------------------------------------


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


class SpawnRecorder:
    """A backend stand-in: ``spawn`` records each job's ``done`` instead of running it."""

    def __init__(self) -> None:
        self.done: list[Any] = []

    def spawn(self, fn: Any, *args: Any, done: Any) -> None:
        """Record *done*; the test ends the job."""
        self.done.append(done)


def callback_table() -> tuple[Any, SpawnRecorder, list[tuple[str, OSError | None]]]:
    """A group commit, a recording backend and a log of callbacks."""
    from maildrop._group_commit import GroupCommit

    table: dict[Any, Any] = {}
    gc = table[("m", "new")] = GroupCommit(("m", "new"), table)
    return gc, SpawnRecorder(), []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_on_durable_calls_back_once_a_fsync_started_after_the_link_ends() -> None:
    """A link made while a fsync runs waits for the next one, which the end of the first
    starts; each callback runs once, after the fsync that covers its link."""
    gc, backend, log = callback_table()
    gc.add(object())
    gc.on_durable(1, backend, lambda e: log.append(("one", e)))
    assert len(backend.done) == 1
    assert log == []
    gc.add(object())
    gc.on_durable(2, backend, lambda e: log.append(("two", e)))
    assert len(backend.done) == 1  # the running fsync may predate link 2
    backend.done[0](None)
    assert log == [("one", None)]
    assert len(backend.done) == 2  # started for link 2
    backend.done[1](None)
    assert log == [("one", None), ("two", None)]
    gc.on_durable(2, backend, lambda e: log.append(("again", e)))
    assert log[-1] == ("again", None)  # covered already: at once


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_on_durable_reports_a_failed_fsync() -> None:
    """A failed fsync fails every callback whose link it covered, then and later."""
    gc, backend, log = callback_table()
    gc.add(object())
    gc.on_durable(1, backend, lambda e: log.append(("one", e)))
    backend.done[0](OSError(errno.EIO, "Input/output error"))
    gc.on_durable(1, backend, lambda e: log.append(("late", e)))
    assert [name for name, _ in log] == ["one", "late"]
    for _, err in log:
        assert isinstance(err, OSError)
        assert err.errno == errno.EIO
        assert "fsync of the maildir failed" in str(err)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_raising_callback_does_not_lose_the_others() -> None:
    """Every callback a fsync covered is called even if one raises; the error goes on."""
    gc, backend, log = callback_table()
    gc.add(object())

    def boom(error: BaseException | None) -> None:
        raise RuntimeError("a callback's bug")

    gc.on_durable(1, backend, boom)
    gc.on_durable(1, backend, lambda e: log.append(("after", e)))
    with pytest.raises(RuntimeError, match="a callback's bug"):
        backend.done[0](None)
    assert log == [("after", None)]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_group_with_the_loops_table_is_the_running_loops_group() -> None:
    """group(key, groups(loop)) finds and counts the same group commit as group(key)."""
    from maildrop._group_commit import group, groups, release

    key = ("/nowhere/table-test", "new")
    table = groups(asyncio.get_running_loop())
    first = group(key)
    second = group(key, table)
    assert second is first
    assert table[key] is first
    assert first.inflight == 2
    first.inflight -= 2
    release(first)
    assert key not in table
