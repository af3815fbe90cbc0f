"""Who owns a delivery's files, and how the event loop hands them over without waiting.

One owner at a time touches a delivery's files (``_state.Owner``): a worker running one of
its steps, the group-commit job, or a cleanup job; between those, the caller. ``tmp.lock``
only guards the ownership fields and is never held during I/O, so the event loop can always
abort a delivery at once: a worker that owns the files sees ``aborted`` when its call returns
and cleans up itself; otherwise the loop spawns a cleanup job (``_session``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ._state import Owner, abort_owner
from ._writer import Aborted, DeliveryFiles

__all__ = [
    "Step",
    "abort",
    "as_step",
    "begin",
    "cleanup",
    "hand_back",
    "owner",
    "run_owned",
    "take_over",
]

T = TypeVar("T")


def owner(tmp: DeliveryFiles) -> Owner:
    """Return who owns *tmp*'s files now (call with ``tmp.lock`` held)."""
    if tmp.cleaned:
        return Owner.CLEANED
    return Owner.WORKER if tmp.running else Owner.CALLER


def take_over(tmp: DeliveryFiles) -> bool:
    """Make the calling thread the owner of *tmp*'s files; False if gone or owned already."""
    with tmp.lock:
        if owner(tmp) is not Owner.CALLER:
            return False
        tmp.running = True
        return True


def hand_back(tmp: DeliveryFiles, *, failed: bool = False) -> None:
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


def run_owned(tmp: DeliveryFiles, fn: Callable[[], object]) -> bool:
    """Call *fn* as the owner of *tmp*'s files; False (not called) if gone or owned already.

    An aborted delivery's files are cleaned up once *fn* returns.
    """
    if not take_over(tmp):
        return False
    try:
        fn()
    finally:
        hand_back(tmp)
    return True


def cleanup(tmp: DeliveryFiles) -> None:
    """Remove an aborted delivery's files unless another owner is still at it (a worker)."""
    run_owned(tmp, _nothing)


def _nothing() -> None:
    pass


def abort(tmp: DeliveryFiles, *, keep_published: bool) -> Owner:
    """Mark *tmp* aborted (on the loop) and return who cleans it up (never blocks).

    ``Owner.CLEANUP``: the caller must spawn :func:`cleanup`. ``Owner.WORKER``: the worker
    in a call cleans up when it returns. ``Owner.CLEANED``: nothing (left) to do.
    """
    with tmp.lock:
        if not tmp.aborted:  # the first reason stands (a failed step removes its link)
            tmp.aborted, tmp.keep_published = True, keep_published
        now = owner(tmp)
        then = abort_owner(now, opened=bool(tmp.dir_fds))
        if now is Owner.CALLER and then is Owner.CLEANED:
            tmp.cleaned = True
        return then


def begin(tmp: DeliveryFiles) -> None:
    """Make the calling step the owner of *tmp*'s files; raise ``Aborted`` once aborted."""
    with tmp.lock:
        if tmp.aborted:
            raise Aborted
        tmp.running = True


class Step:
    """``fn(*args)`` wrapped for a worker: it owns *tmp* during the call, is refused once
    the delivery was aborted, and cleans up after a failure. A backend that runs the
    engine's own steps itself (io_uring) reads *fn* and *args* to recognise them."""

    __slots__ = ("args", "fn", "tmp")

    def __init__(self, tmp: DeliveryFiles, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.tmp, self.fn, self.args = tmp, fn, args

    def __call__(self) -> Any:
        begin(self.tmp)
        ok = False
        try:
            result = self.fn(*self.args)
            ok = True
            return result
        finally:
            hand_back(self.tmp, failed=not ok)


def as_step(tmp: DeliveryFiles, fn: Callable[..., T], *args: Any) -> Callable[[], T]:
    """Wrap ``fn(*args)`` for a worker (see :class:`Step`)."""
    return Step(tmp, fn, args)
