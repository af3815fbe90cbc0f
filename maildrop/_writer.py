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
  swapped the name in ``tmp/`` (without ``/proc``, from that name, never following a
  symlink). A taken name is retried under a fresh one. Single and multi-target delivery
  (``_many``) publish through the same functions (:func:`under_free_name`,
  :func:`link_file`). The fd is closed only after the link; a close error still fails the
  delivery (and removes the link). Filesystems without hard links get a rename after an
  existence check: documented, and narrower than the stdlib's plain rename.
* ``new/`` is fsynced after the link; only then is the message durable. Callers share that
  fsync when several deliveries are in flight (group commit, see ``_session``).
* A :class:`DeliveryFiles` is owned by at most one thread at a time. Whatever fails inside a worker
  call is cleaned up by that worker before the exception leaves it, so the event loop never
  unlinks a file that a still-running write or fsync is using.
"""

from __future__ import annotations

import _thread
import errno
import os
import time

from ._dirs import DIR_FLAGS, FILE_FLAGS, Dirs, Settings, parent_of
from ._naming import published_name
from ._unique import new_name

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from contextlib import AbstractContextManager

    from ._sys import Syscalls

__all__ = [
    "DIR_FLAGS",
    "FILE_FLAGS",
    "LINK_REFUSED",
    "LIVE_TMP",
    "NO_LINKS",
    "UNSUPPORTED",
    "Aborted",
    "DeliveryFiles",
    "Settings",
    "link_file",
    "new_name",
    "reopen",
    "under_free_name",
    "write_all",
]

_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
# Without /proc the written file is linked and reopened by its name in tmp/ instead of its fd.
_PROC_FD = os.path.isdir("/proc/self/fd")
#: Errnos that mean "this filesystem cannot do that at all", not "this call failed".
UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
#: link() errnos that mean "this filesystem has no hard links".
NO_LINKS = UNSUPPORTED | {errno.EPERM}
#: link() errnos after which a copy of the file can still be delivered.
LINK_REFUSED = NO_LINKS | {errno.EXDEV, errno.EMLINK}
_NAME_TRIES = 100

#: Names of the tmp files that deliveries of this process are writing right now; the tmp
#: sweeper (``Maildir.clean_tmp``) never removes them. Names are unique per process.
LIVE_TMP: set[str] = set()


#: A message file's fsync this long or longer is slow (a journaled filesystem's commit, a
#: slow disk): the worker pool keeps more fsyncs in flight while most are (``_pool``).
SLOW_FSYNC = 0.001
#: The share of recent fsyncs that were slow (a moving average of 0s and 1s): over one half
#: means the median fsync is slow. A median, not a mean: a fast disk's occasional stall
#: must not look like a slow disk.
slow_fsyncs = 0.0


def note_fsync(seconds: float) -> None:
    """Count one message file's fsync, which took *seconds*, into :data:`slow_fsyncs`."""
    global slow_fsyncs
    slow_fsyncs += ((seconds >= SLOW_FSYNC) - slow_fsyncs) / 16


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


def under_free_name(
    place: Callable[[str], None],
    name_for: Callable[[str], str],
    dirs: Dirs,
    sub: str,
    first: str | None = None,
) -> str:
    """Call ``place(name_for(base))`` until it does not raise ``FileExistsError``; return
    the name placed. *base* is *first*, then (or without it) a fresh unique name each try.
    Nothing is ever clobbered: after ``_NAME_TRIES`` taken names it raises
    ``FileExistsError`` naming the directory *sub* of *dirs*' maildir.
    """
    base = new_name() if first is None else first
    for _ in range(_NAME_TRIES):
        name = name_for(base)
        try:
            place(name)
        except FileExistsError:
            base = new_name()
            continue
        return name
    where = os.path.join(dirs.settings.path, sub)
    raise FileExistsError(errno.EEXIST, f"could not find a free name in {where}/")


def link_file(src: DeliveryFiles, dest: Dirs, name: str) -> None:
    """Hard-link the file *src* wrote as *name* into *dest*'s destination directory.

    The link is made from ``/proc/self/fd/N``, so it is exactly the inode *src* wrote even
    if its name in ``tmp/`` was swapped; without ``/proc``, from that name (never
    following a symlink). *dest*'s syscall table makes the call. Raises the link's
    ``OSError`` (``FileExistsError`` for a taken name, an errno of :data:`LINK_REFUSED`
    where only a copy can work).
    """
    if _PROC_FD:
        dest.sys.link(
            f"/proc/self/fd/{src.fd}", name, dst_dir_fd=dest.dest_fd, follow_symlinks=True
        )
    else:
        dest.sys.link(
            src.tmp_name, name, src_dir_fd=src.tmp_fd, dst_dir_fd=dest.dest_fd,
            follow_symlinks=False,
        )  # fmt: skip


def reopen(src: DeliveryFiles) -> int:
    """Open the file *src* wrote again, read-only (its own fd is write-only); return the fd."""
    if _PROC_FD:
        return src.sys.open(f"/proc/self/fd/{src.fd}", os.O_RDONLY | os.O_CLOEXEC)
    return src.sys.open(
        src.tmp_name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=src.tmp_fd
    )


