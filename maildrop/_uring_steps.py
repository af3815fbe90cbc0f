"""The engine's own steps as io_uring chains: the io_uring backend's half of ``_steps``.

The protocol and its order are the worker-side steps' (``_writer`` explains them); what the
ring changes, and why it is safe:

* Directories: ``tmp/`` and the destination are opened together by their whole paths with
  ``openat2(RESOLVE_NO_SYMLINKS)``, refusing a symlink anywhere on the path. Anything unusual
  (a directory to create, a symlink or file to report, a symlink above the maildir, a
  directory another delivery of this process has not made durable yet, a maildir of another
  user while running as root) is left to the thread step, which handles it with the same code
  and the same errors.
* The tmp file is opened ``O_CREAT|O_EXCL|O_NOFOLLOW`` (and ``RESOLVE_BENEATH|
  RESOLVE_NO_SYMLINKS``) into a direct-descriptor slot of the ring, so one chain opens, writes
  and links it. A slot has no ``/proc/self/fd`` path, so the file is linked by its tmp name,
  the engine's fallback where ``/proc`` is missing. KNOWN DEFECT: a tmp file swapped for a
  symlink or a hard link between the write and the link is published as that (the thread
  step links the fd it wrote); ``tests/crash/test_uring_hostile.py`` holds it as a strict
  xfail, and the README warns. The fix is to link from a process fd as ``_uring_stream``
  does (the caller of ``finish`` in ``_uring_backend`` can route through it).
* Durability: when the whole message is one write, it carries ``RWF_SYNC`` (a failed or short
  write severs the chain, so nothing links a partial file). Otherwise the file's fsync ends a
  chain of its own, checked before the publish chain: a failed fsync does not sever a chain
  (kernel 6.18), so a link after it would publish unsynced data.
* A failed ``linkat`` does not sever either: the chain's ``unlinkat`` removes the tmp file
  anyway, so on ``EEXIST`` the message is written again under a fresh name from the bytes this
  step still holds (nothing is ever clobbered).
* xfs: ``statx(dest, "", AT_EMPTY_PATH)`` after ``fsync(dest)`` plays ``fstat``'s part.
* Cancellation: a chain cannot be stopped once submitted. A one-step message is opened,
  written, synced and linked by one chain, so a delivery aborted while it is in the kernel
  may still be linked, whole and synced; that link is then kept or removed as for a message
  aborted after its link (``_state.keeps_link``). The abort check that the thread step makes
  between the fsync and the link is made here only where those are separate chains.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
from collections.abc import Sequence

from . import _uring_abi as abi
from . import _uring_ops as ops
from ._dirs import DIR_FLAGS, FILE_FLAGS, creating
from ._steps import Steps
from ._uring import Ring
from ._writer import _NAME_TRIES, LIVE_TMP, Aborted, DeliveryFiles, new_name

__all__ = [
    "close_slot",
    "each",
    "error",
    "finish",
    "no_free_name",
    "open_dirs",
    "open_under",
    "sync_dest",
    "write_rest",
]

# A direct descriptor has no close-on-exec flag: the kernel refuses O_CLOEXEC with a slot.
_SLOT_FLAGS = FILE_FLAGS & ~os.O_CLOEXEC
_RESOLVE = abi.RESOLVE_BENEATH | abi.RESOLVE_NO_SYMLINKS
_NO_LINKS = abi.RESOLVE_NO_SYMLINKS
_IOV_MAX = 1024
Chunks = Sequence[bytes | memoryview]


def error(result: int, *names: str | None) -> OSError:
    """Return the ``OSError`` that ``os`` raises for *result* (``-errno``) on *names*."""
    return OSError(-result, os.strerror(-result), *names)


def open_under(ring: Ring, dir_fd: int, name: str, flags: int, slot: int | None = None) -> ops.Op:
    mode = 0o600 if flags & os.O_CREAT else 0  # openat2 refuses a mode without O_CREAT
    if ring.has_openat2:
        return ops.openat2(dir_fd, name, flags, mode, resolve=_RESOLVE, slot=slot)
    return ops.openat(dir_fd, name, flags | os.O_NOFOLLOW, mode, slot=slot)  # pragma: no cover


def each(ring: Ring, chain: list[ops.Op]) -> asyncio.Future[list[int]]:
    """Submit each op of *chain* on its own (they run concurrently); a future of the results."""
    future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
    results = [0] * len(chain)
    left = [len(chain)]

    def done(i: int, result: list[int]) -> None:
        results[i] = result[0]
        left[0] -= 1
        if not left[0] and not future.cancelled():
            future.set_result(results)

    for i, op in enumerate(chain):
        ring.queue([op], functools.partial(done, i))
    return future


async def open_dirs(ring: Ring, tmp: DeliveryFiles) -> bool:
    """Open the maildir's ``tmp/`` and destination directories on *ring*, in one round trip.

    Both are opened by their whole path with ``RESOLVE_NO_SYMLINKS``: no component of it may be
    a symlink, which covers the thread step's rule (the maildir, its folder, ``tmp/`` and the
    destination are never followed) and more. Return False, with nothing left open, where the
    thread step must do it: a path with a symlink above the maildir (``ELOOP``), a missing
    directory, another owner (see the module), a directory not durable yet.
    """
    cfg = tmp.settings
    if not ring.has_openat2:  # pragma: no cover - kernels before 5.6
        return False
    chain = [
        ops.openat2(abi.AT_FDCWD, os.path.join(cfg.path, sub), DIR_FLAGS, 0, resolve=_NO_LINKS)
        for sub in ("tmp", tmp.subdir)
    ]
    root = os.geteuid() == 0  # then what it creates must be the maildir owner's: see _dirs
    if root:
        chain.append(ops.statx(abi.AT_FDCWD, cfg.root, abi.AT_SYMLINK_NOFOLLOW))
    results = await each(ring, chain)
    tmp.dir_fds += [r for r in results[:2] if r >= 0]
    ok = min(results) >= 0 and not (cfg.fsync and creating())
    if ok and root and ops.statx_result(chain[2]).uid != 0:
        ok = False
    if ok:
        tmp.tmp_fd, tmp.dest_fd = results[0], results[1]
        return True
    tmp.close_dirs()
    return False


def _writes(slot: int, data: Chunks, sync: bool) -> list[ops.Op]:
    """Return the writes of *data* from offset 0 (``RWF_SYNC`` when *sync* and they are one)."""
    groups = [data[i : i + _IOV_MAX] for i in range(0, len(data), _IOV_MAX)]
    flags = abi.RWF_SYNC if sync and len(groups) == 1 else 0
    out, offset = [], 0
    for group in groups:
        out.append(ops.writev(slot, group, offset=offset, rw_flags=flags, fixed=True))
        offset += out[-1].expect
    return out


def _written(writes: list[ops.Op], results: list[int]) -> int:
    """Return the bytes *writes* wrote (they stop at a short one); raise a failed one's error."""
    done = 0
    for op, result in zip(writes, results, strict=True):
        if result < 0:
            raise error(result)
        done += result
        if result < op.expect:
            break
    return done


