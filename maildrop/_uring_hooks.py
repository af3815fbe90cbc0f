"""Trace and fault hooks for maildrop's io_uring driver (used by the crash and fault suites).

strace cannot see io_uring operations, so the driver reports every op itself: a hook sees each
op just before its entry is written to the submission queue (``before_submit``, which may stop
the process there or name a result to inject) and each completion after it is reaped
(``after_reap``, in completion order, with the result the caller will see).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from typing import NamedTuple, Protocol

from ._uring_ops import Op

__all__ = ["Hooks", "Script", "TraceEntry", "kill_self"]


class Hooks(Protocol):
    """What the driver calls around every op."""

    def before_submit(self, op: Op) -> int | None:
        """Run before *op* is queued to the kernel; return a result to inject, or None."""

    def after_reap(self, op: Op, result: int) -> None:
        """Run after *op*'s completion is reaped, with the result its caller will see."""


class TraceEntry(NamedTuple):
    """One completed op: its submission number, its name and its result."""

    seq: int
    name: str
    result: int


def kill_self(op: Op) -> None:  # pragma: no cover - the process it runs in dies
    """Kill this process with SIGKILL (the crash suite's stop: no cleanup runs)."""
    os.kill(os.getpid(), signal.SIGKILL)


class Script:
    """Record every op with its result, inject results and stop at chosen ops.

    Ops are numbered from 0 in the order their entries are written. ``inject`` maps an op's
    number to the result it reports instead of the kernel's: a negative errno (``-ENOSPC``,
    ``-EDQUOT``, ``-EIO``, ``-EROFS``: the op does not run, a nop takes its place, except a
    close, which runs: Linux frees the fd even when close fails) or, for a write or writev,
    a shorter length (the driver then really writes that many bytes). An injected failure
    ends the chain where the kernel would: a failed fsync, linkat, unlinkat, renameat2 or
    statx does not sever it, anything else does.
    ``stop_before`` calls *on_stop* before that op is submitted (the ops before it in its
    chain have completed: with hooks, the driver submits a chain one op at a time and applies
    the kernel's severing rules itself), ``stop_after`` after its completion is reaped.
    """

    def __init__(
        self,
        *,
        inject: Mapping[int, int] | None = None,
        stop_before: int | None = None,
        stop_after: int | None = None,
        on_stop: Callable[[Op], None] = kill_self,
    ) -> None:
        self.inject = dict(inject or {})
        self.stop_before = stop_before
        self.stop_after = stop_after
        self.on_stop = on_stop
        self.trace: list[TraceEntry] = []

    def before_submit(self, op: Op) -> int | None:
        """Stop here if asked; return the result to inject for this op, if any."""
        if op.seq == self.stop_before:
            self.on_stop(op)
        return self.inject.get(op.seq)

    def after_reap(self, op: Op, result: int) -> None:
        """Record the op and its result; stop here if asked."""
        self.trace.append(TraceEntry(op.seq, op.name, result))
        if op.seq == self.stop_after:
            self.on_stop(op)
