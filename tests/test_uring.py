"""The io_uring ring driver against the real kernel: ops, chains, lifetimes, fork, reaping."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import gc
import mmap
import os
import stat
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from maildrop import _uring_abi as abi
from maildrop import _uring_ops as ops
from maildrop import _uring_setup as setup
from maildrop._uring import Ring, UringUnavailableError, availability
from maildrop._uring_deliver import UringMaildir
from maildrop._uring_hooks import Script, TraceEntry, kill_self

from .conftest import open_fds

AVAILABLE = availability()
needs_uring = pytest.mark.skipif(not AVAILABLE.ok, reason=f"io_uring: {AVAILABLE.reason}")
NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL
RESOLVE = abi.RESOLVE_BENEATH | abi.RESOLVE_NO_SYMLINKS


@pytest.fixture
def ring() -> Iterator[Ring]:
    """A small ring with eight direct-descriptor slots, closed after the test."""
    r = Ring.open(16, slots=8)
    yield r
    r.close()


@pytest.fixture
def dfd(tmp_path: Path) -> Iterator[int]:
    """An fd of the test's directory."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def _fork(child: object) -> int:
    # pytest may run threads (other tests' pools): fork is still what this test is about.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        try:
            code = child()  # type: ignore[operator]
        except BaseException:
            code = 99
        os._exit(code)
    return os.waitpid(pid, 0)[1]


# -- each op -------------------------------------------------------------------------------


@needs_uring
def test_openat_returns_a_process_fd(ring: Ring, dfd: int, tmp_path: Path) -> None:
    """openat without a slot returns a real fd that writes the file."""
    (fd,) = ring.run([ops.openat(dfd, "a", NEW)])
    assert fd > 0
    os.write(fd, b"abc")
    os.close(fd)
    assert (tmp_path / "a").read_bytes() == b"abc"
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o600


@needs_uring
def test_openat2_into_a_slot_then_write_with_sync_and_close(
    ring: Ring, dfd: int, tmp_path: Path
) -> None:
    """openat2 opens into a slot; a fixed write with RWF_SYNC and a fixed close use it."""
    slot = ring.take_slot()
    chain = [
        ops.openat2(dfd, "a", NEW, 0o640, resolve=RESOLVE, slot=slot),
        ops.write(slot, b"hello", offset=0, rw_flags=abi.RWF_SYNC, fixed=True),
        ops.close(slot, fixed=True),
    ]
    assert ring.run(chain) == [0, 5, 0]
    ring.give_slot(slot)
    assert (tmp_path / "a").read_bytes() == b"hello"
    assert "slot" in repr(chain[1])
    assert chain[1].name == "write"


@needs_uring
def test_openat2_refuses_symlinks_and_escapes(ring: Ring, dfd: int, tmp_path: Path) -> None:
    """RESOLVE_NO_SYMLINKS refuses a symlink, RESOLVE_BENEATH a path that leaves the dir."""
    (tmp_path / "target").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    results = ring.run([ops.openat2(dfd, "link", os.O_RDONLY, 0, resolve=RESOLVE)])
    results += ring.run([ops.openat2(dfd, "../x", NEW, resolve=RESOLVE)])
    assert results == [-errno.ELOOP, -errno.EXDEV]
    assert sorted(os.listdir(tmp_path)) == ["link", "target"]


@needs_uring
def test_writev_takes_bytes_bytearray_and_views(ring: Ring, dfd: int, tmp_path: Path) -> None:
    """writev writes every buffer in order and returns the total."""
    fd = os.open(tmp_path / "a", NEW, 0o600)
    parts = [b"ab", bytearray(b"cd"), memoryview(b"xef")[1:], memoryview(bytearray(b"gh"))]
    assert ring.run([ops.writev(fd, parts, offset=0, rw_flags=abi.RWF_SYNC), ops.fsync(fd)]) == [
        8,
        0,
    ]
    os.close(fd)
    assert (tmp_path / "a").read_bytes() == b"abcdefgh"


