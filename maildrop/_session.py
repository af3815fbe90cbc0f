"""The async half of a delivery: a push session, its worker-thread hops and group commit.

A :class:`DeliverySession` buffers what the caller writes and hands it to a worker thread in
batches (one hop per small message, ~1 MiB per hop for large ones). ``commit()`` publishes the
message and returns only after a directory fsync that covers it. Concurrent deliveries into
the same directory share that fsync (group commit): one ``fsync(new/)`` covers every link that
completed before it started. A delivery with nothing else in flight does it inside its own
hop instead, so a lone message costs exactly one thread hop.
"""

from __future__ import annotations

import asyncio
import errno
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import anyio
import anyio.lowlevel
from anyio.lowlevel import RunVar

from ._pool import run_sync, running_loop, spawn, submit
from ._quota_io import QuotaGuard
from ._steps import BATCH, Steps, as_chunk
from ._transform import Transform
from ._writer import Aborted, DeliveryFiles, Settings

__all__ = ["BATCH", "STATS", "Delivery", "DeliverySession", "as_chunk"]

T = TypeVar("T")

#: Process-wide counters (read by the benchmarks): deliveries committed, directory fsyncs.
STATS = {"deliveries": 0, "dir_fsyncs": 0}

_dirsyncs: RunVar[dict[tuple[str, str], _DirSync]] = RunVar("maildrop_dirsyncs")
_dirsyncs_asyncio: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, str], _DirSync]
] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message that is durable in the maildir."""

    path: Path
    """Where the message is (in ``new/``, or ``cur/`` when delivered with flags)."""
    name: str
    """The file's basename."""
    size: int
    """Bytes written."""


class _DirSync:
    """Group-commit bookkeeping for one destination directory on one event loop.

    Links are numbered in the order the loop sees them complete; a directory fsync started
    when ``linked`` was N covers links 1..N. The fsync runs as a job of its own, not as part
    of the delivery that started it: a delivery cancelled (or aborted) while it waits must
    not take the fsync that the other deliveries wait for down with it.
    """

    def __init__(self, key: tuple[str, str]) -> None:
        self.key = key
        self.inflight = 0  # deliveries between commit() entry and return
        self.linked = 0  # links completed (as seen by the loop)
        self.synced = 0  # every link numbered <= this is durable
        self.failed = 0  # every link numbered <= this saw a failed fsync
        self.error: OSError | None = None
        self.running: anyio.Event | None = None  # set when the fsync in flight ends
        # Linked deliveries waiting for a directory fsync: the one that covers them closes
        # their directory fds in its worker (see _sync_and_close).
        self.waiting: list[DeliveryFiles] = []

    async def wait_durable(self, seq: int) -> None:
        while self.synced < seq:
            if self.failed >= seq and self.error is not None:
                err = self.error
                raise OSError(err.errno, f"fsync of the maildir failed: {err.strerror}")
            if self.running is None:
                self._start()
            else:
                await self.running.wait()

    def _start(self) -> None:
        target = self.linked
        covered, self.waiting = self.waiting, []
        done = self.running = anyio.Event()
        STATS["dir_fsyncs"] += 1

        def finish(error: BaseException | None) -> None:
            if error is None:
                self.synced = max(self.synced, target)
            else:
                if not isinstance(error, OSError):  # pragma: no cover - a bug, not the disk
                    error = OSError(errno.EIO, f"the directory fsync failed: {error!r}")
                self.failed, self.error = max(self.failed, target), error
            self.running = None
            done.set()
            _release_dirsync(self.key, self)

        # The job belongs to no delivery: a waiter cancelled meanwhile leaves at once, the
        # others are woken when it ends.
        spawn(_sync_and_close, covered, done=finish)


def _sync_and_close(covered: list[DeliveryFiles]) -> None:
    """Fsync the destination directory of the deliveries in *covered*, then close their
    directory fds (runs in a worker).

    The fsync goes through the fd of the first delivery this worker can take over (see
    :func:`_take_over`), so a cancelled delivery's cleanup cannot close the fd under it; a
    delivery cleaned up already is skipped. If none is left, every one of them was either
    made durable by an earlier fsync or gave up: nothing to do.

    The fds are closed here, not on the event loop: ``os.close`` releases the GIL, and a
    loop thread that gives the GIL to a busy worker waits to get it back. After a failed
    fsync nothing is closed: each delivery then removes its own link, which needs its fds.
    """
    for t in covered:
        if _take_over(t):
            try:
                t.sync_dest()
            finally:
                _hand_back(t)
            break
    for t in covered:
        if _take_over(t):
            try:
                t.close_dirs()
            finally:
                _hand_back(t)


