"""The syscall table that routes the engine's steps through a task's Twisted-style hooks.

Twisted's task calls ``osopen(path, flags, mode)``, ``oswrite(fd, data)``, ``osclose(fd)``
and ``osrename(src, dst)`` with full paths; subclasses override them (Twisted's own tests
fail them on cue). The engine instead works relative to directory fds and publishes with
``link()``. This table keeps the engine's way for every hook left at its ``os`` default and
calls an overridden hook with the original arguments. The engine runs the table in its
worker threads, so hooks do too.

A task that overrides no hook gets a table shared by every such task on the same base table
(it only records ``tmpname``/``fh``, for the task found through :func:`bind`), and a
:class:`~maildrop.Maildir` shared by every such task on the same absolute path: built per
message they are a large part of a small delivery's time on the loop, and a per-task
closure makes its task a reference cycle, left for the garbage collector.
"""

from __future__ import annotations

import errno
import os
from contextvars import ContextVar, Token
from typing import Any, Protocol

from maildrop import Maildir, Syscalls

__all__ = ["PathT", "bind", "hook_table", "join", "maildir_for", "unbind"]

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
    # os.path.join's result for these arguments, without its generality (once per message).
    if isinstance(base, bytes):
        cut = b"" if not base or base.endswith(b"/") else b"/"
        return b"%s%s%s/%s" % (base, cut, sub.encode(), os.fsencode(name))
    base = os.fspath(base)
    return f"{base}{'' if not base or base.endswith('/') else '/'}{sub}/{name}"


def _no_link(*args: Any, **kwargs: Any) -> None:
    # EOPNOTSUPP makes the engine publish with an existence check + rename (its path for
    # filesystems without hard links): that rename is what an overridden osrename() gets.
    raise OSError(errno.EOPNOTSUPP, "compat: publishing through osrename()")


#: The task whose steps run in this context. Its pump sets it; the engine runs every step in
#: a copy of its caller's contextvars, so a shared table's open finds it in the worker.
_CURRENT: ContextVar[_Hooked | None] = ContextVar("compat_task", default=None)
#: Shared tables by ``id()`` of their base table (which the entry keeps alive), and the
#: maildirs of shared tables by (path, ``id()`` of the table); both dropped whole when full
#: (a process uses a few).
_SHARED: dict[int, tuple[Syscalls, Syscalls]] = {}
_MAILDIRS: dict[tuple[str | bytes, int], tuple[Syscalls, Maildir]] = {}
_MAX_SHARED = 64


def bind(task: _Hooked) -> Token[_Hooked | None]:
    """Make *task* the one a shared table records the tmp file for (in its pump's context);
    undo it with :func:`unbind` before anything runs user code from that context."""
    return _CURRENT.set(task)


def unbind(token: Token[_Hooked | None]) -> None:
    """Undo :func:`bind`: callbacks scheduled from the context must not keep the task alive."""
    _CURRENT.reset(token)


def maildir_for(path: PathT, table: Syscalls) -> Maildir:
    """Return a ``Maildir`` of *path* delivering through *table*: one shared by every task
    on a shared table and the same absolute path (a relative one follows the current
    directory, and a table of hooks is one task's: those are built anew)."""
    key = path if isinstance(path, str | bytes) else os.fspath(path)
    entry = _MAILDIRS.get((key, id(table)))
    if entry is not None and entry[0] is table:
        return entry[1]
    md = Maildir(os.fsdecode(key) if isinstance(key, bytes) else key, syscalls=table)
    if os.path.isabs(key) and any(t is table for _, t in _SHARED.values()):
        if len(_MAILDIRS) >= _MAX_SHARED:
            _MAILDIRS.clear()
        _MAILDIRS[key, id(table)] = (table, md)
    return md


def _shared_table(base: Syscalls) -> Syscalls:
    """Return the table of tasks that override no hook: *base*, recording the tmp file."""
    entry = _SHARED.get(id(base))
    if entry is not None and entry[0] is base:
        return entry[1]

    def open_(name: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        fd = base.open(name, flags, mode, dir_fd=dir_fd)
        task = _CURRENT.get() if flags & os.O_CREAT else None
        if task is not None:
            task.tmpname, task.fh = join(task.mbox.path, "tmp", name), fd
        return fd

    table = base.replace(open=open_)
    if len(_SHARED) >= _MAX_SHARED:
        _SHARED.clear()
        _MAILDIRS.clear()
    _SHARED[id(base)] = (base, table)
    return table


def hook_table(task: _Hooked) -> Syscalls:
    """Return ``task.syscalls`` with the tmp-file steps routed through *task*'s hooks.

    The tmp file's open always goes through here, to record ``task.tmpname``/``task.fh``
    (through :func:`bind` when the task overrides no hook).
    """
    base = task.syscalls
    path = task.mbox.path
    osopen = None if task.osopen is os.open else task.osopen
    oswrite = None if task.oswrite is os.write else task.oswrite
    osclose = None if task.osclose is os.close else task.osclose
    osrename = None if task.osrename is os.rename else task.osrename
    if osopen is None and oswrite is None and osclose is None and osrename is None:
        return _shared_table(base)

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