@needs_uring
def test_link_unlink_rename_statx_close(ring: Ring, dfd: int, tmp_path: Path) -> None:
    """linkat never clobbers, renameat2 honours NOREPLACE, statx and unlinkat see the file."""
    (tmp_path / "a").write_bytes(b"12345")
    (tmp_path / "taken").write_bytes(b"keep")
    look = ops.statx(dfd, "b")
    results = ring.run(
        [
            ops.linkat(dfd, "a", dfd, "b"),
            ops.linkat(dfd, "a", dfd, "taken"),
            ops.renameat2(dfd, "a", dfd, "taken", abi.RENAME_NOREPLACE),
            look,
            ops.renameat2(dfd, "a", dfd, "c", abi.RENAME_NOREPLACE),
            ops.unlinkat(dfd, "b"),
        ]
    )
    assert results == [0, -errno.EEXIST, -errno.EEXIST, 0, 0, 0]
    info = ops.statx_result(look)
    assert (info.size, info.nlink, stat.S_ISREG(info.mode)) == (5, 2, True)
    assert info.ino == (tmp_path / "c").stat().st_ino
    assert sorted(os.listdir(tmp_path)) == ["c", "taken"]
    assert (tmp_path / "taken").read_bytes() == b"keep"
    fd = os.open(tmp_path / "c", os.O_RDONLY)
    assert ring.run([ops.close(fd)]) == [0]
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


# -- chains --------------------------------------------------------------------------------


@needs_uring
def test_a_failed_write_severs_the_chain(ring: Ring, tmp_path: Path) -> None:
    """A failed write cancels the rest of its chain."""
    (tmp_path / "a").write_bytes(b"")
    fd = os.open(tmp_path / "a", os.O_RDONLY)
    assert ring.run([ops.write(fd, b"x"), ops.nop()]) == [-errno.EBADF, -errno.ECANCELED]
    os.close(fd)


@needs_uring
@pytest.mark.parametrize("hooked", [False, True])
def test_failed_link_unlink_statx_do_not_sever_the_chain(
    ring: Ring, dfd: int, hooked: bool
) -> None:
    """linkat, unlinkat, statx and sync_file_range failing leave the chain running (kernel
    6.18), hooks or not."""
    ring.hooks = Script() if hooked else None
    results = ring.run(
        [
            ops.linkat(dfd, "missing", dfd, "b"),
            ops.unlinkat(dfd, "missing"),
            ops.statx(dfd, "missing"),
            ops.sync_file_range(dfd, 0, 10, 0xFF),  # flags it refuses
            ops.nop(),
        ]
    )
    assert results == [-errno.ENOENT] * 3 + [-errno.EINVAL, 0]


def test_a_range_past_32_bits_is_synced_to_the_end_of_the_file() -> None:
    """sync_file_range's length field has 32 bits: a longer range is "to the end" (0)."""
    assert ops.sync_file_range(3, 0, 2**32 - 1, 2).length == 2**32 - 1
    assert ops.sync_file_range(3, 4096, 2**32 + 4096, 2).length == 0


@needs_uring
def test_an_injected_short_write_is_real_and_severs(ring: Ring, dfd: int, tmp_path: Path) -> None:
    """A short write injected on a write really writes fewer bytes and cancels the rest."""
    script = Script(inject={1: 2})
    ring.hooks = script
    fd = os.open(tmp_path / "a", NEW, 0o600)
    results = ring.run([ops.fsync(fd), ops.write(fd, b"abcdef", offset=0), ops.fsync(fd)])
    os.close(fd)
    assert results == [0, 2, -errno.ECANCELED]
    assert (tmp_path / "a").read_bytes() == b"ab"
    assert script.trace == [TraceEntry(0, "fsync", 0), TraceEntry(1, "write", 2)]


@needs_uring
def test_an_injected_failure_of_a_close_still_frees_the_fd(ring: Ring, tmp_path: Path) -> None:
    """A close injected to fail reports the error and still closes, as Linux's close does."""
    ring.hooks = Script(inject={0: -errno.EIO})
    fd = os.open(tmp_path / "a", NEW, 0o600)
    assert ring.run([ops.close(fd)]) == [-errno.EIO]
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


