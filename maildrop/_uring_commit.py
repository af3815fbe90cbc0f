"""Committing on the io_uring backend from completion callbacks: the group commit's job,
and ``Maildir.deliver`` of bytes as one future.

:class:`SyncAndClose` is ``_group_commit.sync_and_close`` on the ring. :class:`Delivering`
is what ``Maildir.deliver(data)`` does through a ``DeliverySession`` (``_session``) for a
message in memory with no option, no quota and within ``max_size``: the whole message's
finish (``_uring_whole``), then the shared directory fsync (``GroupCommit.on_durable``),
with the session's rules for what an abort keeps (``_state.keeps_link``). Nobody else holds
such a delivery, so only its caller's cancellation aborts it; its callbacks notice.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from . import _uring_abi as abi
from ._delivery import Delivery
from ._group_commit import STATS, group, release
from ._handoff import abort, cleanup, hand_back, take_over
from ._state import Owner
from ._steps import Steps
from ._uring_ops import fsync, statx
from ._uring_steps import error
from ._uring_whole import Whole
from ._writer import DeliveryFiles, Settings

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._backend import Done
    from ._uring_backend import UringBackend

__all__ = ["Delivering", "SyncAndClose"]


class SyncAndClose:
    """``_group_commit.sync_and_close`` on the ring: fsync the destination through the
    first covered delivery it can take over, then the xfs check, then close (give back)
    every covered delivery's directories; ``done(error)`` when all is over."""

    __slots__ = ("backend", "covered", "done", "error", "left")

    def __init__(self, backend: UringBackend, covered: list[DeliveryFiles], done: Done) -> None:
        self.backend, self.covered, self.done = backend, covered, done
        self.error: BaseException | None = None
        self.left = 1  # the hand-backs in a worker still running, and this job's own part

    def start(self) -> None:
        """Queue the fsync, or end at once if every covered delivery is gone."""
        for tmp in self.covered:
            if take_over(tmp):
                if not tmp.settings.fsync:  # pragma: no cover - no group commit without fsync
                    self._synced(tmp, [0])
                    return
                chain = [fsync(tmp.dest_fd), statx(tmp.dest_fd, "", abi.AT_EMPTY_PATH)]
                self.backend.ring.queue(chain, functools.partial(self._synced, tmp))
                return
        self._close()
        self._settle()

    def _synced(self, tmp: DeliveryFiles, results: list[int]) -> None:
        failed = [r for r in results if r < 0]
        if failed:
            self.error = error(failed[0])
        self._give(tmp)
        if self.error is None:  # a failed fsync closes nothing: each removes its own link
            self._close()
        self._settle()

    def _close(self) -> None:
        for tmp in self.covered:
            if take_over(tmp):
                tmp.close_dirs()  # directory fds: a close holds no data and never blocks
                self._give(tmp)

    def _give(self, tmp: DeliveryFiles) -> None:
        if not tmp.aborted:  # only the loop's thread sets `aborted`: no race here
            hand_back(tmp)
            return
        self.left += 1
        self.backend.pool.submit(hand_back, (tmp,)).add_done_callback(self._cleaned)

    def _cleaned(self, _: asyncio.Future[None]) -> None:
        self._settle()

    def _settle(self) -> None:
        self.left -= 1
        if not self.left:
            # In the next loop turn, as a job's end is reported: the links the rest of this
            # turn's completions make then wait for the next fsync all together (one more
            # fsync started in the middle of a turn would cover fewer of them).
            self.backend.loop.call_soon(self.done, self.error)


class Delivering(Whole):
    """``Maildir.deliver(data)`` for a message in memory; :attr:`future` has its
    :class:`~maildrop.Delivery` once it is durable."""

    __slots__ = ("gc",)

    def __init__(self, backend: UringBackend, settings: Settings, data: bytes, path: str) -> None:
        steps = Steps(settings)
        steps.tmp.reuse = True  # as a session's: a server's kept directories
        gc = group((path, "new"), backend.groups)  # path: settings.path, the maildir's
        # Without fsync there is no directory fsync to share: the chain is all.
        super().__init__(backend, steps, [data], not settings.fsync or gc.alone(), path)
        self.gc = gc

    def _report(self, exc: BaseException | None, result: Any) -> None:
        tmp = self.steps.tmp
        if exc is None and not self.sync:
            then = functools.partial(self._durable, result)
            self.gc.on_durable(self.gc.add(tmp), self.backend, then)
            return
        if exc is None:
            STATS["dir_fsyncs"] += tmp.settings.fsync
        self._over(exc, result)

    def _durable(self, final: str, exc: OSError | None) -> None:
        """The shared fsync covered the link, or failed: a failed delivery removes its link
        (a cancelled one keeps it, as a session's), then reports."""
        if exc is None:
            self._over(None, final)
            return
        tmp = self.steps.tmp
        if abort(tmp, keep_published=self.future.cancelled()) is not Owner.CLEANUP:
            self._over(exc, final)  # pragma: no cover - the fsync failed: fds still open
            return
        cleaned = self.backend.pool.submit(cleanup, (tmp,))
        cleaned.add_done_callback(lambda _: self._over(exc, final))

    def _over(self, exc: BaseException | None, final: str) -> None:
        gc = self.gc
        gc.inflight -= 1
        release(gc)
        if exc is not None:
            super()._report(exc, None)
            return
        STATS["deliveries"] += 1
        super()._report(None, Delivery(f"{self.path}/new/{final}", final, self.steps.tmp.size))
