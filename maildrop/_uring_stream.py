"""A message's file on the io_uring backend, written whole or in ~1 MiB batches.

A whole message (the engine's ``finish`` with nothing written yet: the common case) takes
two round trips: the directories and the file are opened together (:class:`OneOpen`), then
one chain writes it with ``RWF_SYNC`` (one write: that is its fsync), links it from
``/proc/self/fd``, removes the tmp name and closes it (:func:`one_chain`, whose results
:func:`after_one` reads). ``_uring_whole`` drives those from completion callbacks; what they
leave (:class:`Again`) is done step by step here (:func:`redo`). What follows is the general
case, a message written in batches.

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

import enum
import errno
import os

from . import _uring_abi as abi
from . import _uring_ops as ops
from ._steps import Steps
from ._uring import Ring
from ._uring_steps import (
    IOV_MAX,
    each,
    encoded,
    error,
    no_free_name,
    open_dirs,
    open_under,
    take_dirs,
    write_at,
)
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

__all__ = [
    "FOREIGN",
    "Again",
    "OneOpen",
    "after_one",
    "finish",
    "one_chain",
    "redo",
    "whole_data",
    "write",
]


async def write(ring: Ring, steps: Steps, chunks: list[bytes | memoryview]) -> bool:
    """``Steps.write`` on *ring*: the first batch opens the directories and creates the file.

    Return False where the thread step must do it (nothing was done: see ``open_dirs``).
    """
    tmp = steps.tmp
    if not steps.started:
        if not await open_dirs(ring, tmp):
            return False
        await _create(ring, tmp)
        steps.started = True
    await _append(ring, tmp, chunks)
    return True


async def _create(ring: Ring, tmp: DeliveryFiles) -> None:
    """Create the tmp file under a free name in ``tmp/`` (open already)."""
    for _ in range(_NAME_TRIES):
        name = new_name()
        LIVE_TMP.add(name)  # before the file exists, so a sweep never sees it unowned
        (fd,) = await ring.submit([open_under(ring, tmp.tmp_fd, name, FILE_FLAGS)])
        if fd >= 0:
            tmp.fd, tmp.tmp_name = fd, name
            return
        LIVE_TMP.discard(name)
        if fd != -errno.EEXIST:
            raise error(fd, name)
    raise no_free_name(tmp, "tmp")


async def _append(ring: Ring, tmp: DeliveryFiles, data: list[bytes | memoryview]) -> None:
    """Write *data* at the end of the file (``tmp.size``), then put the fd's position there:
    a later thread step (copying a file source) writes at the position.

    A durable delivery's write is chained with ``sync_file_range(SYNC_FILE_RANGE_WRITE)``
    of the same bytes: their writeback starts while the next batch is made, instead of all
    of it at the final fsync (which still waits for every page and reports the writeback
    errors: starting writeback consumes none). After a short write, which severs that
    chain, the batch is written again from its start without it (the same bytes at the
    same offsets).
    """
    start = tmp.size
    total = sum(map(len, data))
    if tmp.settings.fsync and total and len(data) <= IOV_MAX:
        put = ops.writev(tmp.fd, data, offset=start)
        sync = ops.sync_file_range(tmp.fd, start, total, _SYNC_FILE_RANGE_WRITE)
        written, started = await ring.submit([put, sync])
        if written <= 0:  # as write_at: nothing written is an error, never a retry
            raise error(written) if written < 0 else OSError(errno.EIO, "write() wrote nothing")
        if written < total:
            await write_at(ring, tmp.fd, data, at=start)
        elif started < 0:
            raise error(started)
    else:
        await write_at(ring, tmp.fd, data, at=start)
    tmp.size = start + total
    os.lseek(tmp.fd, tmp.size, os.SEEK_SET)  # never blocks: no disk I/O


#: ``SYNC_FILE_RANGE_WRITE``: start the writeback of the range's dirty pages, wait for none.
_SYNC_FILE_RANGE_WRITE = 2


def whole_data(steps: Steps, chunks: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """Return a whole message's chunks with the transform's tail, empty ones left out."""
    if steps.transform is not None:
        chunks = [*chunks, steps.tail(sum(map(len, chunks)))]
    return [c for c in chunks if len(c)]


class OneOpen:
    """The ops that open the directories and create the tmp file in one round trip (the file
    by its whole path, with ``RESOLVE_NO_SYMLINKS`` as the directories), and what their
    results mean (:meth:`took`)."""

    __slots__ = ("dirs", "name", "ops", "path")

    def __init__(self, ring: Ring, tmp: DeliveryFiles, dirs: list[ops.Op]) -> None:
        self.dirs, self.name = dirs, new_name()
        LIVE_TMP.add(self.name)
        self.path = encoded(tmp.settings.path, "tmp") + b"/" + os.fsencode(self.name)
        flags, resolve = FILE_FLAGS, abi.RESOLVE_NO_SYMLINKS
        self.ops = [*dirs, ops.openat2(abi.AT_FDCWD, self.path, flags, 0o600, resolve=resolve)]

    def took(self, tmp: DeliveryFiles, results: list[int]) -> bool | list[ops.Op] | None:
        """Keep what the ops opened: True (the file is open), None (its name was taken:
        create it under another) or the ops that remove what was made before the thread
        step does it all (then :meth:`gone`); raise the create's error."""
        fd = results.pop()
        if not take_dirs(tmp, self.dirs, results):
            dirs = self.dirs
            if len(dirs) > 2 and min(results) >= 0 and ops.statx_result(dirs[2]).uid != 0:
                if len(FOREIGN) >= _FOREIGN_MAX:
                    FOREIGN.clear()  # bounded: forgetting costs one wasted create, not more
                FOREIGN.add(tmp.settings.path)  # another user's maildir: the two-step way
            return [ops.close(fd), ops.unlinkat(abi.AT_FDCWD, self.path)] if fd >= 0 else []
        if fd >= 0:
            tmp.fd, tmp.tmp_name = fd, self.name
            return True
        LIVE_TMP.discard(self.name)
        if fd != -errno.EEXIST:
            raise error(fd, os.fsdecode(self.path))
        return None

    def gone(self) -> None:
        """Forget the tmp name once the ops :meth:`took` returned have removed the file."""
        LIVE_TMP.discard(self.name)


