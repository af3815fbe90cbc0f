"""A message's file on the io_uring backend, written in one step or in ~1 MiB batches.

The tmp file is a process fd, opened on the ring like the directories: between two steps
its caller owns the files, and any later step may run in a thread (copying a synchronous
file, ``deliver_many``'s staging, a cleanup), which needs that fd. So the file is
linked from ``/proc/self/fd/N`` with ``AT_SYMLINK_FOLLOW``, exactly as the thread step links
it. Its writes go at explicit offsets from ``tmp.size`` (never at the file position: see
``_uring_steps.write_at``), and each ring step then moves the fd's position to the end, so
ring and thread writes follow each other correctly. Its fsync is a chain of its own, checked
before the link: ``RWF_SYNC`` would cover only the last write, and a failed fsync does not
sever a chain (see ``_uring_steps``).
"""

from __future__ import annotations

import errno
import os

from . import _uring_abi as abi
from . import _uring_ops as ops
from ._steps import Steps
from ._uring import Ring
from ._uring_steps import each, error, no_free_name, open_dirs, open_under, write_at
from ._writer import (
    _NAME_TRIES,
    _PROC_FD,
    FILE_FLAGS,
    LIVE_TMP,
    NO_LINKS,
    Aborted,
    DeliveryFiles,
    new_name,
)

__all__ = ["finish", "write"]


async def write(ring: Ring, steps: Steps, chunks: list[bytes | memoryview]) -> bool:
    """``Steps.write`` on *ring*: the first batch opens the directories and creates the file.

    Return False where the thread step must do it (nothing was done: see ``open_dirs``).
    """
    tmp = steps.tmp
    if not steps.started:
        if not await open_dirs(ring, tmp):
            return False
        for _ in range(_NAME_TRIES):
            name = new_name()
            LIVE_TMP.add(name)  # before the file exists, so a sweep never sees it unowned
            (fd,) = await ring.submit([open_under(ring, tmp.tmp_fd, name, FILE_FLAGS)])
            if fd >= 0:
                tmp.fd, tmp.tmp_name = fd, name
                break
            LIVE_TMP.discard(name)
            if fd != -errno.EEXIST:
                raise error(fd, name)
        else:
            raise no_free_name(tmp, "tmp")
        steps.started = True
    await _append(ring, tmp, chunks)
    return True


async def _append(ring: Ring, tmp: DeliveryFiles, data: list[bytes | memoryview]) -> None:
    """Write *data* at the end of the file (``tmp.size``), then put the fd's position there:
    a later thread step (copying a file source) writes at the position."""
    await write_at(ring, tmp.fd, data, at=tmp.size)
    tmp.size += sum(map(len, data))
    os.lseek(tmp.fd, tmp.size, os.SEEK_SET)  # never blocks: no disk I/O


async def finish(
    ring: Ring, steps: Steps, chunks: list[bytes | memoryview], sync_new: bool
) -> str | None:
    """``Steps.finish`` for a message whose file is open (earlier batches written).

    Return the published name, or None where only the thread step can publish it (a
    filesystem without hard links): the message is then written and synced, not linked.
    """
    tmp = steps.tmp
    data = [c for c in (*chunks, steps.tail(tmp.size + sum(map(len, chunks)))) if len(c)]
    await _append(ring, tmp, data)
    fsync = tmp.settings.fsync
    if fsync:
        (result,) = await ring.submit([ops.fsync(tmp.fd)])
        if result < 0:
            raise error(result)
    if tmp.aborted:
        raise Aborted  # cancelled while writing or syncing: never publish after that
    base = str(tmp.tmp_name)
    for _ in range(_NAME_TRIES):
        final = steps.name_for(base, tmp.size)
        if _PROC_FD:
            src, src_dir, flags = f"/proc/self/fd/{tmp.fd}", abi.AT_FDCWD, abi.AT_SYMLINK_FOLLOW
        else:  # pragma: no cover - every CI host has /proc
            src, src_dir, flags = str(tmp.tmp_name), tmp.tmp_fd, 0
        chain = [ops.linkat(src_dir, src, tmp.dest_fd, final, flags)]
        if sync_new and fsync:
            chain += [ops.fsync(tmp.dest_fd), ops.statx(tmp.dest_fd, "", abi.AT_EMPTY_PATH)]
        results = await ring.submit(chain)
        if results[0] != -errno.EEXIST:
            break
        base = new_name()
    else:
        raise no_free_name(tmp, tmp.subdir)
    if -results[0] in NO_LINKS:
        return None
    if results[0] < 0:
        raise error(results[0], src, None, final)
    tmp.final_name = final
    await _close_and_unlink(ring, tmp)
    for result in results[1:]:
        if result < 0:
            raise error(result)
    if sync_new:
        tmp.close_dirs()
    return final


async def _close_and_unlink(ring: Ring, tmp: DeliveryFiles) -> None:
    """Close the published file and remove its tmp name (a close error fails the delivery)."""
    name = str(tmp.tmp_name)
    close, unlink = await each(ring, [ops.close(tmp.fd), ops.unlinkat(tmp.tmp_fd, name)])
    tmp.fd = -1  # Linux releases the fd even when close reports an error
    if unlink in (0, -errno.ENOENT):  # ENOENT: swept, or renamed by a publish hook
        LIVE_TMP.discard(name)
        tmp.tmp_name = None
    if close < 0:
        raise error(close)
    if unlink < 0 and tmp.tmp_name is not None:
        raise error(unlink, name)
