"""The engine's steps as io_uring chains (``maildrop._uring_steps``): failures and fallbacks."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from maildrop import Maildir, _backend, _uring_stream
from maildrop import _uring_abi as abi
from maildrop._uring import availability
from maildrop._uring_backend import UringBackend
from maildrop._uring_ops import Op

from .conftest import listing

pytestmark = [
    pytest.mark.skipif(not availability().ok, reason=f"io_uring: {availability().reason}"),
    pytest.mark.asyncio,
]
MSG = b"Subject: ring\n\n" + b"x" * 2000 + b"\n"


class Fail:
    """Ring hooks: the first *times* ops that *match* report *result* instead of running."""

    def __init__(self, match: Callable[[Op], bool], result: int, times: int = 1) -> None:
        self.match, self.result, self.left = match, result, times
        self.trace: list[tuple[str, int]] = []
        self.ops: list[Op] = []  # every op reaped, in order
        self.dir_fsyncs: list[int] = []  # results of fsyncs of a directory
        self._on_dirs: set[int] = set()  # ids of the fsync ops in flight on a directory

    def before_submit(self, op: Op) -> int | None:
        """Inject the result into a matching op while any are left."""
        if op.name == "fsync" and on_dir(op):
            self._on_dirs.add(id(op))
        if self.left and self.match(op):
            self.left -= 1
            return self.result
        return None

    def after_reap(self, op: Op, result: int) -> None:
        """Record every op."""
        self.trace.append((op.name, result))
        self.ops.append(op)
        if id(op) in self._on_dirs:
            self._on_dirs.discard(id(op))
            self.dir_fsyncs.append(result)


def named(name: str, *, on_a_dir: bool | None = None) -> Callable[[Op], bool]:
    """Match ops called *name* (and, if given, on a directory's fd or on the file's)."""
    return lambda op: op.name == name and (on_a_dir is None or on_dir(op) == on_a_dir)


def on_dir(op: Op) -> bool:
    """Whether *op*'s fd is a directory (``new/``), not the message file."""
    try:
        return stat.S_ISDIR(os.fstat(op.fd).st_mode)
    except OSError:
        return False


def creates(op: Op) -> bool:
    """Whether *op* creates the message's tmp file."""
    return op.name in ("openat", "openat2") and bool(open_flags(op) & os.O_CREAT)


def open_flags(op: Op) -> int:
    """The open flags of an ``openat`` (in the entry) or ``openat2`` (in its ``open_how``)."""
    if op.opcode == abi.OP_OPENAT2:
        how = op.keep[1]
        assert isinstance(how, ctypes.Array)
        return int(abi.OPEN_HOW.unpack(bytes(how))[0])
    return op.op_flags


async def ring_maildir(tmp_path: Path, hooks: Fail | None = None) -> tuple[Maildir, Path]:
    """A maildir on the ring, created by a first delivery, with *hooks* on the loop's ring."""
    path = tmp_path / "m"
    md = Maildir(path, backend="uring")
    await md.deliver(b"first")
    backend = _backend.backend_for("uring")
    assert isinstance(backend, UringBackend)
    backend.ring.hooks = hooks
    return md, path


def only_first(path: Path) -> bool:
    """Whether the maildir holds the first message only, and nothing in tmp/."""
    files = listing(path)
    return files["tmp"] == [] and [(path / "new" / n).read_bytes() for n in files["new"]] == [
        b"first"
    ]


@pytest.mark.parametrize(
    ("match", "err", "what"),
    [
        (named("writev"), errno.ENOSPC, "No space left on device"),
        (creates, errno.EDQUOT, "Disk quota exceeded"),
        (named("linkat"), errno.EIO, "Input/output error"),
        (named("close"), errno.EIO, "Input/output error"),
        (named("fsync", on_a_dir=True), errno.EROFS, "Read-only file system"),
        (lambda op: op.name == "statx" and op.fd >= 0, errno.EIO, "Input/output error"),
        (named("unlinkat"), errno.EIO, "Input/output error"),
    ],
)
async def test_a_failed_op_fails_the_delivery_and_leaves_nothing(
    tmp_path: Path, match: Callable[[Op], bool], err: int, what: str
) -> None:
    """Each op's failure is the delivery's OSError with its errno; nothing is left behind."""
    hooks = Fail(match, -err)
    md, path = await ring_maildir(tmp_path, hooks)
    with pytest.raises(OSError, match=what) as info:
        await md.deliver(MSG)
    assert info.value.errno == err
    assert hooks.left == 0
    await asyncio.sleep(0.05)  # a failed step's cleanup runs in a worker
    assert only_first(path)


async def test_a_whole_message_is_one_synced_write_chained_to_its_link(tmp_path: Path) -> None:
    """A message in one step: one writev with RWF_SYNC (no file fsync), then its link."""
    hooks = Fail(named("nop"), 0)
    md, _ = await ring_maildir(tmp_path, hooks)
    d = await md.deliver(MSG)
    assert d.path.read_bytes() == MSG
    names = [name for name, _ in hooks.trace]
    assert names[names.index("writev") + 1] == "linkat"
    assert ("fsync", 0) in hooks.trace  # new/ only: the write synced the file
    assert names.count("fsync") == 1
    assert [op.op_flags for op in hooks.ops if op.name == "writev"] == [abi.RWF_SYNC]


async def test_a_short_write_is_finished(tmp_path: Path) -> None:
    """A short write severs the chain: the rest is written and synced, then published."""
    hooks = Fail(named("writev"), 100)
    md, path = await ring_maildir(tmp_path, hooks)
    d = await md.deliver(MSG)
    assert d.path.read_bytes() == MSG
    assert ("fsync", 0) in hooks.trace
    assert listing(path)["tmp"] == []