class Again(enum.Enum):
    """What a whole message's chain left to do step by step (:func:`redo`)."""

    SHORT = "write the rest"  # a short write severed the chain before the link
    RECREATE = "write it into a new tmp file"  # the link failed: a name taken, no hard links


def one_chain(
    steps: Steps, data: list[bytes | memoryview], sync_new: bool, raw: bytes | None = None
) -> tuple[list[ops.Op], str]:
    """Return the chain that writes, links, unlinks and closes the new, empty tmp file (and
    with *sync_new* fsyncs the destination), and the name it publishes (*raw*: the tmp
    name's bytes, if the caller has them)."""
    tmp = steps.tmp
    name, fsync = str(tmp.tmp_name), tmp.settings.fsync
    put = ops.writev(tmp.fd, data, offset=0, rw_flags=abi.RWF_SYNC if fsync else 0)
    final = steps.name_for(name, put.expect)
    link, *dest = _link_ops(tmp, final, sync_new and fsync)
    unlink = ops.unlinkat(tmp.tmp_fd, ops.fspath(name) if raw is None else raw)
    return [put, link, unlink, ops.close(tmp.fd), *dest], final


def after_one(
    steps: Steps, chain: list[ops.Op], final: str, sync_new: bool, results: list[int]
) -> str | Again:
    """Return the name :func:`one_chain` published given its *results*, or what is left.

    A failed or short write severs the chain before the link. A failed link does not (see
    ``_uring_steps``): the unlink and close after it run, so a name already taken (EEXIST)
    or a filesystem without hard links has the message written again into a new tmp file
    and published the step-by-step way. A delivery cancelled while the chain ran was linked
    all the same: its cleanup removes that link (``Aborted``), which leaves what the
    thread step's abort check before the link leaves.
    """
    tmp = steps.tmp
    written, linked, unlinked, closed, *synced = results
    name, fd = str(tmp.tmp_name), tmp.fd
    if closed != -errno.ECANCELED:
        tmp.fd = -1  # Linux releases the fd even when close reports an error
    if written < 0:
        raise error(written, name)
    if written < chain[0].expect:  # short: severed before the link; write it all again
        return Again.SHORT
    tmp.size = written
    if unlinked in (0, -errno.ENOENT):
        LIVE_TMP.discard(name)
        tmp.tmp_name = None
    if linked == 0:
        tmp.final_name = final
    if tmp.aborted:
        raise Aborted  # cancelled meanwhile: the thread step would not have linked
    if linked in _WRITE_AGAIN and tmp.tmp_name is None:
        return Again.RECREATE
    if linked < 0:
        raise error(linked, f"/proc/self/fd/{fd}", None, final)
    if closed < 0:
        raise error(closed)
    if tmp.tmp_name is not None:
        raise error(unlinked, name)
    for result in synced:
        if result < 0:
            raise error(result)
    if sync_new:
        tmp.close_dirs()
    return final


