"""A whole message from completion callbacks (``maildrop._uring_whole``): shared directories,
its outcomes and its cancellation."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from maildrop import Maildir, MessageTooLargeError, _backend, _uring_whole
from maildrop._dircache import Entry
from maildrop._steps import Steps
from maildrop._uring import availability
from maildrop._uring_backend import UringBackend
from maildrop._uring_ops import Op
from maildrop._uring_whole import Whole
from maildrop._writer import Aborted

from .conftest import listing
from .test_uring_steps import MSG, Fail, creates, named, only_first, ring_maildir

pytestmark = [
    pytest.mark.skipif(not availability().ok, reason=f"io_uring: {availability().reason}"),
    pytest.mark.asyncio,
]


def ring_backend() -> UringBackend:
    """The running loop's io_uring backend."""
    backend = _backend.backend_for("uring")
    assert isinstance(backend, UringBackend)
    return backend


def dir_opens(hooks: Fail) -> int:
    """How many directories the ring opened (openat2 of a directory path: no O_CREAT)."""
    return sum(1 for op in hooks.ops if op.name == "openat2" and not creates(op))


def open_dirs_of(path: Path) -> list[str]:
    """The fds of this process open on *path* or below it."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            fds.append(target)
    return fds


async def in_workers(md: Maildir, workers: int, each: int) -> None:
    """Deliver *each* messages one after another in each of *workers* concurrent tasks."""

    async def worker() -> None:
        for _ in range(each):
            await md.deliver(MSG)

    await asyncio.gather(*(worker() for _ in range(workers)))


async def test_deliveries_in_flight_share_their_directories(tmp_path: Path) -> None:
    """Four workers delivering four messages each open tmp/ and new/ fewer times than
    sixteen (a delivery finds others in flight), and nothing stays open once they returned."""
    hooks = Fail(named("nop"), 0)
    md, path = await ring_maildir(tmp_path, hooks)
    await in_workers(md, 4, 4)
    assert len(listing(path)["new"]) == 17
    assert 0 < dir_opens(hooks) < 2 * 16
    assert open_dirs_of(path) == []


async def test_sequential_deliveries_open_their_own_directories(tmp_path: Path) -> None:
    """One at a time: nobody in flight to share with, each opens tmp/ and new/ itself."""
    hooks = Fail(named("nop"), 0)
    md, path = await ring_maildir(tmp_path, hooks)
    for _ in range(3):
        await md.deliver(MSG)
    assert dir_opens(hooks) == 2 * 3
    assert open_dirs_of(path) == []


async def test_old_shared_directories_are_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Directories opened longer than ``MAX_AGE`` ago are not shared (a moved maildir is
    picked up): every delivery opens its own."""
    monkeypatch.setattr(_uring_whole, "MAX_AGE", -1.0)
    hooks = Fail(named("nop"), 0)
    md, path = await ring_maildir(tmp_path, hooks)
    await in_workers(md, 2, 2)
    assert dir_opens(hooks) == 2 * 4
    assert open_dirs_of(path) == []


async def test_failed_deliveries_leave_nothing_open(tmp_path: Path) -> None:
    """Concurrent deliveries, one failing: the others are delivered, nothing is left in
    tmp/ and no directory stays open."""
    hooks = Fail(named("writev"), -errno.ENOSPC)
    md, path = await ring_maildir(tmp_path, hooks)
    results = await asyncio.gather(*(md.deliver(MSG) for _ in range(4)), return_exceptions=True)
    assert sum(isinstance(r, OSError) and r.errno == errno.ENOSPC for r in results) == 1
    await asyncio.sleep(0.05)  # the failed delivery's cleanup runs in a worker
    assert len(listing(path)["new"]) == 4
    assert listing(path)["tmp"] == []
    assert open_dirs_of(path) == []


async def test_a_failed_delivery_stops_sharing_its_directories(tmp_path: Path) -> None:
    """``forget`` drops the table's entry of a failed delivery, not another's."""
    md, _ = await ring_maildir(tmp_path)
    shared = ring_backend().shared
    key = (md._settings.path, "new")
    one, other = Steps(md._settings).tmp, Steps(md._settings).tmp
    one.open_dirs()
    shared.offer(one)
    assert shared[key] is one._kept
    other._kept = Entry(other, (0, 0))
    shared.forget(other)
    assert shared[key] is one._kept
    shared.forget(one)
    assert key not in shared
    one.close_dirs()


async def test_an_aborted_delivery_is_refused_before_any_op(tmp_path: Path) -> None:
    """A delivery aborted before its step started reports ``Aborted`` and queues nothing."""
    md, _ = await ring_maildir(tmp_path, Fail(named("nop"), 0))
    hooks = ring_backend().ring.hooks
    assert isinstance(hooks, Fail)
    steps = Steps(md._settings)
    steps.tmp.aborted = True
    job = Whole(ring_backend(), steps, [MSG], True)
    job.start()
    with pytest.raises(Aborted, match=r"^$"):
        await job.future
    assert hooks.ops == []
    assert job.ending().done()


