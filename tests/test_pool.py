"""Worker threads and the backend over them: hops that return results, cancelled callers
released, jobs nobody awaits, the source lane."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import anyio
import pytest

from maildrop import Maildir, _pool, _writer
from maildrop._backend import PoolBackend, current, run_sync
from maildrop._loops import running_loop
from maildrop._pool import THREADS

from .conftest import settle, wait_for

pytestmark = pytest.mark.anyio

MSG = b"From: a@example.org\nTo: b@example.org\nSubject: pool\n\nhello\n"


async def test_run_sync_runs_in_a_worker_and_returns_or_raises() -> None:
    """run_sync returns fn's result from another thread and raises fn's exception as is."""
    here = threading.get_ident()
    assert await run_sync(lambda x: (x * 2, threading.get_ident()), 21) != (42, here)
    assert (await run_sync(lambda x: x * 2, 21)) == 42
    boom = ValueError("boom from the worker")

    def fail() -> None:
        raise boom

    with pytest.raises(ValueError, match="boom from the worker") as info:
        await run_sync(fail)
    assert info.value is boom


async def test_cancelled_run_sync_releases_the_caller_and_the_call_finishes() -> None:
    """A cancelled caller leaves while fn is blocked; fn still runs to its end."""
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()

    def blocked() -> None:
        entered.set()
        release.wait(5)
        finished.set()

    try:
        with anyio.move_on_after(5) as outer:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_sync, blocked)
                await wait_for(entered)
                tg.cancel_scope.cancel()
        assert not outer.cancelled_caught  # released at once, not by the 5 s bound
        assert not finished.is_set()
    finally:
        release.set()
    await settle(finished.is_set, "the abandoned call")


async def test_run_each_runs_the_items_concurrently() -> None:
    """run_each runs every item, and at the same time: three items meet at a barrier."""
    assert THREADS >= 3
    barrier = threading.Barrier(3, timeout=5)
    seen: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        barrier.wait()  # breaks (BrokenBarrierError) unless all three run at once
        with lock:
            seen.append(i)

    await current().run_each(one, [1, 2, 3])
    assert sorted(seen) == [1, 2, 3]


async def test_run_each_raises_an_item_s_exception(anyio_backend: str) -> None:
    """An exception of one item propagates from run_each (on trio inside an ExceptionGroup)."""

    def one(i: int) -> None:
        if i == 2:
            raise OSError(5, "item two failed")

    with pytest.raises((OSError, ExceptionGroup)) as info:
        await current().run_each(one, [1, 2, 3])
    if anyio_backend == "trio":  # the items run in a task group there
        assert info.group_contains(OSError, match="item two failed")
    else:
        info.match("item two failed")


async def test_submit_queues_on_asyncio_and_declines_elsewhere(anyio_backend: str) -> None:
    """submit returns a future of fn's result on asyncio; off asyncio it queues nothing."""
    ran = threading.Event()
    fut = current().submit(ran.set)
    if anyio_backend == "asyncio":
        assert running_loop() is not None
        assert fut is not None
        assert await fut is None
        assert ran.is_set()
    else:
        assert running_loop() is None
        assert fut is None
        await anyio.sleep(0.05)
        assert not ran.is_set()


@pytest.mark.parametrize("fails", [False, True])
async def test_spawn_reports_to_done_on_the_loop_thread(fails: bool) -> None:
    """spawn runs fn with nobody waiting; done gets None or fn's exception, on the loop."""
    loop_thread = threading.get_ident()
    reported: list[tuple[BaseException | None, int]] = []
    boom = RuntimeError("spawned job failed")

    def job() -> None:
        if fails:
            raise boom

    current().spawn(job, done=lambda err: reported.append((err, threading.get_ident())))
    with anyio.fail_after(5):
        while not reported:  # noqa: ASYNC110 - done runs as a loop callback
            await anyio.sleep(0.005)
    assert reported == [(boom if fails else None, loop_thread)]


