"""Remove stale files from a maildir's ``tmp/`` (runs in a worker thread).

The maildir spec asks delivery agents to remove files from ``tmp/`` that have not been
accessed for 36 hours: leftovers of deliveries that crashed. A file counts as stale only
when its access, modification *and* change times are all older than the cut-off (``noatime``
and ``relatime`` mounts make the access time alone unreliable). A name that a delivery of
this process is writing (``_writer.LIVE_TMP``) is never removed, whatever its times say.
"""

from __future__ import annotations

import errno
import stat

from ._writer import DIR_FLAGS, LIVE_TMP, Settings

__all__ = ["TMP_MAX_AGE", "sweep_tmp"]

#: The maildir spec's age for stale files in tmp/: 36 hours.
TMP_MAX_AGE = 36 * 3600


def sweep_tmp(settings: Settings, cutoff: float) -> list[str]:
    """Remove the non-directory entries of ``tmp/`` last touched before *cutoff*; return them.

    A missing maildir or ``tmp/`` has nothing to sweep. Entries that vanish meanwhile are
    skipped; any other error is raised after the fds are closed.
    """
    sys = settings.syscalls
    try:
        root = sys.open(settings.path, DIR_FLAGS)
    except FileNotFoundError:
        return []
    try:
        try:
            tmp = sys.open("tmp", DIR_FLAGS, dir_fd=root)
        except FileNotFoundError:
            return []
        try:
            return _sweep(settings, tmp, cutoff)
        finally:
            sys.close_dir(tmp)
    finally:
        sys.close_dir(root)


def _sweep(settings: Settings, tmp: int, cutoff: float) -> list[str]:
    sys = settings.syscalls
    removed: list[str] = []
    for name in sorted(sys.listdir(tmp)):
        if name in LIVE_TMP:
            continue
        try:
            st = sys.stat(name, dir_fd=tmp, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            continue
        if max(st.st_atime, st.st_mtime, st.st_ctime) >= cutoff:
            continue
        try:
            sys.unlink(name, dir_fd=tmp)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            continue
        removed.append(name)
    return removed