@needs_uring
def test_writev_of_one_bytes_buffer_writes_it_and_keeps_it(ring: Ring, tmp_path: Path) -> None:
    """A writev of one bytes object (a whole message) writes all of it at the offset and keeps
    the data alive until the completion."""
    data = bytes(range(256)) * 9
    fd = os.open(tmp_path / "a", NEW, 0o600)
    op = ops.writev(fd, [data], offset=0)
    assert (op.length, op.expect) == (1, len(data))
    assert data in op.keep
    assert ring.run([op]) == [len(data)]
    os.close(fd)
    assert (tmp_path / "a").read_bytes() == data


@needs_uring
@pytest.mark.parametrize("parts", [[b"abc", b"def"], [b"abcdef"]], ids=["two", "one-bytes"])
@pytest.mark.parametrize("cut", [0, 2, 3, 5])
def test_an_injected_short_writev_is_real(
    ring: Ring, tmp_path: Path, cut: int, parts: list[bytes]
) -> None:
    """A short write injected on a writev at the file position really writes fewer bytes, so
    writing the rest after it gives the whole data once (one bytes buffer: a packed iovec)."""
    ring.hooks = Script(inject={0: cut})
    fd = os.open(tmp_path / "a", NEW, 0o600)
    (written,) = ring.run([ops.writev(fd, parts)])
    ring.hooks = None
    (rest,) = ring.run([ops.write(fd, b"abcdef"[written:])])
    os.close(fd)
    assert (written, rest) == (cut, 6 - cut)
    assert (tmp_path / "a").read_bytes() == b"abcdef"


@needs_uring
@pytest.mark.parametrize(
    ("victim", "expected"),
    [
        (ops.fsync, [0, -errno.EIO, 0]),  # a failing fsync does not sever a chain
        (lambda fd: ops.writev(fd, [b"x"]), [0, -errno.EIO, -errno.ECANCELED]),
    ],
)
def test_injected_errors_sever_as_the_kernel_would(
    ring: Ring, tmp_path: Path, victim: object, expected: list[int]
) -> None:
    """An injected error replaces the op's result and ends the chain by the kernel's rule."""
    ring.hooks = Script(inject={1: -errno.EIO})
    fd = os.open(tmp_path / "a", NEW, 0o600)
    assert ring.run([ops.nop(), victim(fd), ops.nop()]) == expected  # type: ignore[operator]
    os.close(fd)


@needs_uring
def test_stop_before_and_after_see_the_earlier_ops_done(
    ring: Ring, dfd: int, tmp_path: Path
) -> None:
    """stop_before N runs once ops < N have completed; stop_after N once N's result is in."""
    seen: list[tuple[int, list[str]]] = []

    class Stop(Exception):
        pass

    def stop(op: ops.Op) -> None:
        seen.append((op.seq, sorted(os.listdir(tmp_path))))
        raise Stop

    script = Script(stop_before=1, on_stop=stop)
    ring.hooks = script
    chain = [ops.openat(dfd, "a", NEW), ops.linkat(dfd, "a", dfd, "b"), ops.unlinkat(dfd, "a")]
    with pytest.raises(Stop, match=r"^$"):
        ring.run(chain)
    script.stop_before, script.stop_after = None, 1
    with pytest.raises(Stop, match=r"^$"):
        ring.drain()
    script.stop_after = None
    ring.drain()
    assert seen == [(1, ["a"]), (1, ["a", "b"])]
    assert [e.name for e in script.trace] == ["openat", "linkat", "unlinkat"]
    assert os.listdir(tmp_path) == ["b"]
    os.close(script.trace[0].result)


@needs_uring
def test_kill_self_stops_the_process_before_the_op(tmp_path: Path) -> None:
    """The default stop kills the process with SIGKILL before op N reaches the kernel."""

    def child() -> int:
        with Ring.open(8, slots=0, hooks=Script(stop_before=1)) as r:
            fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
            r.run([ops.openat(fd, "a", NEW), ops.linkat(fd, "a", fd, "b")])
        return 0

    status = _fork(child)
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == 9
    assert os.listdir(tmp_path) == ["a"]
    assert kill_self.__doc__


