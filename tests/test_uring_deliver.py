"""The prototype io_uring delivery: protocol, no-clobber names, faults, group commit, cancel."""

from __future__ import annotations

import asyncio
import errno
import itertools
import mailbox
import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from maildrop import _uring_deliver
from maildrop._uring import Ring, availability
from maildrop._uring_deliver import UringMaildir
from maildrop._uring_hooks import Script
from maildrop._uring_ops import Op

from .conftest import listing, open_fds

AVAILABLE = availability()
pytestmark = [
    pytest.mark.skipif(not AVAILABLE.ok, reason=f"io_uring: {AVAILABLE.reason}"),
    pytest.mark.asyncio,
]
MSG = b"From: a@example.org\nSubject: hi\n\nbody\n" * 50


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    """An empty maildir."""
    for sub in ("tmp", "new", "cur"):
        (tmp_path / sub).mkdir()
    return tmp_path


@pytest_asyncio.fixture
async def ring() -> AsyncIterator[Ring]:
    """A ring attached to the test's event loop."""
    r = Ring.open(64, slots=32)
    r.attach(asyncio.get_running_loop())
    yield r
    r.close()


@pytest.fixture
def md(ring: Ring, maildir: Path) -> Iterator[UringMaildir]:
    """The maildir opened on the ring."""
    m = UringMaildir.open(ring, maildir)
    yield m
    m.close()


async def _settled(ring: Ring) -> None:
    async with asyncio.timeout(5):
        # The ring has no "idle" event to wait on (nothing in the engine needs one): poll it.
        while ring._inflight or ring._pending:  # noqa: ASYNC110
            await asyncio.sleep(0.001)


async def _cancel_mid_chain(md: UringMaildir) -> None:
    """Start a delivery, cancel it once its chain is queued, and wait for the ring to settle."""
    task = asyncio.create_task(md.deliver(MSG))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _settled(md.ring)