class _NoLock:
    """No quota ledger to lock (``contextlib.nullcontext`` without importing contextlib)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


_NO_LOCK = _NoLock()


def _same(name: str) -> str:
    return name


class Aborted(Exception):
    """The delivery was abandoned (cancelled) while a worker call was running."""


class DeliveryFiles(Dirs):
    """The disk state of one delivery: its directory fds, tmp file and published name.

    Only worker threads call its methods, one at a time (``_session`` guarantees it); the
    ``lock``/``running``/``aborted`` fields are how the event loop hands over cleanup.
    """

    def __init__(self, settings: Settings, subdir: str) -> None:
        super().__init__(settings, subdir)
        self.lock = _thread.allocate_lock()
        self.running = False
        self.aborted = False
        self.keep_published = False
        self.cleaned = False
        self.fd = -1
        self.tmp_name: str | None = None
        self.final_name: str | None = None
        self.size = 0
        # The quota ledger's lock, held around the link into the destination so the
        # maildirsize update matches the links made (see _quota_io); a no-op without quota.
        self.ledger_lock: AbstractContextManager[object] = _NO_LOCK

    # -- writing ----------------------------------------------------------------------------

    def create(self) -> None:
        """Create the tmp file under a fresh unique name."""
        under_free_name(self._create_as, _same, self, "tmp")
        if self.owner is not None:
            self.sys.fchown(self.fd, *self.owner)

    def _create_as(self, name: str) -> None:
        LIVE_TMP.add(name)  # before the file exists, so a sweep never sees it unowned
        try:
            self.fd = self.sys.open(name, FILE_FLAGS, 0o600, dir_fd=self.tmp_fd)
        except BaseException:
            LIVE_TMP.discard(name)
            raise
        self.tmp_name = name

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
        if self.settings.fsync:
            started = time.monotonic()
            self.sys.fsync(self.fd)
            note_fsync(time.monotonic() - started)
        if self.aborted:
            # Cancelled while this call was writing or syncing: never publish after that.
            raise Aborted
        size = self.size if size_stamp else None
        with self.ledger_lock:
            final = under_free_name(
                self._link,
                lambda base: published_name(base, size=size, flags=flags),
                self,
                self.subdir,
                first=self.tmp_name,
            )
        fd, self.fd = self.fd, -1
        self.sys.close(fd)
        if self.tmp_name is not None:
            # ENOENT: a publish hook renamed it (compat) or it was swept; the link is ours.
            try:  # noqa: SIM105 - contextlib costs `maildrop deliver` start-up time
                self.sys.unlink(self.tmp_name, dir_fd=self.tmp_fd)
            except FileNotFoundError:
                pass
            LIVE_TMP.discard(self.tmp_name)
            self.tmp_name = None
        if sync_dir:
            self.sync_dest()
        return final

    def _link(self, final: str) -> None:
        try:
            link_file(self, self, final)
        except OSError as exc:
            if exc.errno not in NO_LINKS:
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
        if self.settings.fsync:
            self.sys.fsync_dir(self.dest_fd)
            # xfs answers 0 to fsync(dir) once the filesystem was shut down (I/O error,
            # or a simulated power cut) although the link it had not logged yet is gone;
            # its getattr fails with EIO from then on, so one fstat tells a real success
            # from that one (found by tests/crash/test_powerloss.py).
            self.sys.fstat(self.dest_fd)

    # -- cleanup ----------------------------------------------------------------------------

    def locate(self, exc: OSError) -> None:
        """Make *exc* name the absolute path it concerns (same object, same errno).

        The steps work relative to directory fds, so the kernel's error names only a
        basename (or nothing, for a write or fsync); an operator needs the directory.
        """
        cfg = self.settings
        name, other = exc.filename, exc.filename2
        if isinstance(name, str) and name.startswith("/proc/self/fd/") and isinstance(other, str):
            exc.filename, exc.filename2 = os.path.join(cfg.path, self.subdir, other), None
        elif name is None:
            if self.tmp_name is not None:
                exc.filename = os.path.join(cfg.path, "tmp", self.tmp_name)
            elif self.final_name is not None:
                exc.filename = os.path.join(cfg.path, self.subdir, self.final_name)
            else:
                exc.filename = cfg.path
        elif isinstance(name, str) and not os.path.isabs(name):
            exc.filename = os.path.join(parent_of(cfg, name), name)

    def cleanup(self) -> None:
        """Remove everything this delivery created (but a kept publish) and close all fds.

        Idempotent; called with ``lock`` held by whoever owns the file at that moment.
        """
        if self.cleaned:
            return
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:  # noqa: SIM105 - contextlib costs `maildrop deliver` start-up time
                self.sys.close(fd)
            except OSError:
                pass
        if self.final_name is not None and not self.keep_published:
            self._unlink_quietly(self.final_name, self.dest_fd)
            self.final_name = None
        if self.tmp_name is not None:
            self._unlink_quietly(self.tmp_name, self.tmp_fd)
            LIVE_TMP.discard(self.tmp_name)
            self.tmp_name = None
        self.close_dirs(failed=True)
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
