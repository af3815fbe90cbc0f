"""The io_uring backend (``maildrop._uring_backend``) and which backend a maildir runs on."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest

from maildrop import DEFAULT_SYSCALLS, Maildir, Quota, UringUnavailableError, _backend
from maildrop import _uring_backend as ub
from maildrop._uring import availability
from maildrop._uring_setup import Availability

from .conftest import listing, settle
from .crash._harness import loop_fs

needs_uring = pytest.mark.skipif(
    not availability().ok, reason=f"io_uring unavailable: {availability().reason}"
)
OTHER_TABLE = DEFAULT_SYSCALLS.replace(fsync=DEFAULT_SYSCALLS.fsync)


@pytest.mark.parametrize("backend", ["auto", "uring", "threads"])
def test_a_maildir_keeps_the_backend_it_asked_for(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without MAILDROP_BACKEND each choice is kept as given."""
    monkeypatch.delenv(_backend.ENV, raising=False)
    assert Maildir(tmp_path, backend=backend)._settings.backend == backend


@pytest.mark.parametrize("env", ["uring", "threads", "auto", ""])
def test_the_environment_replaces_auto_only(
    tmp_path: Path, env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAILDROP_BACKEND replaces "auto" and never a program's own choice."""
    monkeypatch.setenv(_backend.ENV, env)
    assert Maildir(tmp_path)._settings.backend == (env or "auto")
    assert Maildir(tmp_path, backend="threads")._settings.backend == "threads"
    assert Maildir(tmp_path, backend="uring")._settings.backend == "uring"


def test_a_bad_choice_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown backend, in the argument or the variable, is a ValueError naming it."""
    with pytest.raises(ValueError, match="backend must be one of auto, uring, threads"):
        Maildir(tmp_path, backend="epoll")
    monkeypatch.setenv(_backend.ENV, "io_uring")
    with pytest.raises(ValueError, match=r"MAILDROP_BACKEND must be one of .*'io_uring'"):
        Maildir(tmp_path)


def test_a_custom_syscall_table_runs_in_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A custom table makes "auto" (even with the variable) threads and "uring" an error."""
    monkeypatch.setenv(_backend.ENV, "uring")
    assert Maildir(tmp_path, syscalls=OTHER_TABLE)._settings.backend == "threads"
    with pytest.raises(UringUnavailableError, match="cannot run a custom Syscalls table"):
        Maildir(tmp_path, syscalls=OTHER_TABLE, backend="uring")


@pytest.mark.anyio
async def test_uring_on_trio_is_refused(tmp_path: Path, anyio_backend: str) -> None:
    """On trio "uring" fails saying so and "auto" delivers in threads."""
    if anyio_backend != "trio":
        pytest.skip("about trio loops")
    with pytest.raises(UringUnavailableError, match="asyncio event loops only, not on trio"):
        await Maildir(tmp_path / "m", backend="uring").deliver(b"x")
    assert listing(tmp_path / "m") == {"tmp": [], "new": [], "cur": []}
    await Maildir(tmp_path / "m").deliver(b"x")
    assert len(listing(tmp_path / "m")["new"]) == 1


@pytest.mark.anyio
async def test_auto_on_trio_is_threads_even_once_it_may_be_the_ring(
    tmp_path: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With AUTO_USES_URING, "auto" on trio still delivers in threads."""
    if anyio_backend != "trio":
        pytest.skip("about trio loops")
    monkeypatch.setattr(_backend, "AUTO_USES_URING", True)
    assert isinstance(_backend.backend_for("auto"), _backend.AnyioBackend)
    await Maildir(tmp_path / "m").deliver(b"x")
    assert len(listing(tmp_path / "m")["new"]) == 1


@pytest.mark.asyncio
async def test_auto_runs_a_lone_delivery_in_threads_without_a_ring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing in flight on the loop, "auto" is the thread backend and makes no ring."""
    monkeypatch.delenv(_backend.ENV, raising=False)
    loop = asyncio.get_running_loop()
    assert _backend.AUTO_USES_URING
    assert isinstance(_backend.backend_for("auto"), _backend.PoolBackend)
    assert not isinstance(_backend.backend_for("auto"), ub.UringBackend)
    md = Maildir(tmp_path / "m")
    for _ in range(3):
        await md.deliver(b"alone")
    assert ub._backends.made(loop) is None
    assert len(listing(tmp_path / "m")["new"]) == 3


async def _while_a_worker_is_busy(check: Any) -> Any:
    """Return ``await check()`` while a job holds one of the loop's pool workers."""
    pool = _backend.current()
    assert isinstance(pool, _backend.PoolBackend)
    release = threading.Event()
    held = pool.submit(release.wait, 10)
    try:
        return await check()
    finally:
        release.set()
        await held


async def _auto_maildir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Maildir:
    """A maildir with the default backend (no MAILDROP_BACKEND), made by a first delivery
    (alone: in threads)."""
    monkeypatch.delenv(_backend.ENV, raising=False)
    md = Maildir(tmp_path / "m")
    await md.deliver(b"first")
    return md


@needs_uring
@pytest.mark.asyncio
async def test_auto_takes_the_ring_while_other_work_is_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery that starts while the pool or the ring is busy runs on the ring."""
    md = await _auto_maildir(tmp_path, monkeypatch)

    async def deliver() -> ub.UringBackend:
        backend = _backend.backend_for("auto")
        assert isinstance(backend, ub.UringBackend)
        before = backend.ring.completions
        await md.deliver(b"second")
        assert backend.ring.completions > before
        return backend

    backend = await _while_a_worker_is_busy(deliver)
    assert backend.pool is _backend.current().pool  # one set of workers for both backends
    loop = asyncio.get_running_loop()
    assert ub.alone(loop)
    on_ring = asyncio.ensure_future(Maildir(tmp_path / "m", backend="uring").deliver(b"ring"))
    await asyncio.sleep(0)  # started: its chain is in flight, the pool idle
    assert backend.active == 1
    threads = _backend.current()
    assert isinstance(threads, _backend.PoolBackend)
    assert not threads.pool.pending
    assert not ub.alone(loop)
    assert isinstance(_backend.backend_for("auto"), ub.UringBackend)
    await on_ring
    assert backend.active == 0
    assert ub.alone(loop)
    assert not isinstance(_backend.backend_for("auto"), ub.UringBackend)
    assert len(listing(tmp_path / "m")["new"]) == 3


@pytest.mark.asyncio
async def test_auto_loads_the_ring_in_a_thread_once_deliveries_overlap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Alone, "auto" loads nothing; with work in flight it has the ring's modules loaded in
    a thread (not on the loop) and takes threads until they are there."""
    monkeypatch.setattr(_backend, "_choose", None)
    monkeypatch.setattr(_backend, "_loading", False)
    assert isinstance(_backend.backend_for("auto"), _backend.PoolBackend)
    assert not _backend._loading
    loaded = threading.Event()
    monkeypatch.setattr(ub, "choose", _recorded(ub.choose, loaded))

    async def check() -> object:
        return _backend.backend_for("auto")

    picked = await _while_a_worker_is_busy(check)
    assert not isinstance(picked, ub.UringBackend)
    assert _backend._loading
    await settle(lambda: _backend._choose is not None, "the ring's modules loaded")
    if availability().ok:
        assert isinstance(await _while_a_worker_is_busy(check), ub.UringBackend)
        assert loaded.is_set()


def _recorded(fn: Any, called: threading.Event) -> Any:
    def wrapper(choice: str) -> Any:
        called.set()
        return fn(choice)

    return wrapper


@needs_uring
@pytest.mark.asyncio
async def test_auto_under_concurrency_delivers_every_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent deliveries split between the backends all arrive, once each."""
    md = await _auto_maildir(tmp_path, monkeypatch)
    bodies = [b"message %d" % i for i in range(40)]
    await asyncio.gather(*(md.deliver(body) for body in bodies))
    made = ub._backends.made(asyncio.get_running_loop())
    assert isinstance(made, ub.UringBackend)
    assert made.ring.completions > 0
    got = sorted(
        (tmp_path / "m" / "new" / name).read_bytes() for name in listing(tmp_path / "m")["new"]
    )
    assert got == sorted([b"first", *bodies])
    assert listing(tmp_path / "m")["tmp"] == []


@needs_uring
@pytest.mark.asyncio
async def test_auto_may_pick_the_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    """With AUTO_USES_URING, "auto" is the ring where io_uring works and work is in flight."""
    monkeypatch.setattr(_backend, "AUTO_USES_URING", True)

    async def check() -> object:
        return _backend.backend_for("auto")

    assert isinstance(await _while_a_worker_is_busy(check), ub.UringBackend)


@pytest.mark.asyncio
async def test_auto_is_threads_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without AUTO_USES_URING, "auto" is the thread backend even under load."""
    monkeypatch.setattr(_backend, "AUTO_USES_URING", False)

    async def check() -> object:
        return _backend.backend_for("auto")

    picked = await _while_a_worker_is_busy(check)
    assert isinstance(picked, _backend.PoolBackend)
    assert not isinstance(picked, ub.UringBackend)


@pytest.mark.asyncio
async def test_where_io_uring_is_refused_auto_uses_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel or seccomp refusal: "auto" delivers in threads, "uring" says why."""
    monkeypatch.setattr(_backend, "AUTO_USES_URING", True)
    why = "io_uring_setup failed: forbidden by kernel.io_uring_disabled=2 or by a seccomp filter"
    monkeypatch.setattr(ub, "availability", lambda: Availability(why))
    assert isinstance(_backend.backend_for("auto"), _backend.PoolBackend)
    assert not isinstance(_backend.backend_for("auto"), ub.UringBackend)
    with pytest.raises(UringUnavailableError, match="io_uring_disabled=2 or by a seccomp"):
        await Maildir(tmp_path / "m", backend="uring").deliver(b"x")
    await Maildir(tmp_path / "m").deliver(b"x")
    assert len(listing(tmp_path / "m")["new"]) == 1


@pytest.mark.asyncio
async def test_a_ring_that_cannot_open_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ring refused by a resource limit (EMFILE) is reported like an unavailable kernel."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(ub.Ring, "open", refuse)
    monkeypatch.setattr(_backend, "AUTO_USES_URING", True)
    assert not isinstance(_backend.backend_for("auto"), ub.UringBackend)
    with pytest.raises(UringUnavailableError, match="Too many open files"):
        _backend.backend_for("uring")


@needs_uring
@pytest.mark.asyncio
async def test_a_message_is_delivered_on_the_ring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """backend="uring": a plain message goes through the ring, with no thread."""
    md = Maildir(tmp_path / "m", backend="uring")
    await md.deliver(b"first")  # creates the maildir (a thread step)
    backend = _backend.backend_for("uring")
    assert isinstance(backend, ub.UringBackend)
    before = backend.ring.completions

    def no_thread(*args: object) -> None:
        raise AssertionError("a thread was used")

    monkeypatch.setattr(backend.pool, "submit", no_thread)
    d = await md.deliver(b"Subject: x\n\nbody\n")
    assert d.path.read_bytes() == b"Subject: x\n\nbody\n"
    assert d.size == 17
    assert backend.ring.completions - before >= 6
    assert listing(tmp_path / "m")["tmp"] == []


@needs_uring
@pytest.mark.asyncio
async def test_a_cancelled_caller_is_released_and_the_chain_cleans_up(tmp_path: Path) -> None:
    """Cancelling ring deliveries half way leaves only whole messages and no tmp file."""
    md = Maildir(tmp_path / "m", backend="uring")
    await md.deliver(b"warm")
    tasks = [asyncio.create_task(md.deliver(b"z" * 3000)) for _ in range(100)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    for t in tasks[::2]:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    backend = _backend.backend_for("uring")
    assert isinstance(backend, ub.UringBackend)
    await asyncio.gather(*backend.jobs, return_exceptions=True)  # the chains' cleanups
    files = listing(tmp_path / "m")
    assert files["tmp"] == []
    assert all(
        (tmp_path / "m/new" / n).read_bytes() in (b"warm", b"z" * 3000) for n in files["new"]
    )


@needs_uring
@pytest.mark.asyncio
async def test_a_job_cancelled_under_its_caller_cancels_the_caller(tmp_path: Path) -> None:
    """A ring job cancelled by another (a loop shutting down) cancels its waiter and is gone."""
    md = Maildir(tmp_path / "m", backend="uring")
    await md.deliver(b"warm")
    backend = _backend.backend_for("uring")
    assert isinstance(backend, ub.UringBackend)
    waiter = backend._released(asyncio.Event().wait())
    await asyncio.sleep(0)
    (job,) = backend.jobs
    job.cancel()
    with pytest.raises(asyncio.CancelledError, match=r"^$"):
        await waiter
    assert not backend.jobs


def fsfreeze(flag: str, mnt: Path) -> None:
    """Freeze (``-f``) or thaw (``-u``) the filesystem mounted at *mnt*."""
    subprocess.run(["fsfreeze", flag, str(mnt)], check=True)


@needs_uring
@pytest.mark.asyncio
async def test_a_caller_is_released_while_its_chain_is_stuck(tmp_path: Path) -> None:
    """A chain blocked in the kernel (fsfreeze): the cancelled caller is released within
    50 ms; after the thaw the chain runs to its end and, as on threads, nothing of the
    cancelled message is left (the link the chain made is removed by the cleanup)."""
    if os.geteuid() != 0 or shutil.which("fsfreeze") is None:
        pytest.skip("needs root and fsfreeze (util-linux) to freeze a loop-mounted filesystem")
    with loop_fs(tmp_path, "ext4") as (_, mnt, _):
        md = Maildir(mnt / "m", backend="uring")
        await md.deliver(b"first")
        fsfreeze("-f", mnt)
        try:
            task = asyncio.create_task(md.deliver(b"stuck"))
            await asyncio.sleep(0.2)
            assert not task.done()
            started = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError, match=r"^$"):
                await task
            assert time.monotonic() - started < 0.05
        finally:
            fsfreeze("-u", mnt)
        backend = _backend.backend_for("uring")
        assert isinstance(backend, ub.UringBackend)
        await asyncio.wait_for(asyncio.gather(*backend.jobs, return_exceptions=True), 10)
        files = listing(mnt / "m")
        assert files["tmp"] == []
        # The chain in the kernel ran to its end, link included; the cleanup removed it.
        assert [(mnt / "m/new" / n).read_bytes() for n in files["new"]] == [b"first"]


@needs_uring
@pytest.mark.asyncio
async def test_a_quota_without_its_maildirsize_rides_the_ring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quota() (limits from maildirsize) where there is no maildirsize: no thread, no file."""
    md = Maildir(tmp_path / "m", backend="uring", quota=Quota())
    await md.deliver(b"first")  # creates the maildir (a thread step)
    backend = _backend.backend_for("uring")
    assert isinstance(backend, ub.UringBackend)

    def no_thread(*args: object) -> None:
        raise AssertionError("a thread was used")

    monkeypatch.setattr(backend.pool, "submit", no_thread)
    d = await md.deliver(b"Subject: x\n\nbody\n")
    assert d.path.read_bytes() == b"Subject: x\n\nbody\n"
    assert not (tmp_path / "m" / "maildirsize").exists()


@needs_uring
@pytest.mark.asyncio
async def test_a_maildirsize_keeps_the_delivery_on_threads(tmp_path: Path) -> None:
    """With a maildirsize the quota ledger runs in a thread: checked and appended to."""
    md = Maildir(tmp_path / "m", backend="uring", quota=Quota())
    await md.deliver(b"first")
    (tmp_path / "m" / "maildirsize").write_bytes(b"1000S\n0 0\n")
    backend = _backend.backend_for("uring")
    assert isinstance(backend, ub.UringBackend)
    threads = []
    real = backend.pool.submit

    def counted(*args: Any, **kwargs: Any) -> Any:
        threads.append(args[0])
        return real(*args, **kwargs)

    backend.pool.submit = counted  # type: ignore[method-assign]
    try:
        await md.deliver(b"x" * 100)
    finally:
        del backend.pool.submit
    assert threads
    assert (tmp_path / "m" / "maildirsize").read_bytes() == b"1000S\n0 0\n100 1\n"


@pytest.mark.skipif(not availability().ok, reason=f"io_uring: {availability().reason}")
def test_a_loop_that_used_the_ring_is_collected_with_its_ring(tmp_path: Path) -> None:
    """The backend holds its loop weakly: a closed loop goes, and its ring's fds with it."""

    def ring_fds() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[io_uring]"
            except OSError:
                continue
        return n

    gc.collect()
    before, loops = ring_fds(), []
    for _ in range(3):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(Maildir(tmp_path / "m", backend="uring").deliver(b"x"))
        loop.close()
        loops.append(weakref.ref(loop))
        del loop
    gc.collect()
    assert [ref() for ref in loops] == [None, None, None]
    assert ring_fds() == before


def test_a_failed_background_load_is_tried_again_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """An import that fails in the loading thread leaves "auto" on threads, ready to retry."""
    monkeypatch.setattr(_backend, "_choose", None)
    monkeypatch.setattr(_backend, "_loading", True)
    monkeypatch.setitem(sys.modules, "maildrop._uring_backend", None)  # import -> ImportError
    _backend._load()
    assert _backend._choose is None
    assert not _backend._loading


class _NoReaderLoop(asyncio.SelectorEventLoop):
    """An asyncio loop that cannot watch file descriptors (as some embedders' loops)."""

    def add_reader(self, *args: Any) -> None:
        raise NotImplementedError


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs_uring
def test_a_loop_without_add_reader_keeps_auto_on_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No add_reader: "auto" delivers every overlapping message in threads, leaking no fd, and
    "uring" says why it cannot run."""
    monkeypatch.delenv(_backend.ENV, raising=False)

    async def main() -> list[object]:
        md = Maildir(tmp_path / "m")
        await md.deliver(b"first")
        before = _fds()
        got = await asyncio.gather(*(md.deliver(b"m%d" % i) for i in range(10)))
        assert _fds() == before
        with pytest.raises(UringUnavailableError, match=r"cannot watch file descriptors"):
            await Maildir(tmp_path / "m", backend="uring").deliver(b"x")
        return list(got)

    loop = _NoReaderLoop()
    try:
        assert len(loop.run_until_complete(main())) == 10
    finally:
        loop.close()
    assert len(listing(tmp_path / "m")["new"]) == 11
