"""child.py's io_uring side: stop, cut the power, inject or attack at the Nth op of the ring.

A job with ``"backend": "uring"`` delivers through ``Maildir(..., backend="uring")`` and may
carry ``"uring": {...}`` with one of: ``stop_before`` / ``stop_after`` (SIGKILL before the
Nth op is submitted, or after its completion is reaped), ``cut_before`` (shut the filesystem
down before the Nth op and go on), ``inject`` (``{N: result}``: ``-errno`` or a short write
length), ``count`` (print ``OPS n`` at the end). ``hostile`` plays the attacker at the ops
instead of at the syscall table's steps. Ops are numbered from 0 in submission order.
"""

from __future__ import annotations

import os
from typing import Any

from _uring_trace import Recorder, install

from maildrop import _uring_abi as abi
from maildrop._uring_hooks import Script
from maildrop._uring_ops import Op

__all__ = ["Attacker", "setup"]


class Attacker(Recorder):
    """A recorder that plays a local attacker with write access to the maildir."""

    def __init__(self, script: Script, hostile: dict[str, Any]) -> None:
        super().__init__(script)
        self.hostile = hostile
        self.opens = self.links = 0
        self.tmp: tuple[bytes, int] | None = None  # the tmp file's name and its dir fd

    def before_submit(self, op: Op) -> int | None:
        """Plant names or swap the tmp file just before the engine's op reaches the kernel."""
        canary, h = self.hostile["canary_file"], self.hostile
        if op.opcode in (abi.OP_OPENAT, abi.OP_OPENAT2) and open_flags(op) & os.O_CREAT:
            self.opens += 1
            name = op.keep[0]
            assert isinstance(name, bytes)
            self.tmp = (name, op.fd)
            if h.get("plant_tmp") and self.opens == 1:
                os.symlink(canary, name, dir_fd=op.fd)
            elif h.get("plant_tmp") and self.opens == 2:
                os.link(canary, name, dst_dir_fd=op.fd)
        elif op.opcode in (abi.OP_LINKAT, abi.OP_RENAMEAT):
            self.links += 1
            dst = bytes(op.keep[1])  # type: ignore[call-overload]
            if h.get("plant_new") and self.links == 1:
                os.symlink(canary, dst, dir_fd=op.length)
            if h.get("swap") and self.links == 1 and self.tmp is not None:
                # Swap the file at its tmp name (the link may name it by /proc/self/fd).
                name, tmp_dir = self.tmp
                os.rename(name, name + b".moved", src_dir_fd=tmp_dir, dst_dir_fd=tmp_dir)
                if h["swap"] == "symlink":
                    os.symlink(canary, name, dir_fd=tmp_dir)
                else:
                    os.link(canary, name, dst_dir_fd=tmp_dir)
        return super().before_submit(op)


def open_flags(op: Op) -> int:
    """The open flags of an ``openat`` (in the entry) or ``openat2`` (in its ``open_how``)."""
    if op.opcode == abi.OP_OPENAT2:
        return int(abi.OPEN_HOW.unpack(bytes(op.keep[1]))[0])  # type: ignore[call-overload]
    return op.op_flags


def setup(cfg: dict[str, Any], shutdown: Any) -> Recorder:
    """Install the job's hooks on every ring this process opens; return the recorder."""
    u = cfg.get("uring") or {}
    script = Script(
        inject={int(k): v for k, v in u.get("inject", {}).items()},
        stop_before=u.get("stop_before"),
        stop_after=u.get("stop_after"),
    )
    if u.get("cut_before") is not None:
        script.stop_before = u["cut_before"]
        script.on_stop = lambda op: shutdown(cfg["mount"])
    hostile = cfg.get("hostile")
    rec = Attacker(script, hostile) if hostile else Recorder(script)
    install(rec)
    return rec