async def test_read_source_reads_in_a_thread_of_its_own_lane() -> None:
    """read_source calls read(n) in another thread and returns what it read."""
    calls: list[tuple[int, int]] = []

    def read(n: int) -> bytes:
        calls.append((n, threading.get_ident()))
        return b"x" * n

    assert await current().read_source(read, 7) == b"xxxxxxx"
    assert calls[0][0] == 7
    assert calls[0][1] != threading.get_ident()


# -- regressions --------------------------------------------------------------------------


def test_worker_threads_do_not_outlive_their_event_loop(tmp_path: Path) -> None:
    """Many short asyncio.run() calls do not pile up idle worker threads of closed loops."""
    md = Maildir(tmp_path / "m", fsync=False)
    asyncio.run(md.deliver(b"warm"))
    base = threading.active_count()
    for _ in range(20):
        asyncio.run(md.deliver(MSG))
    deadline = time.monotonic() + 2.0
    while threading.active_count() > base + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= base + 2


def test_short_jobs_keep_to_the_core_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many quick jobs at once start at most CORE_THREADS workers: more would only fight
    the event loop for the GIL (a busy test machine must not look like blocked workers)."""
    monkeypatch.setattr(_pool, "STUCK_AFTER", 1.0)
    monkeypatch.setattr(_pool, "CORE_THREADS", 2)

    async def main() -> int:
        await asyncio.gather(*(run_sync(time.sleep, 0) for _ in range(200)))
        return _pool_of_this_loop().threads

    assert asyncio.run(main()) <= _pool.CORE_THREADS


def test_blocked_workers_get_help_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """While every worker is blocked (a slow disk), jobs still waiting start more workers,
    one per STUCK_AFTER, never more than THREADS."""
    monkeypatch.setattr(_pool, "CORE_THREADS", 2)
    monkeypatch.setattr(_pool, "THREADS", _pool.CORE_THREADS + 2)
    release = threading.Event()
    n = _pool.THREADS + 3

    async def main() -> tuple[int, int]:
        jobs = [asyncio.ensure_future(run_sync(release.wait)) for _ in range(n)]
        await settle(lambda: _pool_of_this_loop().threads == _pool.THREADS, "the cap")
        await asyncio.sleep(10 * _pool.STUCK_AFTER)
        peak = _pool_of_this_loop().threads
        release.set()
        assert all(await asyncio.gather(*jobs))
        return peak, len(jobs)

    assert asyncio.run(main()) == (_pool.THREADS, n)


def test_extra_workers_go_once_nothing_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers started for blocked jobs go once no worker was blocked for SHRINK_SECONDS."""
    monkeypatch.setattr(_pool, "SHRINK_SECONDS", 0.05)
    monkeypatch.setattr(_pool, "CORE_THREADS", 2)
    release = threading.Event()

    async def main() -> int:
        blocked = [
            asyncio.ensure_future(run_sync(release.wait)) for _ in range(_pool.CORE_THREADS + 2)
        ]
        await settle(lambda: _pool_of_this_loop().threads == _pool.CORE_THREADS + 2, "help")
        release.set()
        await asyncio.gather(*blocked)
        await asyncio.sleep(0.1)
        for _ in range(50):  # the extra workers go as they finish their next job
            await asyncio.gather(*(run_sync(time.sleep, 0.001) for _ in range(4)))
            if _pool_of_this_loop().threads == _pool.CORE_THREADS:
                break
        return _pool_of_this_loop().threads

    assert asyncio.run(main()) == _pool.CORE_THREADS


def _pool_of_this_loop() -> _pool.Pool:
    backend = current()
    assert isinstance(backend, PoolBackend)
    return backend.pool


