"""The contenders and the probes shared by ``compare.py`` and the pytest-benchmark suites.

Every contender delivers *n* copies of a message (or one streamed message) into a maildir
that does not exist yet, and returns the seconds it took. The synchronous ones run on the
calling thread; the async ones are coroutines run on the caller's event loop. Twisted's
contenders live in ``_twisted.py`` (their reactor is process-global).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import mailbox
import os
import queue
import resource
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiofiles
import aiofiles.os

from maildrop import Maildir
from maildrop._backend import current
from maildrop._session import STATS
from maildrop._uring import availability

KIB = 1024
MIB = 1024 * KIB
CHUNK = 64 * KIB
#: How often the stall ticker wakes up (seconds).
TICK = 0.001


def uring_reason() -> str | None:
    """Return why the io_uring contenders cannot run here, or None when they can."""
    state = availability()
    return None if state.ok else f"io_uring is unavailable here: {state.reason}"


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_seq = itertools.count()


def message(size: int) -> bytes:
    """Return a plausible message of exactly *size* bytes."""
    head = b"From: bench@example.org\nTo: you@example.org\nSubject: bench\n\n"
    body = (b"x" * 75 + b"\n") * (size // 76 + 1)
    return (head + body)[:size]


def make_dirs(path: Path) -> None:
    """Create the maildir's tmp/ new/ cur/ (outside the timed region)."""
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)


def _name() -> str:
    # The same parts maildrop and the stdlib put in a name: time, pid, counter, host.
    now = time.time_ns() // 1000
    return f"{now // 1_000_000}.M{now % 1_000_000}P{os.getpid()}Q{next(_seq)}.{_HOST}"


_HOST = socket.gethostname().replace("/", r"\057").replace(":", r"\072")


# -- synchronous contenders --------------------------------------------------------------------


def raw_one(path: str, chunks: Iterator[bytes] | list[bytes], sync: bool) -> None:
    """Deliver one message with plain ``os`` calls: create, write, fsync, link, unlink,
    fsync new/ (without the fsyncs when *sync* is false)."""
    name = _name()
    tmp = f"{path}/tmp/{name}"
    fd = os.open(tmp, _NEW, 0o600)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.link(tmp, f"{path}/new/{name}")
    os.unlink(tmp)
    if sync:
        dfd = os.open(f"{path}/new", _DIR)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def raw_many(path: Path, msg: bytes, n: int, *, sync: bool = True) -> float:
    """Deliver *n* copies of *msg* one at a time with :func:`raw_one`; return seconds."""
    make_dirs(path)
    p = str(path)
    chunks = [msg]
    t0 = time.perf_counter()
    for _ in range(n):
        raw_one(p, chunks, sync)
    return time.perf_counter() - t0


class Handoff:
    """A helper thread that runs one call per handoff while the caller blocks (no asyncio).

    ``raw + 1 thread hop`` uses it: the raw delivery, moved off the calling thread with the
    cheapest possible handoff (a semaphore each way). It is the floor for any design that
    keeps the disk work off the event loop's thread.
    """

    def __init__(self) -> None:
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._job: Callable[[], object] | None = None
        threading.Thread(target=self._main, daemon=True, name="bench handoff").start()

    def _main(self) -> None:
        while True:
            self._go.acquire()
            job = self._job
            if job is None:
                return
            job()
            self._done.release()

    def call(self, job: Callable[[], object]) -> None:
        """Run *job* in the helper thread and wait for it."""
        self._job = job
        self._go.release()
        self._done.acquire()

    def close(self) -> None:
        """Stop the helper thread."""
        self._job = None
        self._go.release()


def raw_hop_many(handoff: Handoff, path: Path, msg: bytes, n: int) -> float:
    """:func:`raw_many`, each delivery handed to a helper thread; return seconds."""
    make_dirs(path)
    p = str(path)
    chunks = [msg]
    job = lambda: raw_one(p, chunks, True)  # noqa: E731
    t0 = time.perf_counter()
    for _ in range(n):
        handoff.call(job)
    return time.perf_counter() - t0