def _take_over(tmp: DeliveryFiles) -> bool:
    """Make the calling thread the owner of *tmp*'s files; False if gone or owned already.

    One owner at a time touches a delivery's files: a worker running one of its steps, the
    group-commit job, or a cleanup job. ``tmp.lock`` only guards these flags and is never
    held during I/O, so the event loop can always hand an abort over without waiting.
    """
    with tmp.lock:
        if tmp.cleaned or tmp.running:
            return False
        tmp.running = True
        return True


def _hand_back(tmp: DeliveryFiles, *, failed: bool = False) -> None:
    """End this thread's ownership of *tmp*; first clean up if it failed or was aborted."""
    with tmp.lock:
        if failed:
            # What a failed step published is not a delivered message: it goes too.
            tmp.aborted, tmp.keep_published = True, False
        if not tmp.aborted:
            tmp.running = False
            return
    try:
        tmp.cleanup()
    finally:
        with tmp.lock:
            tmp.running = False


def _cleanup(tmp: DeliveryFiles) -> None:
    """Remove an aborted delivery's files unless another owner is still at it (a worker)."""
    if _take_over(tmp):
        _hand_back(tmp)


def _dirsync_table() -> dict[tuple[str, str], _DirSync]:
    # Per event loop: a weak dict on asyncio (a RunVar lookup costs a few µs per delivery),
    # a RunVar elsewhere (trio).
    loop = running_loop()
    if loop is None:
        try:
            return _dirsyncs.get()
        except LookupError:
            fresh: dict[tuple[str, str], _DirSync] = {}
            _dirsyncs.set(fresh)
            return fresh
    table = _dirsyncs_asyncio.get(loop)
    if table is None:
        table = _dirsyncs_asyncio[loop] = {}
    return table


def _dirsync(key: tuple[str, str]) -> _DirSync:
    table = _dirsync_table()
    ds = table.get(key)
    if ds is None:
        ds = table[key] = _DirSync(key)
    return ds


def _release_dirsync(key: tuple[str, str], ds: _DirSync) -> None:
    if ds.inflight == 0 and ds.running is None:
        table = _dirsync_table()
        if table.get(key) is ds:
            del table[key]


