"""The io_uring driver's hooks as the crash suite uses them (no pytest: child.py imports it).

:class:`Recorder` is a ``maildrop._uring_hooks.Hooks``: it turns every op the driver submits
and reaps into the events of ``_oporder`` (and takes the caller's acks), and it can stop the
process or inject a result at the Nth op through a ``Script``. :func:`install` makes every
ring opened from now on in this process carry it, whatever opens the ring (the backend
opens its own).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

from maildrop import _uring
from maildrop import _uring_abi as abi
from maildrop._uring_hooks import Script
from maildrop._uring_ops import Op

try:  # a module of the tests.crash package under pytest, a plain module in child.py
    from ._oporder import Ack, Checker, Event, Reap, Step, Submit
except ImportError:
    from _oporder import Ack, Checker, Event, Reap, Step, Submit  # type: ignore[no-redef]

__all__ = ["Recorder", "install", "step_of"]

_KINDS = {
    abi.OP_OPENAT: "open",
    abi.OP_OPENAT2: "open",
    abi.OP_WRITE: "write",
    abi.OP_WRITEV: "write",
    abi.OP_FSYNC: "fsync",
    abi.OP_LINKAT: "link",
    abi.OP_RENAMEAT: "rename",
    abi.OP_UNLINKAT: "unlink",
    abi.OP_CLOSE: "close",
}


def _path(op: Op, i: int = 0) -> bytes:
    raw = op.keep[i]
    assert isinstance(raw, bytes)
    return raw


def step_of(op: Op) -> Step:
    """Describe *op* for the order checker."""
    kind = _KINDS.get(op.opcode, "other")
    handle = f"s{op.fd}" if op.fixed else f"f{op.fd}"
    if kind == "open":
        slot = f"s{op.file_index - 1}" if op.file_index else None
        flags = op.op_flags
        if op.opcode == abi.OP_OPENAT2:
            how = op.keep[1]
            assert isinstance(how, ctypes.Array)
            flags = abi.OPEN_HOW.unpack(bytes(how))[0]
        return Step(kind if flags & os.O_CREAT else "dir", slot, (op.fd, _path(op)))
    if kind == "write":
        offset = op.addr2 if op.addr2 < 1 << 63 else -1
        sync = bool(op.op_flags & abi.RWF_SYNC)
        return Step(kind, handle, offset=offset, length=op.expect, sync=sync)
    if kind in ("link", "rename"):
        return Step(kind, None, (op.fd, _path(op)), (op.length, _path(op, 1)))
    if kind == "unlink":
        return Step(kind, None, (op.fd, _path(op)))
    if kind == "close":
        return Step(kind, f"s{op.file_index - 1}" if op.file_index else handle)
    return Step(kind, handle)


class _Numbered(NamedTuple):
    """An op as the script sees it: numbered from the recorder's last :meth:`arm`."""

    seq: int
    name: str


class Recorder:
    """Record the driver's ops as order events; stop or inject through a ``Script``.

    The script numbers ops from 0 at the last :meth:`arm` (the ring's own numbers run on
    across deliveries and cases). *on_event*, if given, sees each event as it happens.
    """

    def __init__(
        self, script: Script | None = None, on_event: Callable[[Event], None] | None = None
    ) -> None:
        self.events: list[Event] = []
        self.checker = Checker()
        self._on_event = on_event
        self.arm(script or Script())

    def arm(self, script: Script) -> None:
        """Use *script* from the next op on, numbering ops from 0 again."""
        self.script = script
        self.ops = 0
        self._local: dict[int, int] = {}

    def _add(self, event: Event) -> None:
        self.events.append(event)
        self.checker.feed(event)
        if self._on_event is not None:
            self._on_event(event)

    def before_submit(self, op: Op) -> int | None:
        """Stop or pick an injection (the script), then record the submission."""
        n = self._local[op.seq] = self.ops
        self.ops += 1
        inject = self.script.before_submit(_Numbered(n, op.name))  # type: ignore[arg-type]
        self._add(Submit(op.seq, step_of(op)))
        return inject

    def after_reap(self, op: Op, result: int) -> None:
        """Record the completion (with the result the caller sees), then maybe stop."""
        self._add(Reap(op.seq, result))
        n = self._local.pop(op.seq, None)
        if n is not None:
            self.script.after_reap(_Numbered(n, op.name), result)  # type: ignore[arg-type]

    def ack(self, name: str) -> None:
        """Record that ``deliver()`` returned *name*."""
        self._add(Ack(name))


def install(recorder: Recorder) -> Callable[[], None]:
    """Give every ring opened from now on *recorder* as its hooks; return the undo."""
    real = _uring.Ring.open

    @functools.wraps(real)
    def opened(*args: Any, **kwargs: Any) -> _uring.Ring:
        ring = real(*args, **kwargs)
        ring.hooks = recorder
        return ring

    _uring.Ring.open = opened  # type: ignore[method-assign]

    def undo() -> None:
        _uring.Ring.open = real  # type: ignore[method-assign]

    return undo
