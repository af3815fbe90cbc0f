"""The delivery session: batches, commit, abort, what a closed session refuses, and its
state machine driven as a model."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from maildrop import DEFAULT_SYSCALLS, Delivery, Maildir, MessageTooLargeError
from maildrop._session import DeliverySession
from maildrop._state import Phase

from .conftest import listing, settle, wait_for

pytestmark = pytest.mark.anyio

MSG = b"From: a@example.org\nTo: b@example.org\nSubject: session\n\nhello\n"


async def test_small_writes_are_batched_until_commit(maildir_path: Path) -> None:
    """Writes below a batch create nothing on disk; commit writes and publishes them all."""
    md = Maildir(maildir_path)
    await md.deliver(b"warm")
    before = listing(maildir_path)
    async with md.open_delivery() as s:
        for line in MSG.splitlines(keepends=True):
            await s.write(line)
        assert s.size == len(MSG)
        assert listing(maildir_path) == before  # still buffered: no tmp file yet
        d = await s.commit()
        assert s.closed
    assert d.path.read_bytes() == MSG
    assert d.path.parent == maildir_path / "new"
    assert listing(maildir_path)["tmp"] == []


async def test_a_closed_session_refuses_writes_and_commits(maildir_path: Path) -> None:
    """After commit or abort, write() and commit() raise RuntimeError naming the state."""
    md = Maildir(maildir_path)
    async with md.open_delivery() as s:
        await s.write(MSG)
        await s.commit()
        with pytest.raises(RuntimeError, match="already committed"):
            await s.write(b"more")
    async with md.open_delivery() as s:
        await s.write(MSG)
        await s.abort()
        with pytest.raises(RuntimeError, match="already aborted"):
            await s.commit()
        await s.abort()  # a second abort is a no-op
    assert len(listing(maildir_path)["new"]) == 1


async def test_abort_after_a_batch_removes_the_tmp_file(maildir_path: Path) -> None:
    """A session aborted after a batch reached the disk leaves nothing behind."""
    md = Maildir(maildir_path)
    async with md.open_delivery() as s:
        await s.write(b"x" * (2 << 20))  # at least one batch is written to tmp/
        assert len(listing(maildir_path)["tmp"]) == 1
        await s.abort()
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}


async def test_leaving_the_block_with_an_error_aborts(maildir_path: Path) -> None:
    """An exception inside ``async with`` aborts the delivery: nothing is published."""
    md = Maildir(maildir_path)
    with pytest.raises(LookupError, match="caller's own error"):
        async with md.open_delivery() as s:
            await s.write(b"x" * (2 << 20))
            raise LookupError("caller's own error")
    assert s.closed
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}


async def test_max_size_aborts_the_session(maildir_path: Path) -> None:
    """A write that passes max_size raises, aborts, and removes what was written."""
    md = Maildir(maildir_path, max_size=(1 << 20) + 10)
    async with md.open_delivery() as s:
        await s.write(b"x" * (1 << 20))
        with pytest.raises(MessageTooLargeError, match=str((1 << 20) + 10)):
            await s.write(b"y" * 20)
        assert s.closed
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}


# -- regressions --------------------------------------------------------------------------


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


# -- the session as a model of its state machine


def _files(root: Path, sub: str) -> list[str]:
    d = root / sub
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@settings(max_examples=30, stateful_step_count=8, deadline=None)
class SessionMachine(RuleBasedStateMachine):
    """Any sequence of calls on one session moves it as ``_state`` says and leaves the disk
    in the matching shape: nothing before commit, one message after, nothing after abort."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="maildrop-session-"))
        self.loop = asyncio.new_event_loop()
        self.session: DeliverySession = Maildir(self.dir / "m").open_delivery()
        self.model = Phase.WRITING
        self.written = b""

    def teardown(self) -> None:
        self.loop.close()
        shutil.rmtree(self.dir)

    def run(self, coro: object) -> None:
        self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    @rule(data=st.binary(min_size=1, max_size=64))
    def write(self, data: bytes) -> None:
        """write() is accepted only while writing."""
        if self.model is Phase.WRITING:
            self.run(self.session.write(data))
            self.written += data
        else:
            with pytest.raises(RuntimeError, match="cannot write"):
                self.run(self.session.write(data))

    @rule(action=st.sampled_from(["commit", "stage"]))
    def finish(self, action: str) -> None:
        """commit() makes the message durable, stage() keeps it in tmp/: once, while writing."""
        call = getattr(self.session, action)
        if self.model is Phase.WRITING:
            self.run(call())
            self.model = Phase.DURABLE if action == "commit" else Phase.STAGED
        else:
            with pytest.raises(RuntimeError, match=f"cannot {action}"):
                self.run(call())

    @rule()
    def abort(self) -> None:
        """abort() ends any unfinished request; a durable message stays."""
        self.run(self.session.abort())
        if self.model is not Phase.DURABLE:
            self.model = Phase.ABORTED

    @invariant()
    def phase_and_disk_agree(self) -> None:
        """The session's one state is the model's, and the disk shows exactly that."""
        assert self.session._phase is self.model
        assert self.session.closed == (self.model in (Phase.DURABLE, Phase.ABORTED))
        root = self.dir / "m"
        if self.model is Phase.DURABLE:
            (name,) = _files(root, "new")
            assert (root / "new" / name).read_bytes() == self.written
            assert _files(root, "tmp") == []
        elif self.model is Phase.ABORTED:
            assert _files(root, "new") == _files(root, "tmp") == []
        elif self.model is Phase.STAGED:
            assert len(_files(root, "tmp")) == 1
            assert _files(root, "new") == []
        else:
            assert _files(root, "new") == []


TestSessionMachine = SessionMachine.TestCase
