"""The syscall table: every ``os`` call of the delivery path, as plain functions.

The engine only ever calls the disk through a :class:`Syscalls` table. The default table is
the ``os`` module itself; tests pass a table whose entries fail on cue, and ``compat`` passes
one that routes through Twisted-style ``osopen``/``oswrite``/``osclose``/``osrename`` hooks.
Each entry has the signature of the ``os`` function it replaces.
"""

from __future__ import annotations

import os

from ._record import record, replace

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

__all__ = ["DEFAULT_SYSCALLS", "Syscalls", "stat_or_none"]

_Buffer = bytes | bytearray | memoryview


def _copy_file_range(src: int, dst: int, count: int, offset_src: int | None) -> int:
    return os.copy_file_range(src, dst, count, offset_src)


@record(frozen=True, slots=True)
class Syscalls:
    """A table of the blocking calls the engine makes, one field per step.

    Every field takes the arguments of its ``os`` namesake (``open(path, flags, mode, *,
    dir_fd)``, ``link(src, dst, *, src_dir_fd, dst_dir_fd, follow_symlinks)``, ...).
    ``fsync``/``close`` are used for the message file and ``fsync_dir``/``close_dir`` for
    directories, so a test (or a hook) can target one without the other. Use
    :meth:`replace` to derive a table with some entries swapped.
    """

    open: Callable[..., int] = os.open
    write: Callable[[int, _Buffer], int] = os.write
    writev: Callable[[int, Sequence[_Buffer]], int] = os.writev
    fsync: Callable[[int], None] = os.fsync
    fsync_dir: Callable[[int], None] = os.fsync
    close: Callable[[int], None] = os.close
    close_dir: Callable[[int], None] = os.close
    link: Callable[..., None] = os.link
    rename: Callable[..., None] = os.rename
    unlink: Callable[..., None] = os.unlink
    mkdir: Callable[..., None] = os.mkdir
    stat: Callable[..., os.stat_result] = os.stat
    copy_file_range: Callable[[int, int, int, int | None], int] = _copy_file_range
    #: ``os.fstat`` of the destination directory after its fsync (see ``DeliveryFiles.sync_dest``).
    fstat: Callable[[int], os.stat_result] = os.fstat
    read: Callable[[int, int], bytes] = os.read
    listdir: Callable[[int], list[str]] = os.listdir
    #: Give a file maildrop created to the maildir's owner (only when running as root).
    fchown: Callable[[int, int, int], None] = os.fchown
    #: Give a directory maildrop created to the maildir's owner (only when running as root).
    chown: Callable[..., None] = os.chown

    def replace(self, **changes: Any) -> Syscalls:
        """Return a copy of this table with the named entries replaced."""
        unknown = set(changes).difference(self.__match_args__)
        if unknown:
            raise TypeError(f"Syscalls has no entry {min(unknown)!r}")
        return replace(self, **changes)


#: The table every :class:`~maildrop.Maildir` uses unless given another.
DEFAULT_SYSCALLS = Syscalls()


def stat_or_none(
    sys: Syscalls, path: str, *, follow_symlinks: bool = True
) -> os.stat_result | None:
    """Return *path*'s ``stat`` through the table *sys*, or None where that fails (what
    ``os.path.exists``/``isdir`` treat as "not there")."""
    try:
        return sys.stat(path, follow_symlinks=follow_symlinks)
    except (OSError, ValueError):
        return None