# -- lifetimes, limits, errors -------------------------------------------------------------


@needs_uring
def test_paths_and_buffers_freed_after_queueing_do_not_corrupt(ring: Ring, dfd: int) -> None:
    """The driver holds every path and buffer: callers may drop theirs before submission."""
    tmp = Path(os.readlink(f"/proc/self/fd/{dfd}"))
    box: list[list[int]] = []
    opened: list[list[int]] = []
    for i in range(6):
        name = f"file-{i}-" + "n" * 40
        ring.queue([ops.openat(dfd, name, NEW)], opened.append)
    for i in range(6):
        data = bytearray(f"payload {i}".encode() * 50)
        fd = os.open(tmp / f"w{i}", NEW, 0o600)
        ring.queue([ops.write(fd, data, offset=0)], box.append)
        ring.close_fd(fd)  # deferred: the write in flight still uses it
        del data
    gc.collect()
    junk = [os.urandom(64).hex() for _ in range(2000)]  # reuse the freed memory
    ring.drain()
    assert len(junk) == 2000
    assert len(box) == 6
    assert sorted(p.name for p in tmp.iterdir()) == sorted(
        [f"file-{i}-" + "n" * 40 for i in range(6)] + [f"w{i}" for i in range(6)]
    )
    assert (tmp / "w3").read_bytes() == b"payload 3" * 50
    assert box == [[450]] * 6
    for results in opened:
        os.close(results[0])


@needs_uring
def test_a_bytearray_in_flight_cannot_be_resized(ring: Ring, tmp_path: Path) -> None:
    """A writable buffer is pinned until its op completes."""
    data = bytearray(b"abc")
    fd = os.open(tmp_path / "a", NEW, 0o600)
    ring.queue([ops.write(fd, data)], lambda _: None)
    with pytest.raises(BufferError, match="re-sized"):
        data.extend(b"more")
    ring.drain()
    data.extend(b"more")
    os.close(fd)


@needs_uring
def test_an_unused_fd_closes_at_once_and_slots_run_out(ring: Ring, tmp_path: Path) -> None:
    """close_fd closes an fd no op uses now; a ring out of slots says EMFILE."""
    fd = os.open(tmp_path, os.O_RDONLY)
    ring.close_fd(fd)
    assert fd not in open_fds()
    slots = [ring.take_slot() for _ in range(8)]
    with pytest.raises(OSError, match="slot"):
        ring.take_slot()
    ring.give_slot(slots[0])
    assert ring.take_slot() == slots[0]


@needs_uring
def test_bad_chains_and_paths_are_refused(ring: Ring) -> None:
    """An empty chain, one larger than the ring and a path with NUL are refused."""
    with pytest.raises(ValueError, match="1 to 16 ops, not 0"):
        ring.queue([], lambda _: None)
    with pytest.raises(ValueError, match="not 17"):
        ring.queue([ops.nop()] * 17, lambda _: None)
    with pytest.raises(ValueError, match="null byte"):
        ops.unlinkat(0, "a\0b")
    with pytest.raises(RuntimeError, match="attach"):
        ring.submit([ops.nop()])


@needs_uring
def test_a_closed_ring_refuses_work_and_close_finishes_the_queue(dfd: int) -> None:
    """close() runs the queued ops and waits for those in flight; a closed ring refuses more."""
    r = Ring.open(4, slots=0)
    box: list[list[int]] = []
    r.queue([ops.nop()], box.append)
    r._fill()
    r._enter(0)
    r.queue([ops.nop()] * 2, box.append)
    r.close()
    r.close()
    assert box == [[0], [0, 0]]
    with pytest.raises(RuntimeError, match="is closed"):
        r.queue([ops.nop()], box.append)


@needs_uring
def test_an_overflowing_completion_queue_is_flushed() -> None:
    """Completions parked in the kernel's overflow list are reaped too."""
    with Ring.open(4, slots=0) as r:
        r.max_inflight = 64
        box: list[list[int]] = []
        for _ in range(4):
            for _ in range(4):
                r.queue([ops.nop()], box.append)
            r._fill()
            r._enter(0)
        assert r._sq_flags.value & abi.SQ_CQ_OVERFLOW
        assert r.reap() == 16
        assert box == [[0]] * 16