async def test_a_write_of_nothing_fails(tmp_path: Path) -> None:
    """A write that keeps writing nothing fails with EIO instead of spinning."""
    hooks = Fail(named("writev"), 0, times=2)
    md, path = await ring_maildir(tmp_path, hooks)
    with pytest.raises(OSError, match="wrote nothing"):
        await md.deliver(MSG)
    await asyncio.sleep(0.05)
    assert only_first(path)


@pytest.mark.parametrize("op", ["openat2", "linkat"])
async def test_a_taken_name_is_never_clobbered(tmp_path: Path, op: str) -> None:
    """EEXIST on the tmp file or the link: the message goes under another name."""
    hooks = Fail(creates if op == "openat2" else named(op), -errno.EEXIST)
    md, path = await ring_maildir(tmp_path, hooks)
    d = await md.deliver(MSG)
    assert d.path.read_bytes() == MSG
    assert hooks.left == 0
    assert len(listing(path)["new"]) == 2
    assert listing(path)["tmp"] == []


@pytest.mark.parametrize("times", [1, 2])
async def test_a_filesystem_without_links_gets_the_message_again(
    tmp_path: Path, times: int
) -> None:
    """EPERM on the chained link (its tmp file is gone): written again into a new tmp file,
    then linked, or renamed by the thread step when the second link is refused too."""
    hooks = Fail(named("linkat"), -errno.EPERM, times=times)
    md, path = await ring_maildir(tmp_path, hooks)
    d = await md.deliver(MSG)
    assert d.path.read_bytes() == MSG
    assert hooks.left == 0
    assert [name for name, _ in hooks.trace].count("writev") == 2
    assert len(listing(path)["new"]) == 2
    assert listing(path)["tmp"] == []


async def test_no_free_name_after_every_try(tmp_path: Path) -> None:
    """A link refused with EEXIST every time ends with FileExistsError naming new/."""
    hooks = Fail(named("linkat"), -errno.EEXIST, times=1000)
    md, path = await ring_maildir(tmp_path, hooks)
    with pytest.raises(FileExistsError, match=r"could not find a free name in .*/new/"):
        await md.deliver(MSG)
    await asyncio.sleep(0.05)
    assert only_first(path)


async def chunks(n: int, size: int) -> AsyncIterator[bytes]:
    """*n* chunks of *size* bytes."""
    for i in range(n):
        yield bytes([65 + i % 26]) * size


async def test_many_chunks_are_several_writes_and_a_separate_fsync(tmp_path: Path) -> None:
    """Over 1 024 chunks in one step: several writes, then the file's own fsync, then links."""
    hooks = Fail(named("nop"), 0)
    md, _ = await ring_maildir(tmp_path, hooks)
    d = await md.deliver(chunks(1500, 100))
    assert d.path.read_bytes() == b"".join([bytes([65 + i % 26]) * 100 for i in range(1500)])
    names = [name for name, _ in hooks.trace]
    assert names.count("writev") == 2
    assert names.index("fsync") < names.index("linkat")


async def test_a_failed_file_fsync_publishes_nothing(tmp_path: Path) -> None:
    """The file's own fsync failing (a multi-write message) links nothing."""
    hooks = Fail(named("fsync", on_a_dir=False), -errno.EIO)
    md, path = await ring_maildir(tmp_path, hooks)
    with pytest.raises(OSError, match="Input/output error"):
        await md.deliver(chunks(1500, 100))
    assert ("linkat", 0) not in hooks.trace
    await asyncio.sleep(0.05)
    assert only_first(path)


async def test_a_failed_group_fsync_fails_every_waiter(tmp_path: Path) -> None:
    """The shared fsync(new/) failing fails every delivery it covered; their links go."""
    hooks = Fail(named("fsync", on_a_dir=True), -errno.EIO, times=100)
    md, path = await ring_maildir(tmp_path, hooks)
    results = await asyncio.gather(*(md.deliver(MSG) for _ in range(8)), return_exceptions=True)
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results)
    await asyncio.sleep(0.1)
    assert only_first(path)


async def test_concurrent_deliveries_share_the_ring_fsync(tmp_path: Path) -> None:
    """Concurrent deliveries are durable through fewer fsync(new/) than messages."""
    hooks = Fail(named("nop"), 0)
    md, path = await ring_maildir(tmp_path, hooks)
    await asyncio.gather(*(md.deliver(MSG) for _ in range(16)))
    assert 0 < len(hooks.dir_fsyncs) < 16
    assert len(listing(path)["new"]) == 17


async def test_a_symlink_above_the_maildir_goes_to_a_thread(tmp_path: Path) -> None:
    """A maildir reached through a symlinked parent is delivered by the thread step."""
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    md = Maildir(tmp_path / "link" / "m", backend="uring")
    await md.deliver(b"one")
    d = await md.deliver(b"two")
    assert d.path.read_bytes() == b"two"
    assert len(listing(tmp_path / "real" / "m")["new"]) == 2


async def test_a_maildir_of_another_owner_goes_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running as root into another user's maildir: the thread step gives them the file."""
    if os.geteuid() != 0:
        pytest.skip("needs root (chown)")
    md, path = await ring_maildir(tmp_path)
    os.chown(path, 4242, 4242)
    monkeypatch.setattr(_uring_stream, "FOREIGN", {"/elsewhere"})
    monkeypatch.setattr(_uring_stream, "_FOREIGN_MAX", 1)
    d = await md.deliver(MSG)
    assert d.path.stat().st_uid == 4242
    assert {str(path)} == _uring_stream.FOREIGN  # remembered (the bounded set was full)
    again = await md.deliver(MSG)  # remembered: straight to the thread step
    assert again.path.stat().st_uid == 4242
    assert listing(path)["tmp"] == []