class DeliverySession:
    """A message being delivered piece by piece; get one from ``Maildir.open_delivery()``.

    Use it as an async context manager: ``write()`` the chunks, then ``commit()``. Leaving
    the block without committing aborts silently; leaving it with an exception aborts and
    lets the exception through. Nothing is visible in the maildir before ``commit()``
    returns.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        flags: str | None = None,
        size_stamp: bool = False,
        max_size: int | None = None,
        batch_size: int = BATCH,
        transform: Transform | None = None,
        quota: QuotaGuard | None = None,
    ) -> None:
        self._settings = settings
        self._tmp = DeliveryFiles(settings, "new" if flags is None else "cur")
        # Header stamps / CRLF conversion (``_transform``) and Maildir++ quota (``_quota_io``).
        self._transform = transform
        self._quota = quota
        if quota is not None:
            quota.tmp = self._tmp
            self._tmp.ledger_lock = quota
        # The worker-side half: writing, copying, publishing (shared with the MDA path).
        self._steps = Steps(
            self._tmp, flags=flags, size_stamp=size_stamp, max_size=max_size,
            batch=batch_size, transform=transform, quota=quota,
        )  # fmt: skip
        self._batch = batch_size
        self._buf: list[bytes | memoryview] = []
        self._buffered = 0
        self._size = 0
        self._file: IO[bytes] | None = None
        self._state = "open"  # open -> committed | aborted
        self._result: Delivery | None = None
        self._committing = False
        self._error: BaseException | None = None  # set when the engine itself failed
        # The batch a worker is writing while the caller gathers the next (asyncio only).
        # Only pull sources (``_sources.feed``) turn pipelining on: a push caller (compat,
        # servers) keeps "write() returns once its batch is on disk" for its flow control.
        self._pipeline = False
        self._pending: asyncio.Future[None] | None = None
        self._cleanup_done: anyio.Event | None = None  # set when a spawned cleanup ended

    @property
    def size(self) -> int:
        """Bytes accepted so far."""
        return self._size

    @property
    def closed(self) -> bool:
        """Whether the session was committed or aborted."""
        return self._state != "open"

    async def __aenter__(self) -> DeliverySession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state == "open":
            await self._abort(keep_published=False, wait=not _is_cancel(exc))

    def _check_open(self, what: str) -> None:
        if self._state != "open":
            raise RuntimeError(f"cannot {what}: this delivery was already {self._state}")

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Add *data* to the message; it is written off the event loop in batches.

        Raises:
            TypeError: *data* is not bytes-like (the delivery is aborted).
            MessageTooLargeError: the message passed ``max_size`` (the delivery is aborted).
            OSError: a batch could not be written (the delivery is aborted).

        **Cancellation:** the delivery is aborted; the tmp file is removed once any write
        already running in a worker thread has finished.
        """
        self._check_open("write")
        try:
            chunk = self._steps.accept(data, self._size)
            n = len(chunk)
            if not n:
                return
            self._size += n
            self._buf.append(chunk)
            self._buffered += n
            if self._buffered >= self._batch:
                await self._flush()
        except BaseException as exc:
            await self._fail(exc)
            raise

    def _take(self) -> list[bytes | memoryview]:
        chunks, self._buf, self._buffered = self._buf, [], 0
        return chunks

    async def _flush(self) -> None:
        chunks = self._take()
        # Pipelining: a worker writes this batch while the caller produces the next one
        # (at most one batch in flight, so memory stays at ~2 batches). Off asyncio, and
        # for push callers (see _pipeline), the batch is written before write() returns.
        await self._drain()
        pending = submit(self._job(self._write_step, chunks)) if self._pipeline else None
        if pending is None:
            await self._hop(self._write_step, chunks)
            return
        self._pending = pending
        # Let other tasks run even when the source never suspends (an in-memory iterator).
        await anyio.lowlevel.checkpoint()

    async def _drain(self) -> None:
        """Wait for the batch in flight, if any; raise its error (it cleaned up already)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    def _write_step(self, chunks: list[bytes | memoryview]) -> None:
        self._steps.write(chunks)

    def _write_rest(self, chunks: list[bytes | memoryview]) -> None:
        self._steps.write_rest(chunks)

    def _finish_step(self, chunks: list[bytes | memoryview], sync_new: bool) -> str:
        return self._steps.finish(chunks, sync_new)

    def _attach_file(self, f: IO[bytes]) -> None:
        self._file = self._steps.file = f

    async def commit(self) -> Delivery:
        """Publish the message and return once it is durable.

        Raises:
            OSError: a step failed (original errno); nothing is left in ``tmp/`` or the
                destination.

        **Cancellation:** before the message is linked into the destination, the delivery
        is aborted and cleaned up. Once linked it stays: it is complete and will be made
        durable by the next directory fsync (a retried SMTP transaction may then deliver
        it twice, which beats losing it).
        """
        self._check_open("commit")
        self._committing = True
        try:
            await self._drain()
        except BaseException as exc:
            await self._fail(exc)
            raise
        key = (self._settings.path, self._tmp.subdir)
        ds = _dirsync(key)
        ds.inflight += 1
        try:
            # Without fsync there is no directory fsync to share: finish in one hop.
            fsync = self._settings.fsync
            sync_new = not fsync or (ds.inflight == 1 and ds.running is None)
            chunks = self._take()
            final = await self._hop(self._finish_step, chunks, sync_new)
            self._check_not_aborted()
            if sync_new:
                STATS["dir_fsyncs"] += fsync
            else:
                ds.linked += 1
                ds.waiting.append(self._tmp)
                await ds.wait_durable(ds.linked)
                self._check_not_aborted()
                # The fsync that covered this delivery closed its directory fds already.
            STATS["deliveries"] += 1
            self._state = "committed"
            if self._file is not None or self._transform is not None:
                self._size = self._tmp.size
            path = Path(self._settings.path, self._tmp.subdir, final)
            self._result = Delivery(path=path, name=final, size=self._tmp.size)
            return self._result
        except BaseException as exc:
            await self._fail(exc)
            raise
        finally:
            ds.inflight -= 1
            _release_dirsync(key, ds)

    async def abort(self) -> None:
        """Abandon the message and remove everything it created.

        Called while another task is inside :meth:`commit`, it stops the commit (which then
        raises ``RuntimeError``), but a message already linked into the destination stays:
        it is complete, and removing it could lose a message someone else acknowledged.
        It returns once the cleanup is done, also when a cancelled ``write()`` or
        ``commit()`` has handed the cleanup to a worker already.

        **Cancellation:** the caller is released at once; the cleanup still completes in
        its worker thread.
        """
        if self._state == "open":
            await self._abort(keep_published=self._committing)
        elif self._state == "aborted":
            await self._cleaned()

    async def _fail(self, exc: BaseException) -> None:
        self._error = exc  # what the engine itself raised (deliver_many tells it apart)
        if self._state != "open":
            return
        # Cancellation after the link keeps the message (it is complete); errors remove it.
        # A cancelled caller never waits for the cleanup (see _abort).
        cancelled = _is_cancel(exc)
        await self._abort(keep_published=cancelled, wait=not cancelled)

    def _check_not_aborted(self) -> None:
        if self._state == "aborted":
            raise RuntimeError("this delivery was aborted (abort() was called during commit())")

    async def _abort(self, *, keep_published: bool, wait: bool = True) -> None:
        """Hand the delivery's files to whoever cleans them up; with *wait*, see it done.

        A worker that owns the files (inside a step, or the shared directory fsync) cleans
        up when its call returns; otherwise a cleanup job is spawned. Neither is waited for
        by a cancelled caller: a worker blocked in a syscall (a frozen filesystem) must not
        hold up cancellation, timeouts or shutdown. Waiting is itself cancellable.
        """
        self._state = "aborted"
        self._buf = []
        if self._quota is not None:
            self._quota.release()
        tmp = self._tmp
        with tmp.lock:
            if not tmp.aborted:  # the first reason stands (a failed step removes its link)
                tmp.aborted, tmp.keep_published = True, keep_published
            idle = not tmp.running and not tmp.cleaned
            if idle and not tmp.dir_fds:
                tmp.cleaned = True  # nothing was ever opened: no I/O needed
                return
        if idle:
            ended = self._cleanup_done = anyio.Event()
            spawn(_cleanup, tmp, done=lambda _: ended.set())
        if wait:
            await self._cleaned()

    async def _cleaned(self) -> None:
        """Wait until the delivery's files are cleaned up (by whichever thread owns them)."""
        if self._cleanup_done is not None:
            await self._cleanup_done.wait()  # usually the job did it; else the owner below
        # A worker that owns the files cannot set an anyio.Event from its thread once the
        # loop is closing, so poll: only an explicit abort() during a worker call, or a
        # group-commit job that took the files over first, gets here.
        while not self._tmp.cleaned:  # noqa: ASYNC110 - a worker's flag
            await anyio.sleep(0.001)

    async def _hop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run *fn* in a worker thread that owns the tmp file for the call's duration."""
        # A cancelled caller returns at once; the worker finishes its call and, seeing
        # `aborted`, cleans up (see _abort).
        try:
            return await run_sync(self._job(fn, *args))
        except Aborted:
            # Only another task's abort() gets here (a cancelled caller has left already).
            raise RuntimeError("this delivery was aborted while a worker was writing it") from None

    def _job(self, fn: Callable[..., T], *args: Any) -> Callable[[], T]:
        """Wrap *fn* for a worker: refuse an aborted delivery, clean up after a failure."""
        tmp = self._tmp

        def run() -> T:
            with tmp.lock:
                if tmp.aborted:
                    raise Aborted
                tmp.running = True
            ok = False
            try:
                result = fn(*args)
                ok = True
                return result
            finally:
                _hand_back(tmp, failed=not ok)

        return run


def _is_cancel(exc: BaseException | None) -> bool:
    return isinstance(exc, anyio.get_cancelled_exc_class())