async def redo(
    ring: Ring, steps: Steps, data: list[bytes | memoryview], sync_new: bool, again: Again
) -> str | None:
    """Do what a whole message's chain left (:class:`Again`) step by step."""
    if again is Again.RECREATE:
        await _create(ring, steps.tmp)
        steps.tmp.size = 0
    return await _write_and_publish(ring, steps, data, sync_new)


#: A whole message's link results that have it written again and published step by step.
_WRITE_AGAIN = frozenset({-errno.EEXIST, *(-e for e in NO_LINKS)})
FOREIGN: set[str] = set()  # maildirs of another user (root only): the thread step's
_FOREIGN_MAX = 1024


async def finish(
    ring: Ring, steps: Steps, chunks: list[bytes | memoryview], sync_new: bool
) -> str | None:
    """``Steps.finish`` for a message whose file is open (earlier batches written).

    Return the published name, or None where only the thread step can publish it (a
    filesystem without hard links): the message is then written and synced, not linked.
    """
    tmp = steps.tmp
    data = [c for c in (*chunks, steps.tail(tmp.size + sum(map(len, chunks)))) if len(c)]
    return await _write_and_publish(ring, steps, data, sync_new)


async def _write_and_publish(
    ring: Ring, steps: Steps, data: list[bytes | memoryview], sync_new: bool
) -> str | None:
    """Append *data* (the transform's tail included), fsync the file, publish it."""
    tmp = steps.tmp
    await _append(ring, tmp, data)
    if tmp.settings.fsync:
        (result,) = await ring.submit([ops.fsync(tmp.fd)])
        if result < 0:
            raise error(result)
    if tmp.aborted:
        raise Aborted  # cancelled while writing or syncing: never publish after that
    return await _publish(ring, steps, sync_new)


def _link_ops(tmp: DeliveryFiles, final: str, sync_dest: bool) -> list[ops.Op]:
    """Return the chain that links the file as *final*, then fsyncs and checks the
    destination (*sync_dest*: the xfs check, see ``_uring_steps``)."""
    src: bytes | str
    if _PROC_FD:
        src, src_dir, flags = b"/proc/self/fd/%d" % tmp.fd, abi.AT_FDCWD, abi.AT_SYMLINK_FOLLOW
    else:  # pragma: no cover - every CI host has /proc
        src, src_dir, flags = str(tmp.tmp_name), tmp.tmp_fd, 0
    chain = [ops.linkat(src_dir, src, tmp.dest_fd, ops.fspath(final), flags)]
    if sync_dest:
        chain += [ops.fsync(tmp.dest_fd), ops.statx(tmp.dest_fd, "", abi.AT_EMPTY_PATH)]
    return chain


async def _publish(ring: Ring, steps: Steps, sync_new: bool) -> str | None:
    """Link the written, synced file under a free name, close it and remove its tmp name;
    None: no hard links here."""
    tmp = steps.tmp
    base = str(tmp.tmp_name)
    sync_dest = sync_new and tmp.settings.fsync
    for _ in range(_NAME_TRIES):
        final = steps.name_for(base, tmp.size)
        results = await ring.submit(_link_ops(tmp, final, sync_dest))
        if results[0] != -errno.EEXIST:
            break
        base = new_name()
    else:
        raise no_free_name(tmp, tmp.subdir)
    if -results[0] in NO_LINKS:
        return None
    if results[0] < 0:
        raise error(results[0], f"/proc/self/fd/{tmp.fd}", None, final)
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
