"""The syscall table that routes the engine's steps through a task's Twisted-style hooks.

Twisted's task calls ``osopen(path, flags, mode)``, ``oswrite(fd, data)``, ``osclose(fd)``
and ``osrename(src, dst)`` with full paths; subclasses override them (Twisted's own tests
fail them on cue). The engine instead works relative to directory fds and publishes with
``link()``. This table keeps the engine's way for every hook left at its ``os`` default and
calls an overridden hook with the original arguments. The engine runs the table in its
worker threads, so hooks do too.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Protocol

from maildrop import Syscalls

__all__ = ["PathT", "hook_table", "join"]

PathT = str | bytes | os.PathLike[str]


class _Mailbox(Protocol):
    @property
    def path(self) -> PathT: ...


class _Hooked(Protocol):
    """What the table needs of a task: its mailbox, hooks, base table and two attributes."""

    mbox: _Mailbox
    syscalls: Syscalls
    tmpname: str | bytes | None
    fh: int

    def osopen(self, path: Any, flags: int, mode: int) -> int: ...
    def oswrite(self, fd: int, data: bytes) -> int: ...
    def osclose(self, fd: int) -> None: ...
    def osrename(self, src: Any, dst: Any) -> None: ...


def join(base: PathT, sub: str, name: str) -> str | bytes:
    """Return *base*/*sub*/*name*, typed like *base* (hooks and ``mbox.list`` get that type)."""
    if isinstance(base, bytes):
        return os.path.join(base, sub.encode(), os.fsencode(name))
    return os.path.join(os.fspath(base), sub, name)


def _no_link(*args: Any, **kwargs: Any) -> None:
    # EOPNOTSUPP makes the engine publish with an existence check + rename (its path for
    # filesystems without hard links): that rename is what an overridden osrename() gets.
    raise OSError(errno.EOPNOTSUPP, "compat: publishing through osrename()")


def hook_table(task: _Hooked) -> Syscalls:
    """Return ``task.syscalls`` with the tmp-file steps routed through *task*'s hooks.

    The tmp file's open always goes through here, to record ``task.tmpname``/``task.fh``.
    """
    base = task.syscalls
    path = task.mbox.path
    osopen = None if task.osopen is os.open else task.osopen
    oswrite = None if task.oswrite is os.write else task.oswrite
    osclose = None if task.osclose is os.close else task.osclose
    osrename = None if task.osrename is os.rename else task.osrename

    def open_(name: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if not flags & os.O_CREAT:  # a directory: always the engine's way
            return base.open(name, flags, mode, dir_fd=dir_fd)
        full = join(path, "tmp", name)
        if osopen is not None:
            fd = osopen(full, flags, mode)
        else:
            fd = base.open(name, flags, mode, dir_fd=dir_fd)
        task.tmpname, task.fh = full, fd
        return fd

    changes: dict[str, Any] = {"open": open_}
    if oswrite is not None:
        write_hook = oswrite

        def write_(fd: int, data: bytes | bytearray | memoryview) -> int:
            n = write_hook(fd, bytes(data))
            # Twisted ignored the result; a hook that returns None wrote everything.
            return len(data) if n is None else int(n)

        changes["write"] = write_
        # One buffer per call: a short writev, which the engine continues.
        changes["writev"] = lambda fd, bufs: write_(fd, bufs[0])
    if osclose is not None:
        changes["close"] = osclose
    if osrename is not None:
        rename_hook = osrename

        def rename_(src: str, dst: str, **_dir_fds: Any) -> None:
            rename_hook(join(path, "tmp", src), join(path, "new", dst))

        changes["link"] = _no_link
        changes["rename"] = rename_
    return base.replace(**changes)
