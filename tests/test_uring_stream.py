"""Streamed messages on the io_uring backend (``maildrop._uring_stream``)."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from maildrop import Maildir, _backend, _dircache
from maildrop._uring import availability
from maildrop._uring_backend import UringBackend
from maildrop._uring_ops import Op

from .conftest import listing
from .test_uring_steps import Fail, named, only_first, ring_maildir

pytestmark = [
    pytest.mark.skipif(not availability().ok, reason=f"io_uring: {availability().reason}"),
    pytest.mark.asyncio,
]
BATCH = 300_000


async def batches(n: int = 8) -> AsyncIterator[bytes]:
    """*n* chunks of 300 kB: several ~1 MiB steps."""
    for i in range(n):
        yield bytes([65 + i]) * BATCH


def whole(n: int = 8) -> bytes:
    """What :func:`batches` yields, joined."""
    return b"".join(bytes([65 + i]) * BATCH for i in range(n))


def on_process_fd(name: str) -> Callable[[Op], bool]:
    """Match ops called *name* on a process fd (the streamed file, not a slot)."""
    return lambda op: op.name == name and not op.fixed and op.file_index == 0


async def test_a_streamed_message_runs_on_the_ring(tmp_path: Path) -> None:
    """Batches are written at the file position, fsynced apart, linked from /proc/self/fd."""
    hooks = Fail(named("nop"), 0)
    md, path = await ring_maildir(tmp_path, hooks)
    d = await md.deliver(batches(), flags="S")
    assert d.path.read_bytes() == whole()
    assert d.size == 8 * BATCH
    names = [name for name, _ in hooks.trace]
    assert names.count("writev") >= 2
    assert names.index("fsync") < names.index("linkat")
    assert listing(path)["tmp"] == []


async def test_each_durable_batch_starts_its_writeback(tmp_path: Path) -> None:
    """Every batch's write is chained with sync_file_range(WRITE) of exactly its bytes."""
    hooks = Fail(named("nop"), 0)
    md, _ = await ring_maildir(tmp_path, hooks)
    await md.deliver(batches())
    ops = [op for op in hooks.ops if not op.fixed and op.name in ("writev", "sync_file_range")]
    writes, syncs = ops[::2], ops[1::2]
    assert len(writes) == len(syncs) >= 2
    assert [(s.name, s.fd, s.addr2, s.length) for s in syncs] == [
        ("sync_file_range", w.fd, w.addr2, w.expect) for w in writes
    ]
    assert all(s.op_flags == 2 for s in syncs)  # SYNC_FILE_RANGE_WRITE: waits for nothing
    assert sum(w.expect for w in writes) == 8 * BATCH  # and the final fsync still runs
    assert ("sync_file_range", 0) in hooks.trace
    assert [name for name, _ in hooks.trace].count("fsync") >= 2


async def test_no_writeback_is_started_without_fsync(tmp_path: Path) -> None:
    """With fsync=False the batches are written alone."""
    md = Maildir(tmp_path / "m", backend="uring", fsync=False)
    await md.deliver(b"first")
    hooks = Fail(named("nop"), 0)
    backend = _backend.backend_for("uring")
    assert isinstance(backend, UringBackend)
    backend.ring.hooks = hooks
    d = await md.deliver(batches())
    assert d.path.read_bytes() == whole()
    names = [name for name, _ in hooks.trace]
    assert names.count("writev") >= 2
    assert "sync_file_range" not in names


async def test_a_short_batch_write_is_written_again(tmp_path: Path) -> None:
    """A short write severs its sync_file_range; the batch is written again from its start."""
    hooks = Fail(on_process_fd("writev"), 1000)
    md, _ = await ring_maildir(tmp_path, hooks)
    d = await md.deliver(batches())
    assert d.path.read_bytes() == whole()
    first = hooks.trace.index(("writev", 1000))
    # Its sync_file_range was severed (no completion); the rewrite goes alone.
    assert hooks.trace[first : first + 2] == [("writev", 1000), ("writev", 4 * BATCH)]
    assert [name for name, _ in hooks.trace].count("sync_file_range") == 1  # the next batch's


async def test_a_file_source_after_ring_batches_continues_in_a_thread(tmp_path: Path) -> None:
    """Ring batches, then a synchronous file: the thread step appends at the right place."""
    md, path = await ring_maildir(tmp_path)
    src = tmp_path / "src"
    src.write_bytes(b"tail" * 1000)
    async with md.open_delivery() as session:
        await session.write(b"h" * (2 * 1024 * 1024))
        with src.open("rb") as f:
            session.write_from(f)
            d = await session.commit()
    assert d.path.read_bytes() == b"h" * (2 * 1024 * 1024) + b"tail" * 1000
    assert listing(path)["tmp"] == []