# -- fork and the event loop ---------------------------------------------------------------


@needs_uring
def test_a_forked_child_forgets_the_parents_ring(ring: Ring) -> None:
    """A child cannot use (or reap) the parent's ring but may open its own; the parent's works."""

    def child() -> int:
        try:
            ring.queue([ops.nop()], lambda _: None)
        except RuntimeError as exc:
            if "fork" not in str(exc):
                return 2
            with Ring.open(4, slots=0) as own:
                return 0 if own.run([ops.nop()]) == [0] else 3
        return 1

    assert _fork(child) == 0
    assert ring.run([ops.nop()]) == [0]


@needs_uring
@pytest.mark.asyncio
async def test_chains_queued_in_one_turn_share_one_enter(
    ring: Ring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chains queued in the same loop turn go in one io_uring_enter; the eventfd reaps them."""
    calls: list[int] = []
    real = abi.enter

    def counting(fd: int, to_submit: int, wait: int, flags: int) -> int:
        calls.append(to_submit)
        return real(fd, to_submit, wait, flags)

    monkeypatch.setattr(abi, "enter", counting)
    ring.attach(asyncio.get_running_loop())
    futures = [ring.submit([ops.nop(), ops.nop()]) for _ in range(3)]
    assert await asyncio.gather(*futures) == [[0, 0]] * 3
    assert calls == [6]
    assert ring.enters == 1
    ring._on_eventfd()  # nothing left to announce: a wake-up with nothing to read is harmless
    assert ring.reap() == 0


@needs_uring
@pytest.mark.asyncio
async def test_a_cancelled_waiter_leaves_its_chain_to_finish(ring: Ring, dfd: int) -> None:
    """Cancelling a chain's future releases the waiter; the orphan callback gets the results."""
    ring.attach(asyncio.get_running_loop())
    orphans: list[list[int]] = []
    arrived = asyncio.Event()

    def orphaned(results: list[int]) -> None:
        orphans.append(results)
        arrived.set()

    future = ring.submit([ops.openat(dfd, "a", NEW)], orphaned=orphaned)
    future.cancel()
    async with asyncio.timeout(5):
        await arrived.wait()
    assert len(orphans) == 1
    assert orphans[0][0] > 0
    os.close(orphans[0][0])


# -- availability --------------------------------------------------------------------------


def test_availability_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another OS or architecture is refused with a reason; this machine's answer is cached."""
    monkeypatch.setattr(sys, "platform", "darwin")
    assert (
        setup.probe(lambda: Ring.open(2, slots=0)).reason == "io_uring needs Linux, this is darwin"
    )
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert "no barriers for aarch64" in str(setup.probe(lambda: Ring.open(2, slots=0)).reason)
    assert availability() is AVAILABLE


@pytest.mark.parametrize(
    ("code", "sysctl", "words"),
    [
        (errno.ENOSYS, None, "seccomp filter (Docker's default) hides it"),
        (errno.EPERM, "2\n", "forbidden by kernel.io_uring_disabled=2 or by a seccomp filter"),
        (errno.ENOMEM, None, "Cannot allocate memory (kernel.io_uring_disabled=absent)"),
    ],
)
def test_a_refused_setup_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, code: int, sysctl: str | None, words: str
) -> None:
    """io_uring_setup's refusals (seccomp, the sysctl, no memory) become clear reasons."""

    def refuse(*args: object) -> int:
        ctypes.set_errno(code)
        return -1

    monkeypatch.setattr(abi, "_syscall", refuse)
    if sysctl is not None:
        (tmp_path / "io_uring_disabled").write_text(sysctl)
    monkeypatch.setattr(setup, "SYSCTL", str(tmp_path / "io_uring_disabled"))
    with pytest.raises(UringUnavailableError, match="io_uring_setup failed") as info:
        Ring.open()
    assert words in str(info.value)
    assert info.value.errno == code
    assert setup.probe(lambda: Ring.open(2, slots=0)).reason == str(info.value)