async def write_rest(
    ring: Ring, fd: int, data: Chunks, done: int, *, slot: bool, at: int = 0
) -> None:
    """Write *data* from byte *done* on, looping on short writes (as ``write_all`` does), at
    explicit offsets: *data* starts at offset *at* of the file (a slot's file: 0).

    Never at the file position (offset -1): after a short write on the ring (kernel 6.18,
    tmpfs filling up) the position had not moved, so the rest went over the start of the
    file and a truncated, scrambled message was published
    (``tests/crash/test_diskfull.py``, 4MiB-streamed). A caller that shares the fd with
    thread steps moves its position itself.
    """
    views: list[memoryview] = []
    for chunk in data:
        view = memoryview(chunk).cast("B")
        views.append(view[done:] if done < len(view) else view[:0])
        done = max(0, done - len(view))
    offset = at + sum(map(len, data)) - sum(map(len, views))
    views = [v for v in views if len(v)]
    while views:
        op = ops.writev(fd, views[:_IOV_MAX], offset=offset, fixed=slot)
        (n,) = await ring.submit([op])
        if n <= 0:
            raise error(n) if n < 0 else OSError(errno.EIO, "write() wrote nothing")
        offset += n
        while n:
            step = min(n, len(views[0]))
            views[0], n = views[0][step:], n - step
            if not len(views[0]):
                views.pop(0)


def _publish_ops(
    tmp: DeliveryFiles, slot: int, base: str, final: str, sync_dir: bool
) -> list[ops.Op]:
    chain = [
        ops.linkat(tmp.tmp_fd, base, tmp.dest_fd, final),
        ops.unlinkat(tmp.tmp_fd, base),
        ops.close(slot, fixed=True),
    ]
    if sync_dir:
        chain += [ops.fsync(tmp.dest_fd), ops.statx(tmp.dest_fd, "", abi.AT_EMPTY_PATH)]
    return chain


