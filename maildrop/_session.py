"""The async half of a delivery: a push session and its steps on the engine's backend.

A :class:`DeliverySession` buffers what the caller writes and hands it to the backend
(``_backend``) in batches (one step per small message, ~1 MiB per step for large ones).
``commit()`` publishes the message and returns only after a directory fsync that covers it,
shared with concurrent deliveries into the same directory (``_group_commit``). The request's
phase is one :class:`~maildrop._state.Phase`; who owns its files is ``_handoff``'s business.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import anyio
import anyio.lowlevel

from . import _handoff
from ._backend import Backend, backend_for
from ._group_commit import STATS, group, release
from ._quota_io import QuotaGuard
from ._state import Cause, Event, LocalProtocolError, Owner, Phase, advance, keeps_link
from ._steps import BATCH, Steps, as_chunk
from ._transform import Transform
from ._writer import Aborted, DeliveryFiles, Settings

__all__ = ["BATCH", "STATS", "Delivery", "DeliverySession", "as_chunk"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message that is durable in the maildir."""

    path: Path
    """Where the message is (in ``new/``, or ``cur/`` when delivered with flags)."""
    name: str
    """The file's basename."""
    size: int
    """Bytes written."""


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
        pipeline: bool = False,
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
        self._phase = Phase.WRITING
        self._error: BaseException | None = None  # set when the engine itself failed
        # With pipelining a step writes one batch while the caller gathers the next (where
        # the backend can run a step behind its caller). Only callers that drive a source
        # themselves ask for it: a push caller (compat, servers) keeps "write() returns
        # once its batch is on disk" for its flow control.
        self._pipeline = pipeline
        self._pending: Awaitable[None] | None = None
        self._cleanup_done: anyio.Event | None = None  # set when a spawned cleanup ended
        self._backend_of: Backend | None = None  # chosen on first use (it needs the loop)

    @property
    def size(self) -> int:
        """Bytes accepted so far."""
        return self._size

    @property
    def closed(self) -> bool:
        """Whether the session was committed or aborted."""
        return self._phase in (Phase.DURABLE, Phase.ABORTED)

    @property
    def error(self) -> BaseException | None:
        """The exception the engine raised for this delivery (not a source's own), if any."""
        return self._error

    async def __aenter__(self) -> DeliverySession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.closed:
            await self._abort(Cause.FAILED, wait=not _is_cancel(exc))

    def _require(self, phase: Phase, what: str) -> None:
        """Raise ``RuntimeError`` (``LocalProtocolError``) unless the request is in *phase*."""
        if self._phase is not phase:
            now = _PAST.get(self._phase, self._phase.value)
            raise LocalProtocolError(f"cannot {what}: this delivery was already {now}")

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Add *data* to the message; it is written off the event loop in batches.

        Raises:
            TypeError: *data* is not bytes-like (the delivery is aborted).
            MessageTooLargeError: the message passed ``max_size`` (the delivery is aborted).
            OSError: a batch could not be written (the delivery is aborted).

        **Cancellation:** the delivery is aborted; the tmp file is removed once any write
        already running in a worker thread has finished.
        """
        self._require(Phase.WRITING, "write")
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
            await self._abort_on(exc)
            raise

    def write_from(self, file: IO[bytes]) -> None:
        """Take the rest of the message from the regular (or in-memory) *file*.

        It is read, or copied with ``copy_file_range``, in the step that publishes the
        message; nothing is read before ``commit()`` (or :meth:`stage`).
        """
        self._steps.file = file

    def _take(self) -> list[bytes | memoryview]:
        chunks, self._buf, self._buffered = self._buf, [], 0
        return chunks

    async def _flush(self) -> None:
        chunks = self._take()
        # At most one batch in flight, so memory stays at ~2 batches.
        await self._drain()
        pending = None
        if self._pipeline:
            pending = self._backend().submit(
                _handoff.as_step(self._tmp, self._steps.write, chunks)
            )
        if pending is None:
            await self._run(self._steps.write, chunks)
            return
        self._pending = pending
        # Let other tasks run even when the source never suspends (an in-memory iterator).
        await anyio.lowlevel.checkpoint()

    async def _drain(self) -> None:
        """Wait for the batch in flight, if any; raise its error (it cleaned up already)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

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
        self._require(Phase.WRITING, "commit")
        self._phase = advance(self._phase, Event.COMMIT)
        gc = None
        try:
            await self._drain()
            gc = group((self._settings.path, self._tmp.subdir))
            # Without fsync there is no directory fsync to share: finish in one step.
            fsync = self._settings.fsync
            sync_new = not fsync or gc.alone()
            final = await self._run(self._steps.finish, self._take(), sync_new)
            if sync_new:
                STATS["dir_fsyncs"] += fsync
            else:
                self._advance(Event.LINK)
                # The fsync that covers this delivery closes its directory fds.
                await gc.wait_durable(gc.add(self._tmp), self._backend())
            self._advance(Event.SYNC)
            return self._delivered(final)
        except BaseException as exc:
            await self._abort_on(exc)
            raise
        finally:
            if gc is not None:
                gc.inflight -= 1
                release(gc)

    def _advance(self, event: Event) -> None:
        if self._phase is Phase.ABORTED:
            raise RuntimeError("this delivery was aborted (abort() was called during commit())")
        self._phase = advance(self._phase, event)

    def _delivered(self, final: str) -> Delivery:
        STATS["deliveries"] += 1
        if self._steps.file is not None or self._transform is not None:
            self._size = self._tmp.size
        path = Path(self._settings.path, self._tmp.subdir, final)
        return Delivery(path=path, name=final, size=self._tmp.size)

    async def stage(self) -> None:
        """Write the rest of the message and fsync it, leaving it in ``tmp/`` (``deliver_many``).

        Raises:
            OSError: a step failed (the delivery is aborted).

        **Cancellation:** the delivery is aborted and cleaned up.
        """
        self._require(Phase.WRITING, "stage")
        try:
            await self._drain()
            await self._run(self._stage_step, self._take())
            self._advance(Event.STAGE)
        except BaseException as exc:
            await self._abort_on(exc)
            raise

    def _stage_step(self, chunks: list[bytes | memoryview]) -> None:
        self._steps.write_rest(chunks)
        if self._settings.fsync:
            self._tmp.sys.fsync(self._tmp.fd)

    async def run_staged(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(staged, *args)`` as a step that owns the staged message's files.

        *staged* is the session's :class:`~maildrop._writer.DeliveryFiles`; an exception of *fn*
        aborts the delivery (its files are removed) and is raised.

        **Cancellation:** as for :meth:`stage`.
        """
        self._require(Phase.STAGED, "run a step on the staged message")
        try:
            return await self._run(fn, self._tmp, *args)
        except BaseException as exc:
            await self._abort_on(exc)
            raise

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
        if self._phase is Phase.ABORTED:
            await self._wait_cleanup()
        elif self._phase is not Phase.DURABLE:
            await self._abort(Cause.REQUESTED)

    async def _abort_on(self, exc: BaseException) -> None:
        self._error = exc  # what the engine itself raised (deliver_many tells it apart)
        if self.closed:
            return
        # A cancelled caller never waits for the cleanup (see _abort).
        cancelled = _is_cancel(exc)
        await self._abort(Cause.CANCELLED if cancelled else Cause.FAILED, wait=not cancelled)

    async def _abort(self, cause: Cause, *, wait: bool = True) -> None:
        """Abort the request and hand its files to whoever cleans them up; with *wait*, see
        the cleanup done.

        Neither a worker that owns the files nor a spawned cleanup job is waited for by a
        cancelled caller: a worker blocked in a syscall (a frozen filesystem) must not hold
        up cancellation, timeouts or shutdown. Waiting is itself cancellable.
        """
        keep = keeps_link(self._phase, cause)
        self._phase = advance(self._phase, Event.ABORT)
        self._buf = []
        if self._quota is not None:
            self._quota.release()
        then = _handoff.abort(self._tmp, keep_published=keep)
        if then is Owner.CLEANED:
            return
        if then is Owner.CLEANUP:
            ended = self._cleanup_done = anyio.Event()
            self._backend().spawn(_handoff.cleanup, self._tmp, done=lambda _: ended.set())
        if wait:
            await self._wait_cleanup()

    async def _wait_cleanup(self) -> None:
        """Wait until the delivery's files are cleaned up (by whichever thread owns them)."""
        if self._cleanup_done is not None:
            await self._cleanup_done.wait()  # usually the job did it; else the owner below
        # A worker that owns the files cannot set an anyio.Event from its thread once the
        # loop is closing, so poll: only an explicit abort() during a worker call, or a
        # group-commit job that took the files over first, gets here.
        while not self._tmp.cleaned:  # noqa: ASYNC110 - a worker's flag
            await anyio.sleep(0.001)

    def _backend(self) -> Backend:
        """Return the backend this delivery's steps run on (``Maildir(backend=...)``)."""
        if self._backend_of is None:
            self._backend_of = backend_for(self._settings.backend)
        return self._backend_of

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the step ``fn(*args)`` on the backend, owning the files for its duration."""
        # A cancelled caller returns at once; the worker finishes its call and, seeing
        # `aborted`, cleans up (see _abort).
        try:
            return await self._backend().run(_handoff.as_step(self._tmp, fn, *args))
        except Aborted:
            # Only another task's abort() gets here (a cancelled caller has left already).
            raise RuntimeError("this delivery was aborted while a worker was writing it") from None


#: How an error message names a phase the request has passed into.
_PAST = {Phase.DURABLE: "committed", Phase.LINKED: "committing"}


def _is_cancel(exc: BaseException | None) -> bool:
    return isinstance(exc, anyio.get_cancelled_exc_class())