@pytest.mark.parametrize(
    ("match", "err"),
    [
        (on_process_fd("writev"), errno.ENOSPC),
        (on_process_fd("fsync"), errno.EIO),
        (on_process_fd("sync_file_range"), errno.EIO),
        (named("linkat"), errno.EDQUOT),
        (on_process_fd("close"), errno.EIO),
        (named("unlinkat"), errno.EROFS),
        (lambda op: op.name == "statx" and op.fd >= 0, errno.EIO),
    ],
)
async def test_a_failed_op_fails_the_stream_and_leaves_nothing(
    tmp_path: Path, match: Callable[[Op], bool], err: int
) -> None:
    """Each op's failure is the delivery's OSError with its errno; nothing is left behind."""
    hooks = Fail(match, -err)
    md, path = await ring_maildir(tmp_path, hooks)
    with pytest.raises(OSError, match=r"\[Errno") as info:
        await md.deliver(batches())
    assert info.value.errno == err
    await asyncio.sleep(0.1)  # a failed step's cleanup runs in a worker
    assert only_first(path)


async def test_a_failed_create_fails_the_stream(tmp_path: Path) -> None:
    """The tmp file's open failing (EDQUOT) fails the delivery with its errno."""
    hooks = Fail(lambda op: op.name == "openat2" and op.fd >= 0, -errno.EDQUOT)
    md, path = await ring_maildir(tmp_path, hooks)
    with pytest.raises(OSError, match="Disk quota exceeded"):
        await md.deliver(batches())
    await asyncio.sleep(0.1)
    assert only_first(path)


@pytest.mark.parametrize("op", ["openat2", "linkat"])
async def test_taken_names_are_retried(tmp_path: Path, op: str) -> None:
    """EEXIST on the tmp file or on the link: another name, nothing clobbered."""
    match = named("linkat") if op == "linkat" else lambda o: o.name == op and o.fd >= 0
    hooks = Fail(match, -errno.EEXIST)
    md, path = await ring_maildir(tmp_path, hooks)
    d = await md.deliver(batches())
    assert d.path.read_bytes() == whole()
    assert hooks.left == 0
    assert len(listing(path)["new"]) == 2


async def test_no_free_name_for_the_stream(tmp_path: Path) -> None:
    """Every link refused with EEXIST: FileExistsError, nothing left."""
    hooks = Fail(named("linkat"), -errno.EEXIST, times=1000)
    md, path = await ring_maildir(tmp_path, hooks)
    with pytest.raises(FileExistsError, match="could not find a free name"):
        await md.deliver(batches())
    await asyncio.sleep(0.1)
    assert only_first(path)


async def test_no_free_tmp_name(tmp_path: Path) -> None:
    """Every tmp name refused with EEXIST: FileExistsError naming tmp/."""
    hooks = Fail(lambda o: o.name == "openat2" and o.fd >= 0, -errno.EEXIST, times=1000)
    md, path = await ring_maildir(tmp_path, hooks)
    with pytest.raises(FileExistsError, match=r"could not find a free name in .*/tmp/"):
        await md.deliver(batches())
    await asyncio.sleep(0.1)
    assert only_first(path)


async def test_a_filesystem_without_links_publishes_in_a_thread(tmp_path: Path) -> None:
    """linkat refused with EPERM (no hard links): the thread step's fallback publishes."""
    hooks = Fail(named("linkat"), -errno.EPERM)
    md, path = await ring_maildir(tmp_path, hooks)
    d = await md.deliver(batches())
    assert d.path.read_bytes() == whole()
    assert listing(path)["tmp"] == []


async def test_a_server_delivery_takes_the_kept_directories_on_the_ring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a server keeps directories, a whole message on the ring takes them (only the
    tmp file is opened) and gives them back; the first delivery keeps them, in a thread."""
    monkeypatch.setattr(_dircache, "_holders", 1)  # as while one server runs
    hooks = Fail(named("nop"), 0)
    md, path = await ring_maildir(tmp_path, hooks)
    kept = _dircache._table[(str(path), None, "new")]
    before = len(hooks.trace)
    async with md.open_delivery() as session:
        await session.write(b"kept\n")
        d = await session.commit()
    assert d.path.read_bytes() == b"kept\n"
    assert [name for name, _ in hooks.trace[before:]][:3] == ["openat2", "writev", "linkat"]
    assert _dircache._table[(str(path), None, "new")] is kept
    assert kept.users == 0
    _dircache.forget_all()
