"""Maildir++ quota enforcement on disk: read, recalculate and append to ``maildirsize``.

Runs in worker threads (``QuotaGuard.absent`` aside). The rules are Courier's (``_quota``);
this adds an in-process ledger per maildir so that concurrent deliveries of this process
never pass the quota together: each reserves what it has written so far, a check counts the
usage on disk plus every other reservation, and the link that publishes a message, the line
appended for it and every recalculation happen under one lock. So a recalculation never
sees a message linked but not yet appended (it would count it twice). Other processes are
only as exact as the spec allows (a few messages over).

A failed append after a successful link is ignored: the message is delivered, and the next
recalculation corrects the totals. A message removed again after its line was appended (a
close error after the link) stays counted until then; that errs towards refusing.
"""

from __future__ import annotations

import _thread
import contextlib
import errno
import os
import stat
import time

from ._errors import QuotaExceededError, UnusableQuotaFile
from ._quota import (
    MAX_FILE,
    RECALC_AGE,
    Quota,
    QuotaFile,
    counts_toward_quota,
    folder_entries,
    format_delta,
    format_maildirsize,
    over_quota,
    parse_maildirsize,
    size_from_name,
)
from ._record import record
from ._sys import Syscalls
from ._writer import DIR_FLAGS, FILE_FLAGS, LIVE_TMP, DeliveryFiles, Settings, new_name, write_all

__all__ = ["QuotaGuard", "UnusableQuotaFile", "recalculate"]

_TRASH = ".Trash"
_RECALC_TRIES = 3
NAME = "maildirsize"


class _Ledger:
    def __init__(self) -> None:
        self.io = _thread.allocate_lock()  # maildirsize reads, recalculations, links + appends
        self.counts = _thread.allocate_lock()  # the reservations (never held during I/O)
        self.pending_bytes = 0
        self.pending_messages = 0


_ledgers: dict[str, _Ledger] = {}
_ledgers_lock = _thread.allocate_lock()


def _ledger(root: str) -> _Ledger:
    with _ledgers_lock:
        if root not in _ledgers:
            _ledgers[root] = _Ledger()
        return _ledgers[root]


@record(frozen=True, slots=True)
class _Read:
    info: QuotaFile
    size: int
    mtime: float


