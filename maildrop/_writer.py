"""The blocking half of a delivery: every step that runs in a worker thread.

Why the steps are ordered the way they are (the one long explanation of the engine):

* Directories are opened ``O_DIRECTORY|O_NOFOLLOW`` and every later call is relative to those
  fds, so a ``tmp/``, ``new/`` or folder replaced by a symlink is refused instead of followed
  (``O_NOFOLLOW`` on a path only guards its last component).
* The tmp file is created ``O_CREAT|O_EXCL|O_NOFOLLOW`` at 0600; ``O_EXCL`` never follows a
  planted symlink and never opens someone else's file.
* The data is fsynced before the file gets its name in ``new/``, so a crash can never leave a
  short or empty message there. An fsync error is final: after a failed fsync the kernel may
  have dropped the dirty pages, so retrying it would report success for lost data.
* Publishing uses ``link()``, which refuses an existing target, never ``rename()``, which
  silently replaces one. The link is made from ``/proc/self/fd/N`` (``linkat`` with
  ``AT_SYMLINK_FOLLOW``) so it publishes exactly the file this delivery wrote, even if someone
  swapped the name in ``tmp/``. The fd is closed only after the link; a close error still
  fails the delivery (and removes the link). Filesystems without hard links get a rename
  after an existence check: documented, and narrower than the stdlib's plain rename.
* ``new/`` is fsynced after the link; only then is the message durable. Callers share that
  fsync when several deliveries are in flight (group commit, see ``_session``).
* A :class:`TmpFile` is owned by at most one thread at a time. Whatever fails inside a worker
  call is cleaned up by that worker before the exception leaves it, so the event loop never
  unlinks a file that a still-running write or fsync is using.
"""

from __future__ import annotations

import _socket
import _thread
import contextlib
import errno
import os
import time

from ._errors import MaildirNotFoundError, NotAMaildirError
from ._naming import published_name, unique_name
from ._record import record
from ._sys import Syscalls

TYPE_CHECKING = False
if TYPE_CHECKING:
    import threading
    from collections.abc import Iterator, Sequence

__all__ = [
    "DIR_FLAGS",
    "FILE_FLAGS",
    "LIVE_TMP",
    "Aborted",
    "Layout",
    "TmpFile",
    "new_name",
    "write_all",
]

#: How every directory of a maildir is opened (a symlink is refused, not followed).
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: How every file maildrop creates is opened (never an existing file, never via a symlink).
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SUBDIRS = ("tmp", "new", "cur")
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
_PROC_FD = os.path.isdir("/proc/self/fd")
# link() errnos that mean "this filesystem has no hard links", not "this link failed".
_NO_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
_NAME_TRIES = 100

# Directories this process is creating, until their parent is fsynced (path -> creators).
_unsynced: dict[str, int] = {}
# Made on first use: importing threading would cost every `maildrop deliver` run.
_unsynced_cond: threading.Condition | None = None
_cond_lock = _thread.allocate_lock()


def _cond() -> threading.Condition:
    global _unsynced_cond
    with _cond_lock:
        if _unsynced_cond is None:
            import threading

            _unsynced_cond = threading.Condition()
        return _unsynced_cond


@contextlib.contextmanager
def _creating(*keys: str) -> Iterator[None]:
    """Mark *keys* as created-but-not-durable while the body makes them durable."""
    cond = _cond()
    with cond:
        for key in keys:
            _unsynced[key] = _unsynced.get(key, 0) + 1
    try:
        yield
    finally:
        with cond:
            for key in keys:
                if _unsynced[key] == 1:
                    del _unsynced[key]
                else:
                    _unsynced[key] -= 1
            cond.notify_all()


_counter_lock = _thread.allocate_lock()
_counter = 0

#: Names of the tmp files that deliveries of this process are writing right now; the tmp
#: sweeper (``Maildir.clean_tmp``) never removes them. Names are unique per process.
LIVE_TMP: set[str] = set()


