"""The syscall tables of append tasks (``compat._hooks``): shared when no hook is overridden."""

from __future__ import annotations

import asyncio
import gc
import os
import weakref
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import compat
from compat import _hooks
from maildrop import DEFAULT_SYSCALLS

Task = compat.MaildirMailboxAppendMessageTask
_PART = st.text(st.characters(blacklist_characters="/\0", codec="utf-8"), min_size=1)


async def result(d: Any) -> Any:
    """Wait for the Deferred *d* from asyncio and return its result (or raise)."""
    return await d.asFuture(asyncio.get_running_loop())


@given(base=st.lists(_PART).map("/".join) | st.sampled_from(["", "/", "/a/", "a/"]))
def test_join_is_os_path_join(base: str) -> None:
    """join() gives os.path.join's result for str and bytes bases alike."""
    assert _hooks.join(base, "new", "n1") == os.path.join(base, "new", "n1")
    raw = os.fsencode(base)
    assert _hooks.join(raw, "new", "n1") == os.path.join(raw, b"new", b"n1")
    path = Path(base or ".")
    assert _hooks.join(path, "tmp", "n") == os.path.join(path, "tmp", "n")


def test_tasks_without_hooks_share_their_table_and_maildir(tmp_path: Path) -> None:
    """Two hook-free tasks on one absolute path get the same table and the same Maildir."""
    box = compat.MaildirMailbox(str(tmp_path / "m"))
    one, two = Task(box, b"a"), Task(box, b"b")
    table = _hooks.hook_table(one)
    assert _hooks.hook_table(two) is table
    assert table is not DEFAULT_SYSCALLS  # it records tmpname/fh
    assert _hooks.maildir_for(box.path, table) is _hooks.maildir_for(box.path, table)
    assert _hooks.maildir_for(tmp_path / "m", table) is _hooks.maildir_for(box.path, table)


def test_a_task_with_a_hook_gets_a_table_and_maildir_of_its_own(tmp_path: Path) -> None:
    """An overridden hook is the task's own: neither its table nor its Maildir is shared."""

    class Hooked(Task):
        def osclose(self, fd: int) -> None:
            os.close(fd)

    box = compat.MaildirMailbox(str(tmp_path / "m"))
    plain, hooked = Task(box, b"a"), Hooked(box, b"b")
    table = _hooks.hook_table(hooked)
    assert table is not _hooks.hook_table(plain)
    assert table is not _hooks.hook_table(Hooked(box, b"c"))
    assert _hooks.maildir_for(box.path, table) is not _hooks.maildir_for(box.path, table)


def test_a_relative_path_is_not_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative path follows the current directory: its Maildir is built each time."""
    monkeypatch.chdir(tmp_path)
    table = _hooks.hook_table(Task(compat.MaildirMailbox("m"), b"a"))
    first = _hooks.maildir_for("m", table)
    assert first is not _hooks.maildir_for("m", table)
    assert first.path == tmp_path / "m"


def test_the_shared_caches_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the bound both caches are dropped whole, then filled again."""
    monkeypatch.setattr(_hooks, "_MAX_SHARED", 2)
    monkeypatch.setattr(_hooks, "_SHARED", {})
    monkeypatch.setattr(_hooks, "_MAILDIRS", {})
    bases = [DEFAULT_SYSCALLS.replace(fsync=os.fsync) for _ in range(3)]
    tables = [_hooks._shared_table(base) for base in bases]
    assert len(_hooks._SHARED) == 1  # the third emptied it
    assert _hooks._shared_table(bases[2]) is tables[2]
    for i in range(3):
        _hooks.maildir_for(str(tmp_path / f"m{i}"), tables[2])
    assert len(_hooks._MAILDIRS) == 1


@pytest.mark.asyncio
async def test_a_hook_free_task_records_its_tmp_file(tmp_path: Path) -> None:
    """tmpname/fh are set from the shared table's open: the tmp path and an fd number."""
    box = compat.MaildirMailbox(str(tmp_path / "m"))
    task = Task(box, b"Subject: x\n\nbody\n")
    task.startUp()
    await result(task.defer)
    assert isinstance(task.tmpname, str)
    assert os.path.dirname(task.tmpname) == str(tmp_path / "m" / "tmp")
    assert os.path.basename(task.tmpname) == os.path.basename(str(box.list[0]))
    assert task.fh >= 0


@pytest.mark.asyncio
async def test_a_delivered_task_is_freed_without_the_garbage_collector(tmp_path: Path) -> None:
    """No reference cycle outlives a delivery: the task goes once its last reference does."""
    box = compat.MaildirMailbox(str(tmp_path / "m"))
    await result(box.appendMessage(b"warm up"))
    gc.disable()
    try:
        task = Task(box, b"Subject: x\n\nbody\n")
        task.startUp()
        await result(task.defer)
        await asyncio.sleep(0)  # the pump's done callback
        gone = weakref.ref(task)
        del task
        assert gone() is None
    finally:
        gc.enable()


@pytest.mark.asyncio
async def test_callbacks_scheduled_by_a_task_s_deferred_do_not_keep_it_alive(
    tmp_path: Path,
) -> None:
    """A timer armed from ``defer``'s callback copies its context: the task is not in it."""
    loop = asyncio.get_running_loop()
    box = compat.MaildirMailbox(str(tmp_path / "m"))
    handles: list[asyncio.TimerHandle] = []
    refs = []
    try:
        for _ in range(3):
            task = Task(box, b"Subject: x\n\n" + b"y" * 1000)
            task.defer.addCallback(lambda _: handles.append(loop.call_later(3600, print)))
            task.startUp()
            await result(task.defer)
            refs.append(weakref.ref(task))
            del task
        await asyncio.sleep(0)  # the pumps' done callbacks
        gc.collect()
        assert len(handles) == 3
        assert [r() for r in refs] == [None, None, None]
    finally:
        for h in handles:
            h.cancel()
