"""The directory half of a delivery: open a maildir's directories, creating them if allowed.

The rules (directories opened ``O_DIRECTORY|O_NOFOLLOW`` and used through their fds, a
created directory made durable before anything in it is published) are explained at the top
of ``_writer``, the one long explanation of the engine. When this process runs as root and
the maildir belongs to another user, what it creates is given to that user before use.
"""

from __future__ import annotations

import _thread
import errno
import os

from ._errors import MaildirNotFoundError, NotAMaildirError
from ._record import record
from ._sys import Syscalls

TYPE_CHECKING = False
if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

    from ._dircache import Entry
    from ._quota import Quota

__all__ = ["DIR_FLAGS", "FILE_FLAGS", "Dirs", "Settings", "creating", "parent_of"]

#: How every directory of a maildir is opened (a symlink is refused, not followed).
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: How every file maildrop creates is opened (never an existing file, never via a symlink).
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SUBDIRS = ("tmp", "new", "cur")
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


class _Creating:  # a plain class, not @contextmanager: contextlib costs start-up time
    """Mark *keys* as created-but-not-durable while the body makes them durable."""

    def __init__(self, *keys: str) -> None:
        self.keys = keys
        self.cond = _cond()

    def __enter__(self) -> None:
        with self.cond:
            for key in self.keys:
                _unsynced[key] = _unsynced.get(key, 0) + 1

    def __exit__(self, *exc_info: object) -> None:
        with self.cond:
            for key in self.keys:
                if _unsynced[key] == 1:
                    del _unsynced[key]
                else:
                    _unsynced[key] -= 1
            self.cond.notify_all()


@record(frozen=True, slots=True)
class Settings:
    """Everything a :class:`~maildrop.Maildir` was configured with, frozen.

    Where the maildir is (its *root* and, for a Maildir++ folder, the folder's dirname) and
    the delivery policy (create it, fsync, the syscall table, the size limit, the size
    stamp, the quota). A folder's settings are its parent's with another *folder*
    (``_record.replace``).
    """

    root: str
    folder: str | None
    create: bool
    fsync: bool
    syscalls: Syscalls
    max_size: int | None = None
    size_stamp: bool = False
    quota: Quota | None = None
    #: ``"auto"``, ``"uring"`` or ``"threads"`` (``_uring_backend.requested``).
    backend: str = "auto"

    @property
    def path(self) -> str:
        """The maildir's own directory."""
        return self.root if self.folder is None else os.path.join(self.root, self.folder)


def creating() -> bool:
    """Whether a delivery of this process is creating a directory that is not durable yet."""
    return bool(_unsynced)


def parent_of(cfg: Settings, name: str) -> str:
    """Return the directory that the relative *name* of a failed call lives in."""
    if name in (cfg.folder, "maildirsize"):
        return cfg.root
    if name.endswith("_maildirsize"):
        return os.path.join(cfg.root, "tmp")
    if name in ("tmp", "new", "cur", "maildirfolder"):
        return cfg.path
    return os.path.join(cfg.path, "tmp")