def test_an_interrupted_system_call_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """EINTR from a ring system call is retried."""
    answers = iter([-1, 7])

    def flaky(*args: object) -> int:
        ctypes.set_errno(errno.EINTR)
        return next(answers)

    monkeypatch.setattr(abi, "_syscall", flaky)
    assert abi.call(abi.SYS_ENTER) == 7


@needs_uring
@pytest.mark.parametrize(
    ("probe", "words"),
    [
        (OSError(errno.EINVAL, "Invalid argument"), "too old"),
        (frozenset({abi.OP_WRITE}), "lacks writev, fsync, openat, close, statx, renameat2"),
    ],
)
def test_a_kernel_without_the_ops_is_refused_and_leaks_nothing(
    monkeypatch: pytest.MonkeyPatch, probe: object, words: str
) -> None:
    """A kernel that lacks the probe or an op the driver needs is refused; no fd is left."""

    def fake(fd: int) -> frozenset[int]:
        if isinstance(probe, OSError):
            raise probe
        return probe  # type: ignore[return-value]

    monkeypatch.setattr(abi, "probe", fake)
    before = open_fds()
    with pytest.raises(UringUnavailableError, match=words):
        Ring.open(4)
    assert open_fds() == before


@needs_uring
def test_a_failed_set_up_closes_the_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    """Failing to map the ring or to make its eventfd leaves no fd behind."""
    before = open_fds()

    def fail(*args: object) -> object:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(os, "eventfd", fail)
    with pytest.raises(OSError, match="Cannot allocate memory"):
        Ring.open(4)
    monkeypatch.setattr(setup, "_map", fail)
    with pytest.raises(OSError, match="Cannot allocate memory"):
        Ring.open(4)
    assert open_fds() == before


@needs_uring
@pytest.mark.asyncio
async def test_odd_corners_of_the_loop_path(ring: Ring) -> None:
    """A positive injected result replaces any op's; flushes with nothing to do are harmless."""
    ring.hooks = Script(inject={0: 7})
    assert ring.run([ops.nop()]) == [7]
    ring.attach(asyncio.get_running_loop())
    ring._flush()  # nothing queued: no system call
    abandoned = ring.submit([ops.nop()])
    abandoned.cancel()  # no orphan callback: the result is dropped
    ring.drain()
    assert abandoned.cancelled()
    ring.close()
    ring._flush()  # a flush scheduled before close() finds the ring closed


@needs_uring
def test_quiet_ops_report_only_failures(ring: Ring, dfd: int, tmp_path: Path) -> None:
    """Quiet ops' successes are inferred; a quiet failure ends the chain without more reports."""
    slot = ring.take_slot()
    before = ring.completions
    chain = [
        ops.openat(dfd, "a", NEW, slot=slot),
        ops.write(slot, b"abc", fixed=True),
        ops.close(slot, fixed=True),
    ]
    assert ring.run(chain) == [0, 3, 0]
    assert ring.completions - before == 1  # only the last op reported
    before = ring.completions
    assert ring.run([*chain[:1], ops.write(slot, b"x", fixed=True), ops.nop()]) == [
        -errno.EEXIST,
        -errno.ECANCELED,
        -errno.ECANCELED,
    ]
    assert ring.completions - before == 1  # the quiet open's failure, nothing after it
    before = ring.completions
    loud = ops.linkat(dfd, "a", dfd, "b")
    loud.file_index = 1  # refused when prepared (EINVAL), which severs even a linkat
    assert ring.run([loud, ops.close(slot, fixed=True), ops.nop()]) == [
        -errno.EINVAL,
        -errno.ECANCELED,
        -errno.ECANCELED,
    ]
    assert ring.completions - before == 3  # a loud op's failure: every op reports
    assert (tmp_path / "a").read_bytes() == b"abc"


@needs_uring
def test_the_io_wq_worker_limit_can_be_raised() -> None:
    """workers= sets the ring's bounded io-wq worker limit."""
    with Ring.open(4, slots=0, workers=48) as r:
        assert setup.max_workers(r._fd, 0)[0] == 48  # 0 changes nothing: it reads the limits