def _in_threads(n: int, threads: int, job: Callable[[int], object]) -> float:
    """Run ``job(i)`` for i in range(n) spread over *threads* plain threads; return seconds.

    A failed job stops the run and is raised here: a thread that died early would make the
    run look fast.
    """
    todo = iter(range(n))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                i = None if errors else next(todo, None)
            if i is None:
                return
            try:
                job(i)
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                return

    pool = [threading.Thread(target=work) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return seconds


def raw_threads_many(path: Path, msg: bytes, n: int, threads: int) -> float:
    """:func:`raw_many` spread over *threads* plain threads (no asyncio, no group commit).

    A reference for what the disk gives to concurrent durable deliveries on this machine.
    """
    make_dirs(path)
    p = str(path)
    chunks = [msg]
    return _in_threads(n, threads, lambda _: raw_one(p, chunks, True))


def fsync_only_threads_many(path: Path, msg: bytes, n: int, threads: int) -> float:
    """Create, write, fsync and close *n* files in *threads* plain threads: no link, no
    directory fsync. The disk's ceiling for any protocol that fsyncs each message's file."""
    path.mkdir(parents=True, exist_ok=True)
    p = str(path)

    def job(_: int) -> None:
        fd = os.open(f"{p}/{_name()}", _NEW, 0o600)
        try:
            os.write(fd, msg)
            os.fsync(fd)
        finally:
            os.close(fd)

    return _in_threads(n, threads, job)


async def raw_pool_many(path: Path, msg: bytes, n: int) -> float:
    """:func:`raw_many`, each delivery one hop through maildrop's own asyncio worker pool.

    The floor of a c=1 delivery on asyncio: the raw steps plus the cheapest hop there is,
    without maildrop's safer steps (directory fds, ``/proc`` link) and session bookkeeping.
    """
    make_dirs(path)
    p = str(path)
    chunks = [msg]
    backend = current()
    t0 = time.perf_counter()
    for _ in range(n):
        await backend.run(raw_one, p, chunks, True)
    return time.perf_counter() - t0


def raw_stream(path: Path, total: int, *, sync: bool = True) -> float:
    """Deliver one *total*-byte message written from 64 KiB chunks; return seconds."""
    make_dirs(path)
    t0 = time.perf_counter()
    raw_one(str(path), sync_chunks(total), sync)
    return time.perf_counter() - t0


def raw_stream_handoff(path: Path, total: int) -> float:
    """:func:`raw_stream` with the chunks made on this thread and written by another.

    Reference for streams: 1 MiB batches go through a one-slot queue to a writer thread (no
    asyncio), so making batch N+1 overlaps writing batch N, as in maildrop. What it loses
    against :func:`raw_stream` is the price of writing data made on another CPU.
    """
    make_dirs(path)
    p = str(path)
    batches: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=1)
    errors: list[BaseException] = []

    def writer(chunks: Iterator[bytes]) -> None:
        try:
            raw_one(p, chunks, True)
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    def from_queue() -> Iterator[bytes]:
        while (batch := batches.get()) is not None:
            yield from batch

    t0 = time.perf_counter()
    thread = threading.Thread(target=writer, args=(from_queue(),))
    thread.start()
    batch: list[bytes] = []
    for chunk in sync_chunks(total):
        batch.append(chunk)
        if len(batch) * CHUNK >= MIB:
            batches.put(batch)
            batch = []
    if batch:
        batches.put(batch)
    batches.put(None)
    thread.join()
    if errors:  # pragma: no cover
        raise errors[0]
    return time.perf_counter() - t0


def stdlib_many(path: Path, msg: bytes, n: int) -> float:
    """Deliver *n* copies with ``mailbox.Maildir.add`` (fsyncs the file, not new/)."""
    mb = mailbox.Maildir(str(path), factory=None, create=True)
    t0 = time.perf_counter()
    for _ in range(n):
        mb.add(msg)
    return time.perf_counter() - t0


