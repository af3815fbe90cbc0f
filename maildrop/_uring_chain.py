"""One chain of ops in maildrop's io_uring driver (``_uring``): its results, its quiet ops
and the results a fault hook injects.

A chain is *linked* (``IOSQE_IO_LINK`` between its ops: each runs after the one before it
succeeded) or not (its ops are independent and its callback waits for all of them).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import weakref
from collections.abc import Callable

from . import _uring_abi as abi
from ._uring_hooks import Hooks
from ._uring_ops import Op, nop, shorten

__all__ = ["Chain", "Done"]

Done = Callable[[list[int]], None]
_log = logging.getLogger("maildrop")
_NOP = nop()


class Chain:
    """The ops of one chain, their completion ids and results, and its callback."""

    __slots__ = (
        "count",
        "done",
        "injected",
        "left",
        "linked",
        "next",
        "ops",
        "quiet",
        "reported",
        "results",
        "start",
        "uds",
    )

    def __init__(self, ops: list[Op], done: Done, linked: bool) -> None:
        n = self.count = len(ops)
        self.ops, self.done, self.linked = ops, done, linked
        #: Ops of an unlinked chain not completed yet.
        self.left = n
        self.results: list[int] = [-errno.ECANCELED] * n
        self.reported = [False] * n
        self.quiet = [False] * n  # IOSQE_CQE_SKIP_SUCCESS: no completion on success
        self.uds = [0] * n
        self.injected: dict[int, int] | None = None
        # The first op of the part in the kernel, and the first not yet written to the queue.
        self.start = self.next = 0

    def failed(
        self, exc: Exception, loop_ref: weakref.ref[asyncio.AbstractEventLoop] | None
    ) -> None:
        """Report *exc*, raised by the callback, to the exception handler of the loop
        *loop_ref* names (or log it): a bug there must not strand the completions after it."""
        context = {"message": "an io_uring completion callback failed", "exception": exc}
        loop = None if loop_ref is None else loop_ref()
        if loop is not None and not loop.is_closed():
            loop.call_exception_handler(context)
        else:
            _log.error(context["message"], exc_info=exc)

    def inject(self, i: int, op: Op, hooks: Hooks) -> Op:
        """Ask *hooks* about op *i* before it is written; return the op to write in its place.

        A shorter length for a write really shortens it (the kernel severs the chain
        itself); an injected result replaces the op's completion, and a failure does nothing
        (a nop is written), except a close, which runs: Linux frees the fd even when close
        fails.
        """
        injected = hooks.before_submit(op)
        if injected is not None and 0 <= injected < op.expect:
            shorten(op, injected)
        elif injected is not None:
            if self.injected is None:
                self.injected = {}
            self.injected[i] = injected
            if injected < 0 and op.opcode != abi.OP_CLOSE:
                return _NOP
        return op

    def settle(self, stop: int) -> list[int]:
        """End the part in the kernel at op *stop*: give each op that reported nothing its
        result (a quiet op before *stop* succeeded, one after it was silenced by the kernel's
        cancel) and return their indices."""
        silent = []
        for j in range(self.start, self.next):
            if not self.reported[j]:
                success = self.ops[j].success
                self.results[j] = success if j < stop and success is not None else -errno.ECANCELED
                silent.append(j)
        return silent