def new_name() -> str:
    """Return a fresh unique base name (clock, pid and host read now: fork-safe)."""
    global _counter
    with _counter_lock:
        _counter += 1
        n = _counter
    now = time.time_ns() // 1000
    return unique_name(
        now // 1_000_000, now % 1_000_000, os.getpid(), n,
        int.from_bytes(os.urandom(8), "little"), _socket.gethostname(),
    )  # fmt: skip


def write_all(sys: Syscalls, fd: int, chunks: Sequence[bytes | memoryview]) -> int:
    """Write every byte of *chunks* to *fd* (``writev`` for several), looping on short
    writes; return the bytes written. A write of nothing fails with EIO instead of spinning.
    """
    views = [memoryview(c) for c in chunks if len(c)]
    done = i = 0
    while i < len(views):
        if i + 1 == len(views):
            n = sys.write(fd, views[i])
        else:
            n = sys.writev(fd, views[i : i + _IOV_MAX])
        if n <= 0:
            raise OSError(errno.EIO, "write() wrote nothing; nothing was delivered")
        done += n
        while n:
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0
    return done


class Aborted(Exception):
    """The delivery was abandoned (cancelled) while a worker call was running."""


@record(frozen=True, slots=True)
class Layout:
    """Where a maildir is: its root path and, for a Maildir++ folder, the folder's dirname."""

    root: str
    folder: str | None
    create: bool
    fsync: bool
    syscalls: Syscalls

    @property
    def path(self) -> str:
        """The maildir's own directory."""
        return self.root if self.folder is None else os.path.join(self.root, self.folder)


def _parent_of(lay: Layout, name: str) -> str:
    """Return the directory that the relative *name* of a failed call lives in."""
    if name in (lay.folder, "maildirsize"):
        return lay.root
    if name.endswith("_maildirsize"):
        return os.path.join(lay.root, "tmp")
    if name in ("tmp", "new", "cur", "maildirfolder"):
        return lay.path
    return os.path.join(lay.path, "tmp")


