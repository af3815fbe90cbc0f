"""Committing on the io_uring backend from callbacks (``maildrop._uring_commit``): the group
commit's job and ``Maildir.deliver`` of bytes as one future."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest

from maildrop import Maildir, _group_commit
from maildrop._steps import Steps
from maildrop._uring import availability
from maildrop._uring_backend import UringBackend
from maildrop._uring_commit import SyncAndClose

from .conftest import listing
from .test_uring_steps import MSG, Fail, named, ring_maildir
from .test_uring_whole import open_dirs_of, ring_backend

pytestmark = [
    pytest.mark.skipif(not availability().ok, reason=f"io_uring: {availability().reason}"),
    pytest.mark.asyncio,
]


async def test_a_job_whose_deliveries_are_all_gone_ends_at_once(tmp_path: Path) -> None:
    """Every covered delivery cleaned up already: no fsync, ``done(None)`` next turn."""
    md, _ = await ring_maildir(tmp_path, Fail(named("nop"), 0))
    tmp = Steps(md._settings).tmp
    tmp.cleaned = True
    ended: list[BaseException | None] = []
    SyncAndClose(ring_backend(), [tmp], ended.append).start()
    await asyncio.sleep(0)  # reported in the next loop turn
    assert ended == [None]


async def test_an_aborted_covered_delivery_is_cleaned_up_before_the_job_ends(
    tmp_path: Path,
) -> None:
    """A covered delivery aborted meanwhile: the fsync runs through it, then a worker cleans
    it up (its directories closed), and only then the job ends."""
    md, path = await ring_maildir(tmp_path)
    tmp = Steps(md._settings).tmp
    tmp.open_dirs()
    tmp.aborted = True
    ended = asyncio.get_running_loop().create_future()
    SyncAndClose(ring_backend(), [tmp], ended.set_result).start()
    assert await asyncio.wait_for(ended, 5) is None
    assert tmp.cleaned
    assert open_dirs_of(path) == []


async def test_a_cancelled_waiter_keeps_its_linked_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while it waits for the shared fsync: the message was linked, it stays and
    the fsync still makes it durable; nothing is left open."""
    md, path = await ring_maildir(tmp_path)
    backend = ring_backend()
    held: list[tuple[Any, tuple[Any, ...], Any]] = []
    spawn = UringBackend.spawn
    monkeypatch.setattr(UringBackend, "spawn", lambda _, fn, *a, done: held.append((fn, a, done)))
    first = asyncio.create_task(md.deliver(MSG))  # alone: its chain syncs new/
    second = asyncio.create_task(md.deliver(MSG + b"2"))  # waits for a shared fsync
    while not held:  # noqa: ASYNC110 - the job is held by the stand-in above
        await asyncio.sleep(0.001)
    second.cancel()
    with pytest.raises(asyncio.CancelledError, match=r"^$"):
        await second
    await first
    assert len(listing(path)["new"]) == 3  # linked before the cancel: kept
    ended = asyncio.get_running_loop().create_future()
    fn, args, done = held[0]
    spawn(backend, fn, *args, done=lambda e: (done(e), ended.set_result(e)))
    assert await asyncio.wait_for(ended, 5) is None
    await asyncio.sleep(0.01)
    assert len(listing(path)["new"]) == 3
    assert listing(path)["tmp"] == []
    assert open_dirs_of(path) == []


async def test_without_fsync_no_directory_fsync_is_counted(tmp_path: Path) -> None:
    """``fsync=False``: the chain is all; no directory fsync is counted or made."""
    hooks = Fail(named("nop"), 0)
    _, path = await ring_maildir(tmp_path, hooks)
    fast = Maildir(path, backend="uring", fsync=False)
    before = dict(_group_commit.STATS)
    await asyncio.gather(*(fast.deliver(MSG) for _ in range(4)))
    assert _group_commit.STATS["dir_fsyncs"] == before["dir_fsyncs"]
    assert _group_commit.STATS["deliveries"] == before["deliveries"] + 4
    assert "fsync" not in [name for name, _ in hooks.trace]
    assert len(listing(path)["new"]) == 5


async def test_a_failed_delivery_leaves_the_group_commit_table(tmp_path: Path) -> None:
    """A delivery that fails before its link still leaves the group commit's table empty."""
    md, _ = await ring_maildir(tmp_path, Fail(named("writev"), -errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        await md.deliver(MSG)
    assert _group_commit._groups() == {}
