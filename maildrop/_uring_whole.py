"""A whole message on the io_uring backend, driven by completion callbacks.

The common delivery (the message in memory, written in one step) needs no task and no
coroutine per step: :class:`Whole` opens, writes and publishes it from a chain of completion
callbacks, with one future for its caller, and ``_uring_commit`` runs the group commit
that follows the same way. The ops, their order and what each
result means are ``_uring_stream``'s (:class:`~maildrop._uring_stream.OneOpen`,
:func:`~maildrop._uring_stream.one_chain`, :func:`~maildrop._uring_stream.after_one`); what
those send back to step-by-step work (a short write, a taken name, no hard links) runs as
the coroutine it is there, in a job of its own; a maildir of another user (as root) is the
thread step's, as everything the ring does not take.

Directories shared by the deliveries in flight (:class:`Shared`): a delivery into a maildir
whose ``tmp/`` and destination another delivery of this loop holds open, opened at most
``_dircache.MAX_AGE`` ago, takes them instead of opening its own (two ops fewer, and one
``statx`` fewer as root); the last one to leave closes them, so nothing stays open once no
delivery runs (a library caller never finds its filesystem kept busy). A delivery that
fails drops them: the next one opens afresh.

Ownership is ``_handoff``'s, as for a ring job (``_uring_backend``): the delivery's files
belong to the callbacks from :func:`~maildrop._handoff.begin` to the hand-back; a cancelled
caller is released at once and the chain's completion cleans up after the abort.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Coroutine
from typing import Any

from . import _dircache
from . import _uring_stream as stream
from ._dircache import MAX_AGE, Entry
from ._handoff import abort, begin, hand_back
from ._steps import Steps
from ._uring_chain import Done
from ._uring_ops import fspath
from ._uring_steps import IOV_MAX, dir_ops, encoded, error, no_free_name, open_under
from ._writer import _NAME_TRIES, FILE_FLAGS, LIVE_TMP, DeliveryFiles, Settings, new_name

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._uring_backend import UringBackend

__all__ = ["Shared", "Whole", "whole"]


#: Maildirs whose directories :class:`Shared` remembers before it drops the idle ones.
_MAX_SHARED = 256


class Shared(dict[tuple[str, str], Entry]):
    """The directories that deliveries in flight on one loop hold open, by (maildir, subdir).

    An :class:`~maildrop._dircache.Entry` made here is *dropped* from the start (it is in no
    process-wide table): ``_dircache.give_back`` closes its fds when its last user leaves.
    As in ``_dircache``, an entry is taken only while the maildir's path still names the
    directories it holds: one ``lstat`` of its ``tmp/`` per delivery (a cached path, no disk
    I/O), compared by device and inode; a replaced ``new/`` is picked up within ``MAX_AGE``.
    """

    def take(self, tmp: DeliveryFiles, path: str) -> bool:
        """Give *tmp* (into the maildir at *path*) the directories of a delivery in flight;
        False if none are fresh."""
        entry = self.get((path, tmp.subdir))
        if entry is None or time.monotonic() - entry.opened > MAX_AGE:
            return False
        try:
            st = os.lstat(encoded(path, "tmp"))
        except OSError:  # moved or removed: the opener's rules decide what happens
            return False
        if (st.st_dev, st.st_ino) != entry.dev_ino:
            return False
        with _dircache._lock:  # a worker's cleanup may give an entry back meanwhile
            if not entry.users:
                return False
            entry.users += 1
        tmp.dir_fds, tmp._kept = list(entry.dir_fds), entry
        tmp.tmp_fd, tmp.dest_fd = entry.tmp_fd, entry.dest_fd
        return True

    def offer(self, tmp: DeliveryFiles) -> None:
        """Share the directories *tmp* just opened with the deliveries that follow it."""
        entry = tmp._kept = Entry(tmp, (0, 0))
        entry.dropped = True
        key = (tmp.settings.path, tmp.subdir)
        old = self.get(key)
        if old is None or not old.users or entry.opened - old.opened > MAX_AGE:
            st = os.fstat(tmp.tmp_fd)  # an open fd: no disk I/O
            entry.dev_ino = (st.st_dev, st.st_ino)
            if old is None and len(self) >= _MAX_SHARED:  # bounded: drop those nobody holds
                for stale in [k for k, e in self.items() if not e.users]:
                    del self[stale]
            self[key] = entry

    def forget(self, tmp: DeliveryFiles) -> None:
        """Stop sharing *tmp*'s directories (its delivery failed)."""
        key = (tmp.settings.path, tmp.subdir)
        if tmp._kept is not None and self.get(key) is tmp._kept:
            del self[key]