class TmpFile:
    """One message being written: its directory fds, tmp file and published name.

    Only worker threads call its methods, one at a time (``_session`` guarantees it); the
    ``lock``/``running``/``aborted`` fields are how the event loop hands over cleanup.
    """

    def __init__(self, layout: Layout, subdir: str) -> None:
        self.layout = layout
        self.sys = layout.syscalls
        self.subdir = subdir  # "new" or "cur"
        self.lock = _thread.allocate_lock()
        self.running = False
        self.aborted = False
        self.keep_published = False
        self.cleaned = False
        self.dir_fds: list[int] = []
        self.tmp_fd = -1
        self.dest_fd = -1
        self.fd = -1
        self.tmp_name: str | None = None
        self.final_name: str | None = None
        self.size = 0
        # (uid, gid) that files and directories maildrop creates are given: set when this
        # process runs as root and the maildir belongs to another user (see _adopt_owner).
        self.owner: tuple[int, int] | None = None
        # Held around the link into the destination (quota bookkeeping, see _quota_io).
        self.link_guard: contextlib.AbstractContextManager[object] = contextlib.nullcontext()

    # -- opening ----------------------------------------------------------------------------

    def open_dirs(self) -> None:
        """Open (creating if allowed) the maildir's ``tmp/`` and destination directories."""
        lay = self.layout
        root = self._open_root(lay.root, None)
        if self.owner is None and os.geteuid() == 0:
            self._adopt_owner(self.sys.stat(root))
        if lay.folder is not None:
            try:
                root = self._open_dir(lay.folder, root)
            except FileNotFoundError:
                self._refuse_missing(lay.path)
                # A folder's parent must be a whole maildir, or Maildir++ readers skip it.
                self._open_sub(root, "tmp")
                root = self._open_root(lay.folder, root)
                self._mark_folder(root)
        self.tmp_fd = self._open_sub(root, "tmp")
        self.dest_fd = self._open_sub(root, self.subdir)

    def _adopt_owner(self, st: os.stat_result) -> None:
        # Root delivering into a user's maildir (Postfix's mailbox_command for root, an
        # admin's test): what it creates must be the user's, or their IMAP server cannot
        # read it. Ownership is given before a file or directory is published.
        if st.st_uid != os.geteuid():
            self.owner = (st.st_uid, st.st_gid)

    def _give_dir(self, name: str, dir_fd: int | None) -> None:
        if self.owner is not None:
            self.sys.chown(name, *self.owner, dir_fd=dir_fd, follow_symlinks=False)

    def _refuse_missing(self, path: str) -> None:
        if not self.layout.create:
            raise MaildirNotFoundError(
                errno.ENOENT, f"no maildir at {path!r}; create it or pass create=True"
            )

    def _open_dir(self, name: str, dir_fd: int | None) -> int:
        try:
            fd = self.sys.open(name, DIR_FLAGS, dir_fd=dir_fd)
        except (NotADirectoryError, OSError) as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            parent = self.layout.root if name == self.layout.folder else self.layout.path
            shown = name if dir_fd is None else os.path.join(parent, name)
            raise NotAMaildirError(exc.errno, shown, self._is_link(name, dir_fd)) from None
        self.dir_fds.append(fd)
        return fd

    def _is_link(self, name: str, dir_fd: int | None) -> bool:
        try:
            st = self.sys.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_mode & 0o170000) == 0o120000  # S_ISLNK without importing stat

    def _open_root(self, name: str, dir_fd: int | None) -> int:
        where = (self.layout.root,) if dir_fd is None else (self.layout.root, name)
        try:
            fd = self._open_dir(name, dir_fd)
        except FileNotFoundError:
            self._refuse_missing(self.layout.path)
        else:
            self._wait_synced(*where)
            return fd
        with _creating(os.path.join(*where)):
            try:
                self.sys.mkdir(name, 0o700, dir_fd=dir_fd)
            except FileExistsError:
                pass  # another delivery made it first (waited for below)
            except FileNotFoundError:
                raise MaildirNotFoundError(
                    errno.ENOENT,
                    f"cannot create maildir {self.layout.path!r}: its parent directory is missing",
                ) from None
            else:
                if dir_fd is None and os.geteuid() == 0:
                    # A maildir root maildrop makes (e.g. ~user/Maildir) is its parent's
                    # owner's, like everything in it.
                    self._adopt_owner(self.sys.stat(os.path.dirname(name)))
                self._give_dir(name, dir_fd)
                self._sync_parent(name, dir_fd)
        self._wait_synced(*where)
        return self._open_dir(name, dir_fd)

    def _wait_synced(self, *where: str) -> None:
        # Another delivery of this process may have just created this directory and not yet
        # fsynced its parent: a message acknowledged before that fsync could vanish with
        # the directory in a power loss. (Other processes are not covered: see DESIGN.md.)
        # The path parts are joined only then: the usual case pays for no string.
        if _unsynced and self.layout.fsync:
            key = os.path.join(*where)
            cond = _cond()
            with cond:
                while key in _unsynced:
                    cond.wait()

    def _sync_parent(self, name: str, dir_fd: int | None) -> None:
        if not self.layout.fsync:
            return
        if dir_fd is not None:
            self.sys.fsync_dir(dir_fd)
            return
        parent = os.path.dirname(os.path.abspath(name))
        fd = self.sys.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.sys.fsync_dir(fd)
        finally:
            self.sys.close_dir(fd)

    def _open_sub(self, root: int, name: str) -> int:
        try:
            fd = self._open_dir(name, root)
        except FileNotFoundError:
            self._refuse_missing(self.layout.path)
        else:
            self._wait_synced(self.layout.path, name)
            return fd
        with _creating(*(os.path.join(self.layout.path, sub) for sub in _SUBDIRS)):
            made = False
            for sub in _SUBDIRS:
                try:
                    self.sys.mkdir(sub, 0o700, dir_fd=root)
                    made = True
                except FileExistsError:
                    continue
                self._give_dir(sub, root)
            if made and self.layout.fsync:
                self.sys.fsync_dir(root)
        self._wait_synced(self.layout.path, name)
        return self._open_dir(name, root)

    def _mark_folder(self, folder_fd: int) -> None:
        # Courier and Dovecot mark Maildir++ folders with an empty "maildirfolder" file.
        try:
            fd = self.sys.open("maildirfolder", FILE_FLAGS, 0o600, dir_fd=folder_fd)
        except FileExistsError:
            return
        try:
            if self.owner is not None:
                self.sys.fchown(fd, *self.owner)
        finally:
            self.sys.close(fd)

    # -- writing ----------------------------------------------------------------------------

    def create(self) -> None:
        """Create the tmp file under a fresh unique name."""
        for _ in range(_NAME_TRIES):
            name = new_name()
            LIVE_TMP.add(name)  # before the file exists, so a sweep never sees it unowned
            try:
                self.fd = self.sys.open(name, FILE_FLAGS, 0o600, dir_fd=self.tmp_fd)
            except BaseException as exc:
                LIVE_TMP.discard(name)
                if isinstance(exc, FileExistsError):
                    continue
                raise
            self.tmp_name = name
            if self.owner is not None:
                self.sys.fchown(self.fd, *self.owner)
            return
        raise FileExistsError(errno.EEXIST, "could not find a free name in tmp/")

    def write(self, chunks: Sequence[bytes | memoryview]) -> None:
        """Write every byte of *chunks*, looping on short writes."""
        self.size += write_all(self.sys, self.fd, chunks)

    def copy_from(self, src_fd: int, offset: int, count: int) -> int:
        """Copy up to *count* bytes of the regular file *src_fd* from *offset*; return bytes."""
        done = 0
        while done < count:
            n = self.sys.copy_file_range(src_fd, self.fd, count - done, offset + done)
            if n == 0:
                break  # EOF (the file shrank)
            done += n
            self.size += n
        return done

    # -- publishing -------------------------------------------------------------------------

    def publish(self, *, size_stamp: bool, flags: str | None, sync_dir: bool) -> str:
        """Fsync, link into the destination without clobbering, close, unlink tmp."""
        if self.layout.fsync:
            self.sys.fsync(self.fd)
        if self.aborted:
            # Cancelled while this call was writing or syncing: never publish after that.
            raise Aborted
        base = self.tmp_name
        assert base is not None
        size = self.size if size_stamp else None
        with self.link_guard:
            for _ in range(_NAME_TRIES):
                final = published_name(base, size=size, flags=flags)
                try:
                    self._link(final)
                except FileExistsError:
                    base = new_name()
                    continue
                break
            else:
                raise FileExistsError(
                    errno.EEXIST, f"could not find a free name in {self.subdir}/"
                )
        fd, self.fd = self.fd, -1
        self.sys.close(fd)
        if self.tmp_name is not None:
            # ENOENT: a publish hook renamed it (compat) or it was swept; the link is ours.
            with contextlib.suppress(FileNotFoundError):
                self.sys.unlink(self.tmp_name, dir_fd=self.tmp_fd)
            LIVE_TMP.discard(self.tmp_name)
            self.tmp_name = None
        if sync_dir:
            self.sync_dest()
        return final

    def _link(self, final: str) -> None:
        assert self.tmp_name is not None
        try:
            if _PROC_FD:
                self.sys.link(
                    f"/proc/self/fd/{self.fd}", final, dst_dir_fd=self.dest_fd,
                    follow_symlinks=True,
                )  # fmt: skip
            else:  # pragma: no cover - Linux without /proc
                self.sys.link(
                    self.tmp_name, final, src_dir_fd=self.tmp_fd, dst_dir_fd=self.dest_fd,
                    follow_symlinks=False,
                )  # fmt: skip
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            self._rename_without_links(final)
            return
        self.final_name = final

    def _rename_without_links(self, final: str) -> None:
        # Only for filesystems without hard links. rename() would replace an existing
        # message, so look first; the window between the check and the rename is the one
        # this fallback cannot close (renameat2(RENAME_NOREPLACE) is not in the stdlib).
        try:
            self.sys.stat(final, dir_fd=self.dest_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            raise FileExistsError(errno.EEXIST, final)
        assert self.tmp_name is not None
        self.sys.rename(self.tmp_name, final, src_dir_fd=self.tmp_fd, dst_dir_fd=self.dest_fd)
        LIVE_TMP.discard(self.tmp_name)
        self.tmp_name = None
        self.final_name = final

    def sync_dest(self) -> None:
        """Fsync the destination directory, making the published name durable."""
        if self.layout.fsync:
            self.sys.fsync_dir(self.dest_fd)
            # xfs answers 0 to fsync(dir) once the filesystem was shut down (I/O error,
            # or a simulated power cut) although the link it had not logged yet is gone;
            # its getattr fails with EIO from then on, so one fstat tells a real success
            # from that one (found by tests/crash/test_powerloss.py).
            self.sys.fstat(self.dest_fd)

    # -- cleanup ----------------------------------------------------------------------------

    def close_dirs(self) -> None:
        """Close the directory fds (the delivery is over)."""
        fds, self.dir_fds = self.dir_fds, []
        for fd in reversed(fds):
            # A directory fd holds no data: its close cannot lose anything.
            with contextlib.suppress(OSError):
                self.sys.close_dir(fd)
        self.tmp_fd = self.dest_fd = -1

    def locate(self, exc: OSError) -> None:
        """Make *exc* name the absolute path it concerns (same object, same errno).

        The steps work relative to directory fds, so the kernel's error names only a
        basename (or nothing, for a write or fsync); an operator needs the directory.
        """
        lay = self.layout
        name, other = exc.filename, exc.filename2
        if isinstance(name, str) and name.startswith("/proc/self/fd/") and isinstance(other, str):
            exc.filename, exc.filename2 = os.path.join(lay.path, self.subdir, other), None
        elif name is None:
            if self.tmp_name is not None:
                exc.filename = os.path.join(lay.path, "tmp", self.tmp_name)
            elif self.final_name is not None:
                exc.filename = os.path.join(lay.path, self.subdir, self.final_name)
            else:
                exc.filename = lay.path
        elif isinstance(name, str) and not os.path.isabs(name):
            exc.filename = os.path.join(_parent_of(lay, name), name)

    def cleanup(self) -> None:
        """Remove everything this delivery created (but a kept publish) and close all fds.

        Idempotent; called with ``lock`` held by whoever owns the file at that moment.
        """
        if self.cleaned:
            return
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                self.sys.close(fd)
        if self.final_name is not None and not self.keep_published:
            self._unlink_quietly(self.final_name, self.dest_fd)
            self.final_name = None
        if self.tmp_name is not None:
            self._unlink_quietly(self.tmp_name, self.tmp_fd)
            LIVE_TMP.discard(self.tmp_name)
            self.tmp_name = None
        self.close_dirs()
        # Last: the event loop polls this flag and may report the delivery gone right after.
        self.cleaned = True

    def _unlink_quietly(self, name: str, dir_fd: int) -> None:
        # Cleanup runs after a failure that is already being raised; a second error here
        # must not replace it. One retry covers a transient failure of the first unlink.
        for _ in range(2):
            try:
                self.sys.unlink(name, dir_fd=dir_fd)
                return
            except FileNotFoundError:
                return
            except OSError:
                continue