def test_a_c_library_without_syscall_makes_io_uring_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where libc has no syscall() (or ctypes cannot load it), io_uring is reported missing."""

    def no_libc(*args: object, **kwargs: object) -> object:
        raise OSError("no C library here")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert abi._load_syscall() is None
    monkeypatch.setattr(abi, "_syscall", None)
    with pytest.raises(UringUnavailableError, match="has no io_uring or a seccomp filter"):
        Ring.open(4)


@needs_uring
@pytest.mark.parametrize(("stop_after", "tmp", "new"), [(1, 1, 0), (2, 1, 1), (3, 0, 1)])
def test_sigkill_after_a_delivery_op_leaves_only_what_the_protocol_allows(
    tmp_path: Path, stop_after: int, tmp: int, new: int
) -> None:
    """Killed after the write, the link or the unlink: the message is whole wherever it is."""
    for sub in ("tmp", "new", "cur"):
        (tmp_path / sub).mkdir()
    message = b"Subject: kill\n\n" + b"x" * 3000

    async def deliver() -> None:
        ring = Ring.open(8, slots=2, hooks=Script(stop_after=stop_after))
        ring.attach(asyncio.get_running_loop())
        await UringMaildir.open(ring, tmp_path).deliver(message)

    status = _fork(lambda: asyncio.run(deliver()))
    assert os.WIFSIGNALED(status)
    found = {sub: os.listdir(tmp_path / sub) for sub in ("tmp", "new")}
    assert (len(found["tmp"]), len(found["new"])) == (tmp, new)
    for sub, names in found.items():
        for name in names:
            assert (tmp_path / sub / name).read_bytes() == message


def test_a_write_op_refuses_more_than_linux_moves_at_once() -> None:
    """One write op takes at most MAX_RW_COUNT bytes (its length field has 32 bits): more is
    an error where the op is made, never an entry that cannot be packed."""
    big = mmap.mmap(-1, 5 << 30)  # address space only: no page is touched
    with big, pytest.raises(ValueError, match="one write op takes at most"):
        ops.write(3, big)
    assert ops.write(3, b"abc").length == 3


@needs_uring
def test_a_raising_callback_strands_no_other_completion(
    ring: Ring, caplog: pytest.LogCaptureFixture
) -> None:
    """A completion callback that raises is logged; the chains reaped with it still end."""
    seen: list[str] = []

    def boom(results: list[int]) -> None:
        seen.append("boom")
        raise RuntimeError("a callback's bug")

    ring.queue([ops.nop()], boom)
    ring.queue([ops.nop()], lambda results: seen.append("second"))
    ring.drain()
    assert seen == ["boom", "second"]
    assert "an io_uring completion callback failed" in caplog.text


@needs_uring
def test_close_unmaps_even_when_a_callback_raises_while_draining() -> None:
    """close() drains, and releases the ring's fds whatever the drained callbacks do."""
    before = set(os.listdir("/proc/self/fd"))
    ring = Ring.open(entries=8, slots=0)

    def boom(results: list[int]) -> None:
        raise KeyboardInterrupt("stop")  # not an Exception: the driver lets it through

    ring.queue([ops.nop()], boom)
    with pytest.raises(KeyboardInterrupt, match="stop"):
        ring.close()
    assert set(os.listdir("/proc/self/fd")) <= before


@needs_uring
@pytest.mark.asyncio
async def test_a_raising_callback_goes_to_the_loops_exception_handler(ring: Ring) -> None:
    """On a ring attached to a loop, a callback that raises reaches the loop's exception
    handler; the chain after it still ends."""
    loop = asyncio.get_running_loop()
    seen: list[object] = []
    loop.set_exception_handler(lambda _, context: seen.append(context["exception"]))
    ring.attach(loop)
    bug = RuntimeError("a callback's bug")

    def boom(results: list[int]) -> None:
        raise bug

    try:
        ring.queue([ops.nop()], boom)
        assert await ring.submit([ops.nop()]) == [0]
    finally:
        loop.set_exception_handler(None)
    assert seen == [bug]