class Dirs:
    """The directory fds of one delivery (``DeliveryFiles`` adds the message file to them)."""

    def __init__(self, settings: Settings, subdir: str) -> None:
        self.settings = settings
        self.sys = settings.syscalls
        self.subdir = subdir  # "new" or "cur"
        self.dir_fds: list[int] = []
        self.tmp_fd = -1
        self.dest_fd = -1
        # (uid, gid) that files and directories maildrop creates are given: set when this
        # process runs as root and the maildir belongs to another user (see _adopt_owner).
        self.owner: tuple[int, int] | None = None
        #: Take the directories from, and leave them in, the process's cache (``_dircache``).
        self.reuse = False
        self._kept: Entry | None = None

    @property
    def root_fd(self) -> int:
        """The fd of the maildir's root (the top maildir, also for a folder: its quota)."""
        return self.dir_fds[0]

    # -- opening ----------------------------------------------------------------------------

    def open_dirs(self) -> None:
        """Open (creating if allowed) the maildir's ``tmp/`` and destination directories."""
        if self.reuse and self.reuse_kept():
            return
        cfg = self.settings
        root = self._open_root(cfg.root, None)
        if self.owner is None and os.geteuid() == 0:
            self._adopt_owner(self.sys.stat(root))
        if cfg.folder is not None:
            try:
                root = self._open_dir(cfg.folder, root)
            except FileNotFoundError:
                self._refuse_missing(cfg.path)
                # A folder's parent must be a whole maildir, or Maildir++ readers skip it.
                self._open_sub(root, "tmp")
                root = self._open_root(cfg.folder, root)
                self._mark_folder(root)
        self.tmp_fd = self._open_sub(root, "tmp")
        self.dest_fd = self._open_sub(root, self.subdir)
        if self.reuse:
            from ._dircache import keep

            self._kept = keep(self)

    def reuse_kept(self) -> bool:
        """Take the directories from the process's cache (``_dircache``); False if it has
        none for this maildir (open them yourself)."""
        # Imported here: `maildrop deliver` never reuses, nor loads it. `from .mod import
        # name`: no importlib call per delivery, as `from . import mod` has.
        from ._dircache import reuse

        kept = self._kept = reuse(self)
        if kept is None:
            return False
        self.dir_fds = list(kept.dir_fds)
        self.tmp_fd, self.dest_fd, self.owner = kept.tmp_fd, kept.dest_fd, kept.owner
        return True

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
        if not self.settings.create:
            raise MaildirNotFoundError(
                errno.ENOENT, f"no maildir at {path!r}; create it or pass create=True"
            )

    def _open_dir(self, name: str, dir_fd: int | None) -> int:
        try:
            fd = self.sys.open(name, DIR_FLAGS, dir_fd=dir_fd)
        except (NotADirectoryError, OSError) as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            parent = self.settings.root if name == self.settings.folder else self.settings.path
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
        where = (self.settings.root,) if dir_fd is None else (self.settings.root, name)
        try:
            fd = self._open_dir(name, dir_fd)
        except FileNotFoundError:
            self._refuse_missing(self.settings.path)
        else:
            self._wait_synced(*where)
            return fd
        with _Creating(os.path.join(*where)):
            try:
                self.sys.mkdir(name, 0o700, dir_fd=dir_fd)
            except FileExistsError:
                pass  # another delivery made it first (waited for below)
            except FileNotFoundError:
                raise MaildirNotFoundError(
                    errno.ENOENT,
                    f"cannot create maildir {self.settings.path!r}: "
                    "its parent directory is missing",
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
        if _unsynced and self.settings.fsync:
            key = os.path.join(*where)
            cond = _cond()
            with cond:
                while key in _unsynced:
                    cond.wait()

    def _sync_parent(self, name: str, dir_fd: int | None) -> None:
        if not self.settings.fsync:
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
            self._refuse_missing(self.settings.path)
        else:
            self._wait_synced(self.settings.path, name)
            return fd
        with _Creating(*(os.path.join(self.settings.path, sub) for sub in _SUBDIRS)):
            made = False
            for sub in _SUBDIRS:
                try:
                    self.sys.mkdir(sub, 0o700, dir_fd=root)
                    made = True
                except FileExistsError:
                    continue
                self._give_dir(sub, root)
            if made and self.settings.fsync:
                self.sys.fsync_dir(root)
        self._wait_synced(self.settings.path, name)
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

    def close_dirs(self, *, failed: bool = False) -> None:
        """Close the directory fds (the delivery is over), or give them back to the cache
        (*failed*: the delivery failed or was aborted; the cache drops them)."""
        fds, self.dir_fds = self.dir_fds, []
        kept, self._kept = self._kept, None
        if kept is not None:
            self.tmp_fd = self.dest_fd = -1
            _give_back()(kept, drop=failed)
            return
        for fd in reversed(fds):
            # A directory fd holds no data: its close cannot lose anything.
            try:  # noqa: SIM105 - contextlib costs `maildrop deliver` start-up time
                self.sys.close_dir(fd)
            except OSError:
                pass
        self.tmp_fd = self.dest_fd = -1


def _give_back() -> Callable[..., None]:
    """Return ``_dircache.give_back``, imported on first use (``maildrop deliver`` never
    keeps directories, nor loads the cache)."""
    global _GIVE_BACK
    if _GIVE_BACK is None:
        from ._dircache import give_back

        _GIVE_BACK = give_back
    return _GIVE_BACK


_GIVE_BACK: Callable[..., None] | None = None