def _names(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    it = itertools.chain(names, (f"fresh{i}" for i in itertools.count()))
    monkeypatch.setattr(_uring_deliver, "new_name", lambda: next(it))


async def test_one_delivery_lands_in_new_with_its_bytes(md: UringMaildir, maildir: Path) -> None:
    """A delivery leaves exactly its bytes in new/ (0600), nothing in tmp/, one chained fsync."""
    name = await md.deliver(MSG)
    assert listing(maildir) == {"tmp": [], "new": [name], "cur": []}
    assert (maildir / "new" / name).read_bytes() == MSG
    assert stat.S_IMODE((maildir / "new" / name).stat().st_mode) == 0o600
    assert md.group.syncs == 0  # alone: fsync(new/) rode in the delivery's chain
    assert [m.as_bytes() for m in mailbox.Maildir(maildir, factory=None)] == [MSG]


async def test_concurrent_deliveries_share_directory_fsyncs(
    md: UringMaildir, maildir: Path
) -> None:
    """Concurrent deliveries all land, with fewer fsync(new/) than deliveries."""
    names = await asyncio.gather(*(md.deliver(MSG + bytes([i])) for i in range(30)))
    assert sorted(names) == listing(maildir)["new"]
    assert listing(maildir)["tmp"] == []
    assert 0 < md.group.syncs < md.group.covered == 29


async def test_a_taken_name_in_new_is_never_clobbered(
    md: UringMaildir, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """linkat's EEXIST picks a new name; the message already there is untouched."""
    (maildir / "new" / "taken").write_bytes(b"old")
    _names(monkeypatch, "taken")
    assert await md.deliver(MSG) == "fresh0"
    assert (maildir / "new" / "taken").read_bytes() == b"old"
    assert listing(maildir) == {"tmp": [], "new": ["fresh0", "taken"], "cur": []}
    assert md.group.syncs == 0  # the second attempt's chain carried its own fsync(new/)


async def test_no_free_name_gives_up_and_cleans_up(
    md: UringMaildir, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When every name tried is taken, the delivery fails with EEXIST and leaves nothing."""
    (maildir / "new" / "taken").write_bytes(b"old")
    monkeypatch.setattr(_uring_deliver, "new_name", lambda: "taken")
    monkeypatch.setattr(_uring_deliver, "NAME_TRIES", 3)
    with pytest.raises(FileExistsError, match="after 3 tries"):
        await md.deliver(MSG)
    await _settled(md.ring)
    assert listing(maildir) == {"tmp": [], "new": ["taken"], "cur": []}


async def test_a_taken_tmp_name_fails_and_frees_the_slot(
    md: UringMaildir, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O_EXCL refuses an existing tmp file: EEXIST, the file is left alone, the slot returns."""
    (maildir / "tmp" / "busy").write_bytes(b"other")
    _names(monkeypatch, "busy")
    free = len(md.ring.free_slots)
    with pytest.raises(FileExistsError, match="openat"):
        await md.deliver(MSG)
    assert len(md.ring.free_slots) == free
    assert (maildir / "tmp" / "busy").read_bytes() == b"other"


@pytest.mark.parametrize(
    ("inject", "match"),
    [
        ({1: -errno.ENOSPC}, "No space left"),
        ({1: -errno.EDQUOT}, "quota"),
        ({1: 10, 2: 0}, "wrote nothing"),
        ({1: 10, 2: -errno.EIO}, "Input/output error"),
        ({2: -errno.EROFS}, "Read-only file system"),
    ],
)
async def test_a_failed_step_leaves_nothing(
    md: UringMaildir, maildir: Path, inject: dict[int, int], match: str
) -> None:
    """A failed write, continuation or link raises with its errno; tmp/ and new/ stay empty."""
    md.ring.hooks = Script(inject=inject)
    with pytest.raises(OSError, match=match):
        await md.deliver(MSG)
    await _settled(md.ring)
    assert listing(maildir) == {"tmp": [], "new": [], "cur": []}
    assert len(md.ring.free_slots) == 32


async def test_a_short_write_is_completed_then_published(md: UringMaildir, maildir: Path) -> None:
    """After a short write the rest is written and the message is published whole."""
    script = Script(inject={1: 100})
    md.ring.hooks = script
    name = await md.deliver(MSG)
    assert (maildir / "new" / name).read_bytes() == MSG
    assert [(e.name, e.result) for e in script.trace[:4]] == [
        ("openat2", 0),
        ("write", 100),
        ("write", len(MSG) - 100),
        ("linkat", 0),
    ]


class _FailFsync:
    """Hooks that make every fsync report EIO."""

    def before_submit(self, op: Op) -> int | None:
        return -errno.EIO if op.name == "fsync" else None

    def after_reap(self, op: Op, result: int) -> None:
        pass


async def test_a_failed_directory_fsync_is_reported(md: UringMaildir, maildir: Path) -> None:
    """A failed fsync(new/), chained or shared, fails every delivery it covered."""
    md.ring.hooks = _FailFsync()
    results = await asyncio.gather(*(md.deliver(MSG) for _ in range(3)), return_exceptions=True)
    assert [type(r) for r in results] == [OSError] * 3
    assert all("fsync(new/)" in str(r) for r in results)
    await _settled(md.ring)
    assert listing(maildir)["tmp"] == []


async def test_a_cancelled_delivery_releases_the_caller_and_cleans_up(
    md: UringMaildir, maildir: Path
) -> None:
    """Cancelling mid-chain releases the caller; the chain's completion removes the tmp file."""
    task = asyncio.create_task(md.deliver(MSG))
    await asyncio.sleep(0)  # the chain is queued
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _settled(md.ring)
    assert listing(maildir)["tmp"] == []
    assert len(listing(maildir)["new"]) == 1  # its link had been chained: it is delivered
    assert len(md.ring.free_slots) == 32


async def test_a_cancelled_delivery_whose_open_failed_frees_its_slot(
    md: UringMaildir, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancelled delivery whose openat failed gives its slot back and touches nothing."""
    (maildir / "tmp" / "busy").write_bytes(b"other")
    _names(monkeypatch, "busy")
    await _cancel_mid_chain(md)
    assert listing(maildir) == {"tmp": ["busy"], "new": [], "cur": []}
    assert len(md.ring.free_slots) == 32


async def test_a_waiter_cancelled_in_group_commit_leaves_the_others(
    md: UringMaildir, maildir: Path
) -> None:
    """A delivery cancelled while waiting for the shared fsync does not disturb the others."""
    tasks = [asyncio.create_task(md.deliver(MSG)) for _ in range(6)]
    async with asyncio.timeout(5):
        while md.group.covered < 3:  # noqa: ASYNC110 - a counter, not an event, tells us
            await asyncio.sleep(0)
    tasks[-1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(isinstance(r, str) for r in results) >= 5
    await _settled(md.ring)
    assert listing(maildir)["tmp"] == []


async def test_open_refuses_a_symlinked_tmp_and_leaks_no_fd(
    ring: Ring, maildir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A symlinked tmp/ or a missing new/ is refused at open, with no fd left behind."""
    before = open_fds()
    (maildir / "new").rmdir()
    with pytest.raises(FileNotFoundError, match="new"):
        UringMaildir.open(ring, maildir)
    (maildir / "tmp").rmdir()
    (maildir / "tmp").symlink_to(tmp_path_factory.mktemp("elsewhere"))
    with pytest.raises(OSError, match="tmp") as info:
        UringMaildir.open(ring, maildir)
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert open_fds() == before


async def test_close_releases_the_directory_fds(ring: Ring, maildir: Path) -> None:
    """close() closes tmp/ and new/ once nothing in flight uses them."""
    before = open_fds()
    m = UringMaildir.open(ring, maildir)
    await m.deliver(MSG)
    m.close()
    await _settled(ring)
    assert open_fds() == before
    assert os.listdir(maildir / "new")


async def test_a_cancel_landing_after_the_chain_completed_still_cleans_up(
    md: UringMaildir, maildir: Path
) -> None:
    """A cancel that arrives between the chain's completion and the task's wake-up cleans up."""
    task: asyncio.Task[str] | None = None

    class CancelAtFsync(_FailFsync):
        def before_submit(self, op: Op) -> int | None:
            return None

        def after_reap(self, op: Op, result: int) -> None:
            if op.name == "fsync" and task is not None:
                task.cancel()

    md.ring.hooks = CancelAtFsync()
    task = asyncio.create_task(md.deliver(MSG))
    with pytest.raises(asyncio.CancelledError):
        await task
    await _settled(md.ring)
    assert listing(maildir)["tmp"] == []
    assert len(listing(maildir)["new"]) == 1
    assert len(md.ring.free_slots) == 32


async def test_a_cancelled_delivery_whose_write_failed_removes_its_tmp_file(
    md: UringMaildir, maildir: Path
) -> None:
    """A cancelled delivery whose chain stopped at a failed write is cleaned up by the orphan."""
    md.ring.hooks = Script(inject={1: -errno.ENOSPC})
    await _cancel_mid_chain(md)
    assert listing(maildir) == {"tmp": [], "new": [], "cur": []}
    assert len(md.ring.free_slots) == 32


async def test_a_cancelled_group_waiter_is_skipped_and_the_next_fsync_still_runs(
    md: UringMaildir,
) -> None:
    """A waiter cancelled before its fsync completes is skipped; later waiters get theirs."""
    first = asyncio.create_task(md.group.wait())
    second = asyncio.create_task(md.group.wait())
    await asyncio.sleep(0)  # first started an fsync; second waits for the next one
    first.cancel()
    async with asyncio.timeout(5):
        await second
    assert first.cancelled()
    assert (md.group.syncs, md.group.covered) == (2, 2)


async def test_the_trace_shows_the_protocol_order(md: UringMaildir) -> None:
    """The driver's trace of a lone delivery: sync-write < link < unlink < close < fsync(new/)."""
    script = Script()
    md.ring.hooks = script
    await md.deliver(MSG)
    assert [(e.name, e.result) for e in script.trace] == [
        ("openat2", 0),
        ("write", len(MSG)),
        ("linkat", 0),
        ("unlinkat", 0),
        ("close", 0),
        ("fsync", 0),
    ]