def test_slow_fsyncs_get_more_workers_and_fast_ones_fewer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While most message-file fsyncs are slow, jobs that find no idle worker start one, up
    to THREADS (more fsyncs in flight); once fsyncs are fast again for SHRINK_SECONDS, the
    extra workers go."""
    monkeypatch.setattr(_pool, "STUCK_AFTER", 10.0)  # only the fsync rule adds workers here
    monkeypatch.setattr(_pool, "SHRINK_SECONDS", 0.05)
    monkeypatch.setattr(_pool, "CORE_THREADS", 2)
    monkeypatch.setattr(_writer, "slow_fsyncs", 1.0)
    release = threading.Event()

    async def main() -> tuple[int, int]:
        blocked = [asyncio.ensure_future(run_sync(release.wait)) for _ in range(_pool.THREADS)]
        await settle(lambda: _pool_of_this_loop().threads == _pool.THREADS, "slow fsyncs")
        grown = _pool_of_this_loop().threads
        monkeypatch.setattr(_writer, "slow_fsyncs", 0.0)
        release.set()
        await asyncio.gather(*blocked)
        await asyncio.sleep(0.1)
        for _ in range(50):
            await asyncio.gather(*(run_sync(time.sleep, 0.001) for _ in range(4)))
            if _pool_of_this_loop().threads == _pool.CORE_THREADS:
                break
        return grown, _pool_of_this_loop().threads

    assert asyncio.run(main()) == (_pool.THREADS, _pool.CORE_THREADS)


def test_note_fsync_tracks_the_share_of_slow_fsyncs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fsync moves the share a sixteenth of the way to 1 (slow) or 0 (fast): a few
    stalls among fast fsyncs keep it under one half."""
    monkeypatch.setattr(_writer, "slow_fsyncs", 0.0)
    _writer.note_fsync(_writer.SLOW_FSYNC)
    assert _writer.slow_fsyncs == pytest.approx(1 / 16)
    for i in range(64):
        _writer.note_fsync(0.003 if i % 8 == 0 else 0.0002)
    assert _writer.slow_fsyncs < 0.5
    for _ in range(32):
        _writer.note_fsync(0.002)
    assert _writer.slow_fsyncs > 0.5


def test_a_library_keeps_a_thread_per_delivery_in_flight() -> None:
    """By default (a library) the core is THREADS: every delivery in flight has its worker,
    as many fsyncs in flight as deliveries; only the server starts fewer."""
    assert _pool.CORE_THREADS == _pool.THREADS
    assert 4 <= _pool.SERVER_CORE_THREADS <= _pool.THREADS


async def test_pending_counts_jobs_until_the_loop_collects_them(anyio_backend: str) -> None:
    """``Pool.pending`` is the jobs submitted and not collected, failed or cancelled ones too."""
    if anyio_backend != "asyncio":
        pytest.skip("maildrop's own pool runs on asyncio")
    backend = current()
    assert isinstance(backend, PoolBackend)
    pool = backend.pool
    release = threading.Event()
    held = pool.submit(release.wait, (10,))
    failed = pool.submit(int, ("not a number",))
    assert pool.pending == 2
    with pytest.raises(ValueError, match="invalid literal"):
        await failed
    assert pool.pending == 1
    held.cancel()  # the caller leaves; the job still runs and is still counted
    assert pool.pending == 1
    release.set()
    await settle(lambda: pool.pending == 0, "the held job's outcome collected")


async def test_a_step_s_stop_iteration_reaches_its_caller_as_runtime_error(
    anyio_backend: str,
) -> None:
    """A future refuses StopIteration: the caller gets a RuntimeError caused by it, and the
    other results of the same wake-up still arrive."""
    if anyio_backend != "asyncio":
        pytest.skip("maildrop's own pool runs on asyncio")
    backend = current()
    assert isinstance(backend, PoolBackend)
    stop = backend.pool.submit(next, (iter(()),))
    fine = backend.pool.submit(int, ("7",))
    with pytest.raises(RuntimeError, match="raised StopIteration") as info:
        await stop
    assert isinstance(info.value.__cause__, StopIteration)
    assert await fine == 7