# maildirsize is a file of the mailbox owner's, not one maildrop created: never block in
# open() (a FIFO), never follow a symlink, never write through a hard link to another file.
_OPEN_FLAGS = os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_file(sys: Syscalls, settings: Settings, root_fd: int, flags: int) -> int | None:
    """Open maildirsize with *flags* if it is a regular file with one link; None if missing."""
    try:
        fd = sys.open(NAME, flags | _OPEN_FLAGS, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnusableQuotaFile(settings.root, "a symbolic link", errno.ELOOP) from None
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO without reader, a directory
            raise UnusableQuotaFile(settings.root, "a FIFO or a directory") from None
        raise
    try:
        st = sys.stat(fd)
    except BaseException:
        sys.close(fd)
        raise
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return fd
    sys.close(fd)
    what = "hard-linked elsewhere" if stat.S_ISREG(st.st_mode) else "a FIFO, device or directory"
    raise UnusableQuotaFile(settings.root, what)


def _read(sys: Syscalls, settings: Settings, root_fd: int) -> _Read | None:
    fd = _open_file(sys, settings, root_fd, os.O_RDONLY)
    if fd is None:
        return None
    try:
        parts: list[bytes] = []
        got = 0
        while got < MAX_FILE:
            data = sys.read(fd, MAX_FILE - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        st = sys.stat(fd)
    finally:
        sys.close(fd)
    return _Read(parse_maildirsize(b"".join(parts)), got, st.st_mtime)


def _open_dir(sys: Syscalls, name: str, dir_fd: int) -> int | None:
    try:
        return sys.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def _folders(sys: Syscalls, root_fd: int) -> list[str]:
    return [n for n in folder_entries(sys.listdir(root_fd)) if n != _TRASH]


def _scan(sys: Syscalls, root_fd: int, *, count: bool) -> tuple[int, int, int]:
    """Return (latest mtime of any new/ or cur/, bytes, messages) of the whole maildir++."""
    latest = total = messages = 0
    folder_fds: list[int] = []
    try:
        for name in _folders(sys, root_fd):
            fd = _open_dir(sys, name, root_fd)
            if fd is not None:
                folder_fds.append(fd)
        for top in (root_fd, *folder_fds):
            for sub in ("new", "cur"):
                fd = _open_dir(sys, sub, top)
                if fd is None:
                    continue
                try:
                    latest = max(latest, sys.stat(fd).st_mtime_ns)
                    if not count:
                        continue
                    for entry in sys.listdir(fd):
                        if not counts_toward_quota(entry):
                            continue
                        size = size_from_name(entry)
                        if size is None:
                            try:
                                size = sys.stat(entry, dir_fd=fd, follow_symlinks=False).st_size
                            except FileNotFoundError:
                                continue  # moved or removed meanwhile
                        total += size
                        messages += 1
                finally:
                    sys.close_dir(fd)
    finally:
        for fd in folder_fds:
            sys.close_dir(fd)
    return latest, total, messages


def _replace_file(
    settings: Settings, root_fd: int, content: bytes, owner: tuple[int, int] | None
) -> None:
    """Write *content* as the new maildirsize: in tmp/, fsynced, renamed, dir fsynced.

    *owner* (uid, gid) gets the file through its fd before it is renamed into place: a
    chown by name afterwards could be made to hit another file linked there meanwhile."""
    sys = settings.syscalls
    tmp_fd = sys.open("tmp", DIR_FLAGS, dir_fd=root_fd)
    name = new_name() + "_maildirsize"
    LIVE_TMP.add(name)
    try:
        fd = sys.open(name, FILE_FLAGS, 0o600, dir_fd=tmp_fd)
        try:
            try:
                write_all(sys, fd, [content])
                if owner is not None:
                    sys.fchown(fd, *owner)
                if settings.fsync:
                    sys.fsync(fd)
            finally:
                sys.close(fd)
            sys.rename(name, NAME, src_dir_fd=tmp_fd, dst_dir_fd=root_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                sys.unlink(name, dir_fd=tmp_fd)
            raise
        if settings.fsync:
            sys.fsync_dir(root_fd)
    finally:
        LIVE_TMP.discard(name)
        sys.close_dir(tmp_fd)


def recalculate(
    settings: Settings,
    root_fd: int,
    limit_bytes: int | None,
    limit_messages: int | None,
    owner: tuple[int, int] | None = None,
) -> QuotaFile:
    """Count the maildir++ and write a fresh ``maildirsize``; return what it says.

    As the spec asks, the new/ and cur/ directories are stat'ed again after the rename; if
    one changed meanwhile the count is repeated (up to 3 times, then the last count stays:
    removing the file, the spec's other option, would drop limits that only it records).
    """
    sys = settings.syscalls
    for _ in range(_RECALC_TRIES):
        latest, total, messages = _scan(sys, root_fd, count=True)
        content = format_maildirsize(limit_bytes, limit_messages, total, messages)
        _replace_file(settings, root_fd, content, owner)
        if _scan(sys, root_fd, count=False)[0] <= latest:
            break
    return QuotaFile(limit_bytes, limit_messages, total, messages, 1)


def _fill(used: int, limit: int, unit: str) -> str:  # "18000 of 20000 bytes (90%)"
    return f"{used} of {limit} {unit} ({used * 100 // limit}%)"


class QuotaGuard:
    """One delivery's quota: its checks while streaming and its line after the link.

    ``check()`` runs in the worker before each batch is written; the guard is also the
    ``DeliveryFiles.ledger_lock`` around the link; ``release()`` drops the reservation of a
    delivery that did not publish (callable from the event loop: no I/O, no long lock).
    """

    def __init__(self, quota: Quota, settings: Settings) -> None:
        self.quota = quota
        self.settings = settings
        self.ledger = _ledger(settings.root)
        self.tmp: DeliveryFiles | None = None
        self.active = True
        self.reserved_bytes = self.reserved_messages = 0
        self.closed = False
        self._locked = False
        self._probed = False

    def absent(self) -> bool:
        """Whether the guard keeps no quota: its limits would come from a missing
        ``maildirsize`` (it then turns itself off, as its first check would). One ``lstat``
        on the calling thread (the loop's, for io_uring), once per guard."""
        if self._probed or not (self.active and self.quota.from_file):
            return not self.active
        self._probed = True
        name = os.path.join(self.settings.root, NAME)
        try:
            self.settings.syscalls.stat(name, follow_symlinks=False)
        except FileNotFoundError:
            self.active = False  # one made after this counts from the next delivery on
        except OSError:
            pass  # unreadable, not a directory...: the check in a worker says why
        return not self.active

    def check(self, root_fd: int, size: int) -> None:
        """Raise :class:`QuotaExceededError` if a message of *size* bytes does not fit."""
        if not self.active:
            return
        with self.ledger.io:
            self._check(root_fd, size)

    def _limits(self, info: QuotaFile | None) -> tuple[int | None, int | None]:
        if self.quota.from_file:
            assert info is not None
            return info.limit_bytes, info.limit_messages
        return self.quota.bytes, self.quota.messages

    def _check(self, root_fd: int, size: int) -> None:
        sys = self.settings.syscalls
        try:
            read = _read(sys, self.settings, root_fd)
        except UnusableQuotaFile:
            if self.quota.from_file:
                raise  # its limits are only in that file: a temporary error until fixed
            read = None  # the limits are in code: a fresh file replaces the bad one
        if read is None and self.quota.from_file:
            self.active = False  # no maildirsize and no limits in code: no quota
            return
        info = None if read is None else read.info
        limits = self._limits(info)
        if (
            read is None
            or info is None
            or read.size >= MAX_FILE
            or info.malformed
            or info.used_bytes < 0
            or info.used_messages < 0
            or (info.limit_bytes, info.limit_messages) != limits
        ):
            info = self._recalculate(root_fd, limits)
            read = None
        if self._over(info, size):
            if read is None or not (read.info.lines > 1 or time.time() - read.mtime >= RECALC_AGE):
                self._refuse(info, size)
            info = self._recalculate(root_fd, limits)
            if self._over(info, size):
                self._refuse(info, size)
        with self.ledger.counts:
            if self.closed:
                return  # released meanwhile (a cancelled delivery): reserve nothing
            led = self.ledger
            led.pending_bytes += size - self.reserved_bytes
            led.pending_messages += 1 - self.reserved_messages
            self.reserved_bytes, self.reserved_messages = size, 1

    def _recalculate(self, root_fd: int, limits: tuple[int | None, int | None]) -> QuotaFile:
        # Written by root into a user's maildir, the file is the user's: their IMAP server
        # (Dovecot's quota) reads and rewrites it.
        owner = None if self.tmp is None else self.tmp.owner
        return recalculate(self.settings, root_fd, *limits, owner)

    def _others(self) -> tuple[int, int]:
        with self.ledger.counts:
            led = self.ledger
            return (
                led.pending_bytes - self.reserved_bytes,
                led.pending_messages - self.reserved_messages,
            )

    def _over(self, info: QuotaFile, size: int) -> bool:
        other_bytes, other_messages = self._others()
        return over_quota(
            info.limit_bytes,
            info.limit_messages,
            info.used_bytes + other_bytes + size,
            info.used_messages + other_messages + 1,
        )

    def _refuse(self, info: QuotaFile, size: int) -> None:
        other_bytes, other_messages = self._others()
        used_b, used_m = info.used_bytes + other_bytes, info.used_messages + other_messages
        limits = []
        if info.limit_bytes is not None:
            limits.append(_fill(used_b, info.limit_bytes, "bytes"))
        if info.limit_messages is not None:
            limits.append(_fill(used_m, info.limit_messages, "messages"))
        raise QuotaExceededError(
            f"mailbox {self.settings.root!r} is over quota: {' and '.join(limits)} used; this "
            f"message needs at least {size} bytes more (the owner must free space, or the "
            "quota be raised)",
            permanent=self.quota.permanent,
        )

    def release(self) -> None:
        """Drop this delivery's reservation for good (it did not publish)."""
        with self.ledger.counts:
            self.closed = True
            self.ledger.pending_bytes -= self.reserved_bytes
            self.ledger.pending_messages -= self.reserved_messages
            self.reserved_bytes = self.reserved_messages = 0

    # -- around the link (DeliveryFiles.ledger_lock) ------------------------------------

    def __enter__(self) -> None:
        if self.active:
            self.ledger.io.acquire()
            self._locked = True

    def __exit__(self, *exc_info: object) -> None:
        if not self._locked:
            return
        try:
            if exc_info[0] is None and self.tmp is not None:  # linked
                self.append(self.tmp.root_fd, self.tmp.size)
                self.release()  # the line now counts the message
        finally:
            self._locked = False
            self.ledger.io.release()

    def append(self, root_fd: int, size: int) -> None:
        """Append the line for one delivered message of *size* bytes (errors ignored)."""
        sys = self.settings.syscalls
        try:
            fd = _open_file(sys, self.settings, root_fd, os.O_WRONLY | os.O_APPEND)
        except OSError:
            return  # replaced by something unusable: the next check recalculates
        if fd is None:
            return  # removed by a racing recalculation: it will have counted us
        try:
            sys.write(fd, format_delta(size, 1))  # one write: O_APPEND keeps lines whole
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sys.close(fd)
