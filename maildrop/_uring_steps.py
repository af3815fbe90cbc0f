"""The engine's own steps as io_uring chains: the io_uring backend's half of ``_steps``.

The protocol and its order are the worker-side steps' (``_writer`` explains them); what the
ring changes, and why it is safe:

* Directories: ``tmp/`` and the destination are opened together by their whole paths with
  ``openat2(RESOLVE_NO_SYMLINKS)``, refusing a symlink anywhere on the path. Anything unusual
  (a directory to create, a symlink or file to report, a symlink above the maildir, a
  directory another delivery of this process has not made durable yet, a maildir of another
  user while running as root) is left to the thread step, which handles it with the same code
  and the same errors.
* The tmp file (``_uring_stream``) is a process fd opened on the ring ``O_CREAT|O_EXCL|
  O_NOFOLLOW`` with ``RESOLVE_NO_SYMLINKS`` (``RESOLVE_BENEATH`` too where relative to
  ``tmp/``) and linked from ``/proc/self/fd``, as the thread step links it: the file it
  wrote, never whatever a hostile user swapped in at its tmp name. (An earlier single-chain
  version opened the file into a direct-descriptor slot, which has no ``/proc/self/fd``
  path, and linked it by its tmp name: a swapped symlink or hard link was published.
  ``tests/crash/test_uring_hostile.py`` pins it.) A whole message is one write with
  ``RWF_SYNC`` chained to its link; a streamed one is fsynced by a chain of its own,
  checked before the link (a failed fsync does not sever a chain on kernel 6.18).
* xfs: ``statx(dest, "", AT_EMPTY_PATH)`` after ``fsync(dest)`` plays ``fstat``'s part.
* Cancellation: a chain cannot be stopped once submitted. A streamed message's link is a
  chain of its own, after the abort check the thread step makes; a whole message's chain
  links it anyway, and the cleanup of a delivery cancelled meanwhile removes that link.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
from collections.abc import Sequence

from . import _uring_abi as abi
from . import _uring_ops as ops
from ._dirs import DIR_FLAGS, creating
from ._uring import Ring
from ._writer import DeliveryFiles

__all__ = [
    "IOV_MAX",
    "dir_ops",
    "each",
    "encoded",
    "error",
    "no_free_name",
    "open_dirs",
    "open_under",
    "take_dirs",
    "write_at",
]

_RESOLVE = abi.RESOLVE_BENEATH | abi.RESOLVE_NO_SYMLINKS
_NO_LINKS = abi.RESOLVE_NO_SYMLINKS
IOV_MAX = 1024
Chunks = Sequence[bytes | memoryview]


def error(result: int, *names: str | None) -> OSError:
    """Return the ``OSError`` that ``os`` raises for *result* (``-errno``) on *names*."""
    return OSError(-result, os.strerror(-result), *names)


@functools.lru_cache(maxsize=1024)
def encoded(path: str, sub: str | None = None) -> bytes:
    """Return *path* (joined with *sub*) as the ring's bytes: once per maildir, not per op."""
    return os.fsencode(path if sub is None else os.path.join(path, sub))


def open_under(ring: Ring, dir_fd: int, name: str | bytes, flags: int) -> ops.Op:
    mode = 0o600 if flags & os.O_CREAT else 0  # openat2 refuses a mode without O_CREAT
    if ring.has_openat2:
        return ops.openat2(dir_fd, name, flags, mode, resolve=_RESOLVE)
    return ops.openat(dir_fd, name, flags | os.O_NOFOLLOW, mode)  # pragma: no cover


def each(ring: Ring, chain: list[ops.Op]) -> asyncio.Future[list[int]]:
    """Submit the ops of *chain* unlinked (they run concurrently); a future of the results."""
    future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()

    def done(results: list[int]) -> None:
        if not future.cancelled():
            future.set_result(results)

    ring.queue(chain, done, linked=False)
    return future


def dir_ops(ring: Ring, tmp: DeliveryFiles) -> list[ops.Op] | None:
    """Return the ops that open the maildir's ``tmp/`` and destination directories (and
    stat the maildir when running as root), or None where the thread step must do it."""
    cfg = tmp.settings
    if not ring.has_openat2:  # pragma: no cover - kernels before 5.6
        return None
    if cfg.fsync and creating():
        return None
    path = cfg.path
    chain = [
        ops.openat2(abi.AT_FDCWD, encoded(path, sub), DIR_FLAGS, 0, resolve=_NO_LINKS)
        for sub in ("tmp", tmp.subdir)
    ]
    if os.geteuid() == 0:  # then what it creates must be the maildir owner's: see _dirs
        chain.append(ops.statx(abi.AT_FDCWD, encoded(cfg.root), abi.AT_SYMLINK_NOFOLLOW))
    return chain


def take_dirs(tmp: DeliveryFiles, chain: list[ops.Op], results: list[int]) -> bool:
    """Keep the directories *chain* (:func:`dir_ops`) opened with *results*; False, with
    nothing left open, where the thread step must open them (see :func:`open_dirs`)."""
    tmp.dir_fds += [r for r in results[:2] if r >= 0]
    ok = min(results) >= 0 and not (tmp.settings.fsync and creating())
    if ok and len(chain) > 2 and ops.statx_result(chain[2]).uid != 0:
        ok = False
    if ok:
        tmp.tmp_fd, tmp.dest_fd = results[0], results[1]
        return True
    tmp.close_dirs()
    return False


async def open_dirs(ring: Ring, tmp: DeliveryFiles) -> bool:
    """Open the maildir's ``tmp/`` and destination directories on *ring*, in one round trip.

    Both are opened by their whole path with ``RESOLVE_NO_SYMLINKS``: no component of it may be
    a symlink, which covers the thread step's rule (the maildir, its folder, ``tmp/`` and the
    destination are never followed) and more. Return False, with nothing left open, where the
    thread step must do it: a path with a symlink above the maildir (``ELOOP``), a missing
    directory, another owner (see the module), a directory not durable yet.
    """
    chain = dir_ops(ring, tmp)
    return chain is not None and take_dirs(tmp, chain, await each(ring, chain))


async def write_at(ring: Ring, fd: int, data: Chunks, *, at: int) -> None:
    """Write *data* to *fd* from offset *at* on, looping on short writes (as ``write_all``
    does), at explicit offsets.

    Never at the file position (offset -1): after a short write on the ring (kernel 6.18,
    tmpfs filling up) the position had not moved, so the rest went over the start of the
    file and a truncated, scrambled message was published
    (``tests/crash/test_diskfull.py``, 4MiB-streamed). A caller that shares the fd with
    thread steps moves its position itself.
    """
    views = [memoryview(chunk).cast("B") for chunk in data if len(chunk)]
    offset = at
    while views:
        (n,) = await ring.submit([ops.writev(fd, views[:IOV_MAX], offset=offset)])
        if n <= 0:
            raise error(n) if n < 0 else OSError(errno.EIO, "write() wrote nothing")
        offset += n
        while n:
            step = min(n, len(views[0]))
            views[0], n = views[0][step:], n - step
            if not len(views[0]):
                views.pop(0)


def no_free_name(tmp: DeliveryFiles, sub: str) -> FileExistsError:
    """Return the error of a delivery that found every name it tried in *sub* taken."""
    where = os.path.join(tmp.settings.path, sub)
    return FileExistsError(errno.EEXIST, f"could not find a free name in {where}/")