class Whole:
    """One whole message's ``Steps.finish`` on the ring; :attr:`future` has its outcome."""

    __slots__ = (
        "backend", "chain", "chunks", "creating", "data", "ended", "final", "future", "opening",
        "over", "path", "steps", "sync",
    )  # fmt: skip

    def __init__(
        self,
        backend: UringBackend,
        steps: Steps,
        chunks: list[bytes | memoryview],
        sync: bool,
        path: str | None = None,
    ) -> None:
        self.backend, self.steps, self.chunks = backend, steps, chunks
        backend.active += 1  # until _report
        #: The maildir's (``settings.path``, a property: computed once, or given).
        self.path = steps.tmp.settings.path if path is None else path
        #: Whether the destination is synced in the delivery's own chain (no group commit).
        self.sync = sync
        self.future: asyncio.Future[Any] = backend.loop.create_future()
        self.final = ""
        self.data: list[bytes | memoryview] = []
        self.chain: list[Any] = []
        self.opening: stream.OneOpen | None = None
        #: The tmp file being created: its name, that name's bytes, the tries left after it.
        self.creating: tuple[str, bytes, int] | None = None
        self.ended: asyncio.Future[None] | None = None  # see ending()
        self.over = False  # reported: the delivery's files are handed back

    @staticmethod
    def fits(settings: Settings) -> bool:
        """Whether a whole message into *settings*' maildir takes this path (else the
        coroutine's: a maildir of another user, as root)."""
        return settings.path not in stream.FOREIGN

    def start(self) -> None:
        """Open what the message needs: the shared or kept directories' file, or all of it."""
        tmp = self.steps.tmp
        try:
            begin(tmp)
        except BaseException as exc:
            self._report(exc, "")
            return
        if tmp.reuse and _dircache.usable(tmp):  # a server: the directories it keeps open
            if tmp.reuse_kept() and tmp.owner is None:
                self._create(_NAME_TRIES)
            else:  # none kept yet (the thread step keeps them), or a chown to do
                tmp.close_dirs()
                self._in_thread()
            return
        if self.backend.shared.take(tmp, self.path):
            self._create(_NAME_TRIES)
            return
        dirs = dir_ops(self.backend.ring, tmp)
        if dirs is None:
            self._in_thread()
            return
        opening = self.opening = stream.OneOpen(self.backend.ring, tmp, dirs)
        self._queue(opening.ops, self._opened, linked=False)

    def _queue(self, ops: list[Any], then: Done, linked: bool = True) -> None:
        """Queue *ops* on the ring, *then* with their results; a ring that refuses them (closed
        with its loop) fails the delivery instead of raising into a completion callback."""
        try:
            self.backend.ring.queue(ops, then, linked=linked)
        except (RuntimeError, ValueError) as exc:
            self._end(exc)

    def _opened(self, results: list[int]) -> None:
        tmp, opening = self.steps.tmp, self.opening
        assert opening is not None
        try:
            took = opening.took(tmp, results)
        except BaseException as exc:
            self._end(exc)
            return
        if isinstance(took, list):
            if took:
                self._queue(took, lambda _: self._gone(opening), linked=False)
            else:
                self._gone(opening)
            return
        self.backend.shared.offer(tmp)
        if took is None:
            self._create(_NAME_TRIES)
        else:
            self._write()

    def _gone(self, opening: stream.OneOpen) -> None:
        opening.gone()
        self._in_thread()

    def _create(self, tries: int) -> None:
        """Create the tmp file under a free name in the open ``tmp/`` (``_uring_stream``'s
        ``_create``)."""
        if not tries:
            self._end(no_free_name(self.steps.tmp, "tmp"))
            return
        name = new_name()
        LIVE_TMP.add(name)  # before the file exists, so a sweep never sees it unowned
        raw = fspath(name)  # encoded once: the chain's unlink of the tmp name takes it too
        self.creating = (name, raw, tries)
        op = open_under(self.backend.ring, self.steps.tmp.tmp_fd, raw, FILE_FLAGS)
        self._queue([op], self._created)

    def _created(self, results: list[int]) -> None:
        tmp, fd = self.steps.tmp, results[0]
        assert self.creating is not None
        name, _, tries = self.creating
        if fd >= 0:
            tmp.fd, tmp.tmp_name = fd, name
            self._write()
            return
        LIVE_TMP.discard(name)
        if fd == -errno.EEXIST:
            self._create(tries - 1)
        else:
            self._end(error(fd, name))

    def _write(self) -> None:
        if self.future.cancelled():  # the caller left: neither write nor publish the message
            self._end(asyncio.CancelledError())  # (which aborts the delivery)
            return
        steps = self.steps
        steps.started = True
        try:
            data = self.data = stream.whole_data(steps, self.chunks)
        except BaseException as exc:  # the transform's tail passed max_size
            self._end(exc)
            return
        if not 0 < len(data) <= IOV_MAX:
            self._job(stream.redo(self.backend.ring, steps, data, self.sync, stream.Again.SHORT))
            return
        raw = None if self.creating is None else self.creating[1]  # None: OneOpen's name
        self.chain, self.final = stream.one_chain(steps, data, self.sync, raw)
        self._queue(self.chain, self._written)

    def _written(self, results: list[int]) -> None:
        steps = self.steps
        if self.future.cancelled():
            self._check_cancelled()
        try:
            outcome = stream.after_one(steps, self.chain, self.final, self.sync, results)
        except BaseException as exc:
            self._end(exc)
            return
        if isinstance(outcome, stream.Again):
            self._job(stream.redo(self.backend.ring, steps, self.data, self.sync, outcome))
        else:
            self._end(None, outcome)

    def _in_thread(self) -> None:
        """Have the thread step do it all (nothing was done on the ring)."""
        if self.future.cancelled():
            self._check_cancelled()  # the thread step then publishes nothing
        pooled = self.backend.pool.submit(self.steps.finish, (self.chunks, self.sync))
        pooled.add_done_callback(self._joined)

    def _job(self, job: Coroutine[Any, Any, str | None]) -> None:
        """Run the step-by-step rest of the delivery as a job of its own."""
        self.backend.job(self._published(job)).add_done_callback(self._joined)

    async def _published(self, job: Coroutine[Any, Any, str | None]) -> str:
        final = await job
        if final is None:  # no hard links here: the thread step's rename fallback
            return await self.backend.pool.submit(self.steps.publish, (self.sync,))
        return final

    def _joined(self, done: asyncio.Future[str]) -> None:
        if done.cancelled():  # pragma: no cover - nothing cancels the pool or a job
            self._end(asyncio.CancelledError())
        elif (exc := done.exception()) is not None:
            self._end(exc)
        else:
            self._end(None, done.result())

    def _end(self, exc: BaseException | None, final: str = "") -> None:
        """Hand the files back (cleaning up after a failure or an abort), then report."""
        tmp = self.steps.tmp
        if self.future.cancelled():
            self._check_cancelled()
        if exc is None and not tmp.aborted:
            hand_back(tmp)
            self._report(None, final)
            return
        if exc is not None:
            self.backend.shared.forget(tmp)
        cleaned = self.backend.pool.submit(_hand_back, (tmp, exc is not None))
        cleaned.add_done_callback(lambda _: self._report(exc, final))

    def _check_cancelled(self) -> None:
        """Abort the delivery, whose caller left: a caller of :class:`Delivering` cannot
        (it has no session), a session's has already."""
        if not self.steps.tmp.aborted:
            abort(self.steps.tmp, keep_published=False)

    def ending(self) -> asyncio.Future[None]:
        """Return a future that is done once the delivery's files are handed back (a
        cancelled caller's backend waits for it as for a job)."""
        if self.ended is None:
            self.ended = self.backend.loop.create_future()
            if self.over:
                self.ended.set_result(None)
        return self.ended

    def _report(self, exc: BaseException | None, result: Any) -> None:
        """Give the caller *result* or *exc* (the files are handed back)."""
        self.over = True
        self.backend.active -= 1
        if self.ended is not None and not self.ended.done():  # a waiter may cancel it
            self.ended.set_result(None)
        if self.future.cancelled():
            return  # the caller left: nobody looks at the outcome
        if exc is not None:
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


def _hand_back(tmp: DeliveryFiles, failed: bool) -> None:
    hand_back(tmp, failed=failed)


def whole(
    backend: UringBackend, steps: Steps, chunks: list[bytes | memoryview], sync_new: bool
) -> Whole | None:
    """Start a whole message's ``Steps.finish`` on *backend*'s ring (its ``future`` has the
    published name), or return None where the coroutine path takes it (``Whole.fits``)."""
    if not Whole.fits(steps.tmp.settings):
        return None
    job = Whole(backend, steps, chunks, sync_new)
    job.start()
    return job