# -- message sources for streams -----------------------------------------------------------------


def sync_chunks(total: int) -> Iterator[bytes]:
    """Yield *total* bytes as fresh 64 KiB ``bytes`` objects (as a network read would)."""
    template = bytearray(message(CHUNK))
    for _ in range(total // CHUNK):
        yield bytes(template)


async def async_chunks(total: int) -> AsyncIterator[bytes]:
    """The async twin of :func:`sync_chunks`."""
    for chunk in sync_chunks(total):
        yield chunk


# -- async contenders ----------------------------------------------------------------------------


async def concurrently(n: int, concurrency: int, one: Callable[[], Awaitable[object]]) -> None:
    """Run ``one()`` *n* times with at most *concurrency* calls in flight."""
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            await one()

    async with asyncio.TaskGroup() as tg:
        for _ in range(min(n, concurrency)):
            tg.create_task(worker())


def open_maildir(path: Path, *, fsync: bool, backend: str) -> Maildir:
    """``Maildir(path, fsync=, backend=)``; a maildrop from before backends existed (what
    ``benchmarks.ab`` may measure as the base) takes the thread rows without *backend*."""
    try:
        return Maildir(path, fsync=fsync, backend=backend)
    except TypeError:
        if backend != "threads":
            raise
        return Maildir(path, fsync=fsync)


async def maildrop_many(
    path: Path,
    msg: bytes,
    n: int,
    concurrency: int,
    *,
    fsync: bool = True,
    backend: str = "auto",
) -> float:
    """Deliver *n* copies with ``Maildir.deliver``, *concurrency* at a time; return seconds."""
    md = open_maildir(path, fsync=fsync, backend=backend)
    await md.deliver(msg)  # creates the maildir, outside the timed region
    t0 = time.perf_counter()
    await concurrently(n, concurrency, lambda: md.deliver(msg))
    return time.perf_counter() - t0


async def maildrop_stream(
    path: Path, total: int, *, fsync: bool = True, backend: str = "auto"
) -> float:
    """Deliver one *total*-byte message from an async iterator of 64 KiB chunks."""
    md = open_maildir(path, fsync=fsync, backend=backend)
    await md.deliver(b"x")
    t0 = time.perf_counter()
    await md.deliver(async_chunks(total))
    return time.perf_counter() - t0


_afsync = aiofiles.os.wrap(os.fsync)  # type: ignore[no-untyped-call]
_aopen = aiofiles.os.wrap(os.open)  # type: ignore[no-untyped-call]
_aclose = aiofiles.os.wrap(os.close)  # type: ignore[no-untyped-call]


async def aiofiles_one(path: str, chunks: AsyncIterator[bytes] | list[bytes]) -> None:
    """The naive async delivery: every call awaited through aiofiles (a thread hop each)."""
    name = _name()
    tmp = f"{path}/tmp/{name}"
    async with aiofiles.open(tmp, "xb") as f:
        if isinstance(chunks, list):
            for chunk in chunks:
                await f.write(chunk)
        else:
            async for chunk in chunks:
                await f.write(chunk)
        await f.flush()
        await _afsync(f.fileno())
    await aiofiles.os.rename(tmp, f"{path}/new/{name}")
    dfd = await _aopen(f"{path}/new", _DIR)
    try:
        await _afsync(dfd)
    finally:
        await _aclose(dfd)


async def aiofiles_many(path: Path, msg: bytes, n: int, concurrency: int) -> float:
    """Deliver *n* copies with :func:`aiofiles_one`, *concurrency* at a time."""
    make_dirs(path)
    p = str(path)
    t0 = time.perf_counter()
    await concurrently(n, concurrency, lambda: aiofiles_one(p, [msg]))
    return time.perf_counter() - t0


async def aiofiles_stream(path: Path, total: int) -> float:
    """Deliver one streamed message with :func:`aiofiles_one`."""
    make_dirs(path)
    t0 = time.perf_counter()
    await aiofiles_one(str(path), async_chunks(total))
    return time.perf_counter() - t0


# -- probes --------------------------------------------------------------------------------------


def rss_bytes(field_name: str = "VmRSS") -> int:
    """Return this process's current (``VmRSS``) or peak (``VmHWM``) resident set size."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(field_name.encode() + b":"):
                return int(line.split()[1]) * KIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB  # pragma: no cover


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@dataclass
class Probe:
    """What a monitored async run recorded besides its time."""

    stall: float = 0.0  # seconds: the ticker's worst lateness
    # ...and its worst lateness minus the garbage collector's pauses within that tick: a
    # full collection of a big heap (Twisted's process) pauses every thread for 15-30 ms,
    # which says nothing about what the code under test does to the loop.
    stall_no_gc: float = 0.0
    gc_pause: float = 0.0  # seconds: the longest garbage collection during the run
    rss_growth: int = 0  # bytes: peak RSS during the run minus RSS before it
    deliveries: int = 0
    dir_fsyncs: int = 0
    ticks: int = 0
    cpu: float = 0.0  # seconds of this process's CPU (every thread) during the run
    _rss0: int = field(default=0, repr=False)

    @property
    def per_fsync(self) -> float:
        """Deliveries per directory fsync."""
        return self.deliveries / self.dir_fsyncs if self.dir_fsyncs else float("nan")


def merge(probes: list[Probe]) -> Probe:
    """Combine the probes of the slices of one round."""
    return Probe(
        stall=max(p.stall for p in probes),
        stall_no_gc=max(p.stall_no_gc for p in probes),
        gc_pause=max(p.gc_pause for p in probes),
        rss_growth=max(p.rss_growth for p in probes),
        deliveries=sum(p.deliveries for p in probes),
        dir_fsyncs=sum(p.dir_fsyncs for p in probes),
        ticks=sum(p.ticks for p in probes),
        cpu=sum(p.cpu for p in probes),
    )


class _GCClock:
    """Total and longest time spent in garbage collections (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.longest = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            pause = time.perf_counter() - self._start
            self.total += pause
            self.longest = max(self.longest, pause)


async def _ticker(probe: Probe, gc_clock: _GCClock) -> None:
    loop = asyncio.get_running_loop()
    while True:
        t, in_gc = loop.time(), gc_clock.total
        await asyncio.sleep(TICK)
        probe.ticks += 1
        late = loop.time() - t - TICK
        probe.stall = max(probe.stall, late)
        probe.stall_no_gc = max(probe.stall_no_gc, late - (gc_clock.total - in_gc))


async def idle(seconds: float) -> float:
    """Do nothing for *seconds* (the monitored "idle loop" row: the machine's stall floor)."""
    await asyncio.sleep(seconds)
    return seconds


@contextlib.asynccontextmanager
async def monitored() -> AsyncIterator[Probe]:
    """Record loop stalls, peak RSS growth and deliveries per directory fsync of a run."""
    probe = Probe()
    reset_peak_rss()
    probe._rss0 = rss_bytes()
    before = dict(STATS)
    gc_clock = _GCClock()
    gc.callbacks.append(gc_clock)
    task = asyncio.create_task(_ticker(probe, gc_clock))
    await asyncio.sleep(0)
    cpu = time.process_time()
    try:
        yield probe
    finally:
        probe.cpu = time.process_time() - cpu
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gc.callbacks.remove(gc_clock)
        probe.gc_pause = gc_clock.longest
        probe.rss_growth = max(0, rss_bytes("VmHWM") - probe._rss0)
        probe.deliveries = STATS["deliveries"] - before["deliveries"]
        probe.dir_fsyncs = STATS["dir_fsyncs"] - before["dir_fsyncs"]
