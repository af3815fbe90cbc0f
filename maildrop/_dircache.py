"""Open maildir directories kept for the next delivery into the same maildir.

A delivery needs three directory fds (the maildir's root, ``tmp/`` and ``new/`` or ``cur/``);
opening them costs three opens, an fstat and three closes per message, each a syscall a
worker thread makes without the GIL and then waits to get back. A long-lived process (a
server, a fetcher) delivers into the same few maildirs over and over, so it keeps them:

- An entry is reused only while the maildir's path still names the directory it was opened
  from: one ``lstat`` of the path per delivery, compared by device and inode with the root
  it holds. A maildir moved, replaced or deleted is opened afresh, by the same rules as the
  first time (``O_NOFOLLOW``, creation, ownership).
- An entry is at most :data:`MAX_AGE` seconds old, so a ``tmp/`` or ``new/`` replaced inside
  the same root is picked up within that time; a delivery that fails or is aborted drops the
  entry it used (the next one opens the directories again).
- At most :data:`MAX_ENTRIES` entries (the least recently used goes first), fewer under a
  low ``RLIMIT_NOFILE``; the fds of a dropped entry are closed once no delivery uses them.
- Only while a server runs in this process (:func:`hold`: ``MaildirServer`` from its first
  listening socket to the end of its shutdown, which closes them all), so a library caller
  never finds a filesystem kept busy after ``deliver()`` returned; only with the default
  syscall table (a test's or a hook's table sees every open); and only for deliveries that
  ask (``DeliverySession``, one target; ``deliver_many`` bounds its own fds).
- A forked child forgets the parent's entries (and closes its copies of their fds).

Entries are shared between threads: a lock guards the table and each entry's use count.
"""

from __future__ import annotations

import _thread
import os
import time

from ._sys import DEFAULT_SYSCALLS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._dirs import Dirs

__all__ = [
    "MAX_AGE",
    "MAX_ENTRIES",
    "Entry",
    "forget_all",
    "give_back",
    "hold",
    "keep",
    "release",
    "reuse",
    "usable",
]

#: Seconds an entry may be reused after its directories were opened.
MAX_AGE = 1.0
#: Entries kept at most (three fds each).
MAX_ENTRIES = 64

_lock = _thread.allocate_lock()
_table: dict[tuple[str, str | None, str], Entry] = {}
_holders = 0  # servers running in this process


def hold() -> None:
    """Keep directories from now on (a server started; pair with :func:`release`)."""
    global _holders
    with _lock:
        _holders += 1


def release() -> None:
    """A server stopped; when none is left, close every directory kept."""
    global _holders
    with _lock:
        _holders = max(0, _holders - 1)
        if _holders:
            return
    forget_all()


def _limit() -> int:
    """Entries to keep: :data:`MAX_ENTRIES`, or fewer when the fd limit is low (a sixteenth
    of the soft ``RLIMIT_NOFILE`` in fds)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover - every Linux has it
        return MAX_ENTRIES
    if soft == resource.RLIM_INFINITY:
        return MAX_ENTRIES
    return max(0, min(MAX_ENTRIES, soft // 48))


class Entry:
    """The directory fds of one maildir (root, folder if any, tmp/, destination)."""

    __slots__ = (
        "dest_fd", "dev_ino", "dir_fds", "dropped", "key", "opened", "owner", "tmp_fd", "users"
    )  # fmt: skip

    def __init__(self, dirs: Dirs, dev_ino: tuple[int, int]) -> None:
        self.key = _key(dirs)
        self.dir_fds = tuple(dirs.dir_fds)
        self.tmp_fd = dirs.tmp_fd
        self.dest_fd = dirs.dest_fd
        self.owner = dirs.owner
        self.dev_ino = dev_ino
        self.opened = time.monotonic()
        self.users = 1
        self.dropped = False


def _key(dirs: Dirs) -> tuple[str, str | None, str]:
    cfg = dirs.settings
    return (cfg.root, cfg.folder, dirs.subdir)


def usable(dirs: Dirs) -> bool:
    """Whether *dirs* may take and leave its directories in the cache (a server runs)."""
    return _holders > 0 and dirs.sys is DEFAULT_SYSCALLS


def reuse(dirs: Dirs) -> Entry | None:
    """Return a live entry for *dirs*' maildir (counted as used), or None: open it yourself.

    Costs one ``lstat`` of the maildir's path when an entry exists.
    """
    if not usable(dirs):
        return None
    key = _key(dirs)
    with _lock:
        entry = _table.get(key)
        if entry is None:
            return None
        if time.monotonic() - entry.opened > MAX_AGE:
            _drop(entry)
            return None
        entry.users += 1
    try:
        st = dirs.sys.stat(dirs.settings.root, follow_symlinks=False)
        same = (st.st_dev, st.st_ino) == entry.dev_ino
    except OSError:
        same = False
    if not same:
        give_back(entry, drop=True)
        return None
    return entry


def keep(dirs: Dirs) -> Entry | None:
    """Keep the directories *dirs* just opened for the deliveries after it; return the
    entry (counted as used by *dirs*), or None when they cannot be kept."""
    if not usable(dirs) or not dirs.dir_fds:
        return None
    try:
        st = dirs.sys.fstat(dirs.dir_fds[0])
    except OSError:  # pragma: no cover - an fd we just opened
        return None
    entry = Entry(dirs, (st.st_dev, st.st_ino))
    limit = _limit()
    with _lock:
        if limit == 0:
            return None
        old = _table.get(entry.key)
        if old is not None:
            _drop(old)
        while len(_table) >= limit:
            _drop(next(iter(_table.values())))
        _table[entry.key] = entry
    return entry


def give_back(entry: Entry, *, drop: bool = False) -> None:
    """One delivery is done with *entry* (*drop*: it failed; nobody reuses the entry)."""
    with _lock:
        entry.users -= 1
        if drop and not entry.dropped:
            _drop(entry)  # closes the fds if this was the last user
            return
        close = entry.dropped and entry.users == 0
    if close:
        _close(entry)


def forget_all() -> None:
    """Drop every entry (closing the fds no delivery uses)."""
    with _lock:
        for entry in list(_table.values()):
            _drop(entry)


def _drop(entry: Entry) -> None:
    """Remove *entry* from the table (lock held); close its fds if nobody uses them."""
    if _table.get(entry.key) is entry:
        del _table[entry.key]
    entry.dropped = True
    if entry.users == 0:
        _close(entry)


def _close(entry: Entry) -> None:
    for fd in reversed(entry.dir_fds):
        try:  # noqa: SIM105 - contextlib costs start-up time
            DEFAULT_SYSCALLS.close_dir(fd)  # (only the default table's fds are kept)
        except OSError:
            pass
    entry.dir_fds = ()


def _after_fork() -> None:
    global _lock, _holders
    _lock = _thread.allocate_lock()
    _holders = 0  # the child's server, if it runs one, holds again
    for entry in _table.values():
        entry.users = 0
        _close(entry)
    _table.clear()


os.register_at_fork(after_in_child=_after_fork)