async def test_an_empty_message_is_written_step_by_step(tmp_path: Path) -> None:
    """Nothing to write in the chain: the step-by-step path publishes an empty file."""
    md, path = await ring_maildir(tmp_path)
    d = await md.deliver(b"")
    assert d.path.read_bytes() == b""
    assert d.size == 0
    assert listing(path)["tmp"] == []


class Series(Fail):
    """Ring hooks: matching ops report *results* in turn."""

    def __init__(self, match: Callable[[Op], bool], results: list[int]) -> None:
        super().__init__(match, 0, times=len(results))
        self.results = results

    def before_submit(self, op: Op) -> int | None:
        """Inject the next result into a matching op."""
        if self.left and self.match(op):
            self.left -= 1
            return self.results.pop(0)
        return None


async def test_a_failed_step_by_step_rest_fails_the_delivery(tmp_path: Path) -> None:
    """A short write sends the rest step by step; its failure is the delivery's, and
    nothing is left."""
    hooks = Series(named("writev"), [100, -errno.EIO])
    md, path = await ring_maildir(tmp_path, hooks)
    with pytest.raises(OSError, match="Input/output error"):
        await md.deliver(MSG)
    assert hooks.left == 0
    await asyncio.sleep(0.05)
    assert listing(path)["tmp"] == []
    assert len(listing(path)["new"]) == 1


async def test_a_cancelled_caller_leaves_at_once_and_the_chain_cleans_up(
    tmp_path: Path,
) -> None:
    """Cancelled while its chain runs: the caller leaves, and once the chain is over the
    message is gone (it was not acknowledged), its directories closed."""
    md, path = await ring_maildir(tmp_path)
    task = asyncio.create_task(md.deliver(MSG))
    await asyncio.sleep(0)  # the delivery queued its first ops
    task.cancel()
    with pytest.raises(asyncio.CancelledError, match=r"^$"):
        await task
    backend = ring_backend()
    assert backend.jobs  # the chain's cleanup, waited for as a job
    await asyncio.gather(*backend.jobs)
    await asyncio.sleep(0.05)
    assert listing(path)["tmp"] == []
    assert [(path / "new" / n).read_bytes() for n in listing(path)["new"]] == [b"first"]
    assert open_dirs_of(path) == []


async def test_ending_is_done_once_the_delivery_is_over(tmp_path: Path) -> None:
    """``ending()`` asked after the outcome is done already."""
    md, _ = await ring_maildir(tmp_path)
    job = Whole(ring_backend(), Steps(md._settings), [MSG], True)
    job.start()
    assert isinstance(await job.future, str)
    assert job.ending().done()


async def test_the_shared_table_keeps_fresh_live_directories_only(tmp_path: Path) -> None:
    """An entry nobody uses any more (its fds closed) is replaced by the next opener."""
    md, _ = await ring_maildir(tmp_path)
    shared = ring_backend().shared
    steps = Steps(md._settings)
    assert not shared.take(steps.tmp, md._settings.path)  # nothing shared
    key = (md._settings.path, "new")
    steps.tmp.dir_fds, steps.tmp.tmp_fd, steps.tmp.dest_fd = [], -1, -1
    dead = Entry(steps.tmp, (0, 0))
    dead.users = 0
    shared[key] = dead
    assert not shared.take(steps.tmp, md._settings.path)  # closed: not taken
    await md.deliver(MSG)
    assert shared[key] is not dead  # the next opener offered its own