def _published(ring: Ring, tmp: DeliveryFiles, final: str, results: list[int]) -> str | None:
    """Check the publish chain's *results*; return the name, or None when it was taken."""
    link, unlink, close = results[:3]
    if close == 0:
        tmp.slot = -1
    base = tmp.tmp_name
    if unlink in (0, -errno.ENOENT):
        LIVE_TMP.discard(str(base))
        tmp.tmp_name = None
    if link == -errno.EEXIST and tmp.tmp_name is None:
        return None  # the chain removed the tmp file: written again under another name
    if link < 0:
        raise error(link, base, None, final)
    tmp.final_name = final
    for result in results[2:]:
        if result < 0:
            raise error(result)
    if tmp.tmp_name is not None:
        raise error(unlink, base)
    return final


async def _attempt(
    ring: Ring, steps: Steps, slot: int, data: Chunks, sync_dir: bool
) -> str | None:
    """Write *data* to a fresh tmp file in *slot* and publish it; None when a name was taken."""
    tmp, fsync = steps.tmp, steps.tmp.settings.fsync
    size = sum(map(len, data))
    base = new_name()
    final = steps.name_for(base, size)
    LIVE_TMP.add(base)  # before the file exists, so a sweep never sees it unowned
    writes = _writes(slot, data, fsync)
    synced = fsync and len(writes) == 1
    head = [open_under(ring, tmp.tmp_fd, base, _SLOT_FLAGS, slot), *writes]
    tail = _publish_ops(tmp, slot, base, final, sync_dir)
    results = await ring.submit(
        head + (tail if synced or not fsync else [ops.fsync(slot, fixed=True)])
    )
    if results[0] < 0:
        LIVE_TMP.discard(base)
        if results[0] == -errno.EEXIST:
            return None
        raise error(results[0], base)
    tmp.slot, tmp.tmp_name = slot, base
    done = _written(writes, results[1 : len(head)])
    if done < size:  # a short write severed the chain: write the rest, then fsync apart
        await write_rest(ring, slot, data, done, slot=True)
        synced = not fsync
    elif fsync and not synced:
        synced = True
        if results[len(head)] < 0:
            raise error(results[len(head)])
    else:
        return _published(ring, tmp, final, results[len(head) :])
    if not synced:
        (result,) = await ring.submit([ops.fsync(slot, fixed=True)])
        if result < 0:
            raise error(result)
    if tmp.aborted:
        raise Aborted  # cancelled while writing or syncing: never publish after that
    return _published(ring, tmp, final, await ring.submit(tail))


async def finish(
    ring: Ring, steps: Steps, chunks: list[bytes | memoryview], sync_new: bool
) -> str | None:
    """``Steps.finish`` for a message written in this one step, on *ring*.

    Return the published name, or None where the thread step must deliver it: nothing was
    done then (the transform's tail, already taken, is appended to *chunks*).
    """
    tmp = steps.tmp
    slot = ring.take_slot() if ring.free_slots else -1
    if slot < 0 or not await open_dirs(ring, tmp):
        if slot >= 0:
            ring.give_slot(slot)
        return None
    try:
        chunks.append(steps.tail(sum(map(len, chunks))))
        data = [c for c in chunks if len(c)]
        sync_dir = sync_new and tmp.settings.fsync
        for _ in range(_NAME_TRIES):
            if tmp.aborted:
                raise Aborted
            final = await _attempt(ring, steps, slot, data, sync_dir)
            if final is not None:
                tmp.size = sum(map(len, data))
                if sync_new:
                    tmp.close_dirs()
                return final
    finally:
        if tmp.slot != slot:  # else the file is still open in it: close_slot frees it
            ring.give_slot(slot)
    raise no_free_name(tmp, tmp.subdir)


def no_free_name(tmp: DeliveryFiles, sub: str) -> FileExistsError:
    """Return the error of a delivery that found every name it tried in *sub* taken."""
    where = os.path.join(tmp.settings.path, sub)
    return FileExistsError(errno.EEXIST, f"could not find a free name in {where}/")


async def sync_dest(ring: Ring, tmp: DeliveryFiles) -> None:
    """``DeliveryFiles.sync_dest`` on *ring*: fsync the destination, then the xfs check."""
    if tmp.settings.fsync:
        chain = [ops.fsync(tmp.dest_fd), ops.statx(tmp.dest_fd, "", abi.AT_EMPTY_PATH)]
        for result in await ring.submit(chain):
            if result < 0:
                raise error(result)


async def close_slot(ring: Ring, tmp: DeliveryFiles) -> None:
    """Close the slot that holds *tmp*'s file, if any (before the thread cleanup runs)."""
    slot, tmp.slot = tmp.slot, -1
    if slot >= 0:
        (result,) = await ring.submit([ops.close(slot, fixed=True)])
        if result == 0:
            ring.give_slot(slot)