async def test_a_maildir_without_the_ring_s_openat2_goes_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the directories cannot be opened on the ring (no openat2), the thread step
    does it all."""
    md, path = await ring_maildir(tmp_path)
    monkeypatch.setattr(ring_backend().ring, "has_openat2", False)
    d = await md.deliver(MSG)
    assert d.path.read_bytes() == MSG
    assert len(listing(path)["new"]) == 2


async def test_a_delivery_on_threads_never_takes_this_path(tmp_path: Path) -> None:
    """``backend="threads"`` delivers through its session: the ring is never opened."""
    md = Maildir(tmp_path / "m", backend="threads")
    d = await md.deliver(MSG)
    assert d.path.read_bytes() == MSG


async def test_a_replaced_maildir_is_not_shared(tmp_path: Path) -> None:
    """Shared directories are taken only while the maildir's path still names them: after
    the maildir is moved away and made again, a delivery opens the new one."""
    md, path = await ring_maildir(tmp_path)
    shared = ring_backend().shared
    opener = Steps(md._settings).tmp
    opener.open_dirs()
    shared.offer(opener)
    taker = Steps(md._settings).tmp
    assert shared.take(taker, md._settings.path)
    taker.close_dirs()
    path.rename(tmp_path / "old")
    assert not shared.take(taker, md._settings.path)  # gone: nothing to compare with
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True)
    assert not shared.take(taker, md._settings.path)  # another tmp/ at the same path
    d = await md.deliver(MSG)
    assert d.path.parent == path / "new"
    assert (path / "new" / d.name).read_bytes() == MSG
    opener.close_dirs()
    assert open_dirs_of(tmp_path) == []


async def test_a_closed_ring_fails_the_delivery_and_leaves_nothing(tmp_path: Path) -> None:
    """A ring closed under the delivery (its loop going away) fails it with the ring's
    error instead of raising into a completion callback; nothing is left behind."""
    md, path = await ring_maildir(tmp_path)
    ring_backend().ring.close()
    with pytest.raises(RuntimeError, match="ring is closed"):
        await md.deliver(MSG)
    await asyncio.sleep(0.05)  # the cleanup runs in a worker
    assert listing(path)["tmp"] == []
    assert [(path / "new" / n).read_bytes() for n in listing(path)["new"]] == [b"first"]
    assert open_dirs_of(path) == []


async def test_no_free_tmp_name_after_every_try(tmp_path: Path) -> None:
    """Every tmp name taken (EEXIST on each create): FileExistsError naming tmp/, nothing
    left behind."""
    hooks = Fail(creates, -errno.EEXIST, times=1000)
    md, path = await ring_maildir(tmp_path, hooks)
    with pytest.raises(FileExistsError, match=r"could not find a free name in .*/tmp/"):
        await md.deliver(MSG)
    await asyncio.sleep(0.05)
    assert listing(path)["tmp"] == []
    assert open_dirs_of(path) == []


async def test_a_failed_second_create_fails_the_delivery(tmp_path: Path) -> None:
    """A taken name, then a create refused (EDQUOT): the delivery fails with its errno."""
    hooks = Series(creates, [-errno.EEXIST, -errno.EDQUOT])
    md, path = await ring_maildir(tmp_path, hooks)
    with pytest.raises(OSError, match="Disk quota exceeded") as info:
        await md.deliver(MSG)
    assert info.value.errno == errno.EDQUOT
    assert hooks.left == 0
    await asyncio.sleep(0.05)
    assert listing(path)["tmp"] == []
    assert open_dirs_of(path) == []


async def test_a_transform_tail_past_max_size_fails_before_the_write(tmp_path: Path) -> None:
    """A CR held back by ``crlf_to_lf`` and written at the end passes ``max_size``: the
    delivery fails with MessageTooLargeError and nothing is left."""
    path = tmp_path / "m"
    md = Maildir(path, backend="uring", max_size=10)
    await md.deliver(b"first")
    with pytest.raises(MessageTooLargeError, match="10"):
        await md.deliver(b"1234567890\r", crlf_to_lf=True)
    await asyncio.sleep(0.05)
    assert listing(path)["tmp"] == []
    assert [(path / "new" / n).read_bytes() for n in listing(path)["new"]] == [b"first"]


async def test_a_caller_that_left_before_the_write_gets_nothing_written(tmp_path: Path) -> None:
    """Cancelled while its directories open: no write and no link is ever queued."""
    hooks = Fail(lambda op: False, 0)
    md, path = await ring_maildir(tmp_path, hooks)
    task = asyncio.create_task(md.deliver(MSG))
    await asyncio.sleep(0)  # its opens are queued, not yet completed
    task.cancel()
    with pytest.raises(asyncio.CancelledError, match=r"^$"):
        await task
    await asyncio.gather(*ring_backend().jobs)
    await asyncio.sleep(0.05)
    names = [name for name, _ in hooks.trace]
    assert "openat2" in names  # it had started
    assert not {"write", "writev", "linkat"} & set(names)
    assert only_first(path)


async def test_the_shared_table_drops_idle_maildirs_past_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past _MAX_SHARED maildirs, entries nobody holds are dropped: the table stays bounded."""
    monkeypatch.setattr(_uring_whole, "_MAX_SHARED", 2)
    for i in range(5):
        await Maildir(tmp_path / f"m{i}", backend="uring").deliver(MSG)
    assert len(ring_backend().shared) <= 2


def name_of(op: Op) -> bytes:
    """The file name an op's path ends with."""
    raw = op.keep[0]
    assert isinstance(raw, bytes)
    return os.path.basename(raw)


async def test_each_chain_unlinks_the_tmp_name_its_create_made(tmp_path: Path) -> None:
    """After a taken tmp name (EEXIST), and for deliveries that share directories or open
    their own, each chain's unlink removes the very name the create made: tmp/ ends empty."""
    hooks = Series(creates, [-errno.EEXIST])
    md, path = await ring_maildir(tmp_path, hooks)
    await in_workers(md, 3, 2)
    reaped = list(zip(hooks.ops, hooks.trace, strict=True))
    made = [name_of(op) for op, (_, r) in reaped if creates(op) and r >= 0]
    gone = [name_of(op) for op, (name, _) in reaped if name == "unlinkat"]
    assert hooks.left == 0
    assert len(made) == 6
    assert sorted(gone) == sorted(made)
    assert listing(path)["tmp"] == []
