"""A prototype delivery of one small message on the io_uring driver, with group commit.

Phase 1 of the io_uring backend: it proves the driver carries the engine's protocol
(``DESIGN.md``) in the same steps and order, from the event loop's thread, with no worker
thread. Per message:

1. ``openat2(tmp/, name, O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW, 0600,
   RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)`` (``openat`` where the kernel lacks openat2) into a
   direct-descriptor slot, relative to ``tmp/`` opened ``O_DIRECTORY|O_NOFOLLOW``;
2. ``write`` with ``RWF_SYNC``: the data and the inode are durable when it completes. This
   replaces ``fsync(file)`` only because the whole message is this one write. A failed or
   short write severs the chain, so nothing after it runs on a partial file;
3. ``linkat(tmp/name, new/name)``, never clobbering (``EEXIST``);
4. ``unlinkat(tmp/name)`` and 5. the close of the slot;
6. ``fsync(new/)``: in the same chain when no other delivery is in flight; otherwise shared
   (group commit): one fsync started after a link completed covers it and every other link
   completed before it started. The caller returns only after that fsync.

All six go in one chain, one submission per message. A failed linkat does NOT
sever a chain, so 4 removes the tmp file whether or not 3 published it: the delivery checks
3's result, and on ``EEXIST`` delivers again under a new name from the bytes it still holds
(a failed link never leaves a half-done delivery behind). The file has no ``/proc/self/fd``
path in a slot, so it is linked by its tmp name (the engine's fallback where ``/proc`` is
missing).

Not yet here (phase 2, behind the engine's backend interface): streaming (a separate fsync),
``max_size``, quota, flags, folders, the xfs ``fstat`` check after a directory fsync.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
from collections.abc import Callable

from . import _uring_abi as abi
from . import _uring_ops as ops
from ._uring import Ring
from ._writer import DIR_FLAGS, FILE_FLAGS, new_name

__all__ = ["GroupSync", "UringMaildir"]

#: Names tried when linkat reports EEXIST before giving up.
NAME_TRIES = 100
# A direct descriptor has no close-on-exec flag: the kernel refuses O_CLOEXEC with a slot.
_SLOT_FLAGS = FILE_FLAGS & ~os.O_CLOEXEC
_RESOLVE = abi.RESOLVE_BENEATH | abi.RESOLVE_NO_SYMLINKS


def _error(result: int, what: str) -> OSError:
    return OSError(-result, f"{os.strerror(-result)}: {what}")


class GroupSync:
    """Share ``fsync(dir)`` between concurrent deliveries (group commit).

    :meth:`wait` returns once an fsync of the directory that started after the call has
    succeeded, so it covers every link its caller completed before calling.
    """

    def __init__(self, ring: Ring, fd: int) -> None:
        self._ring, self._fd = ring, fd
        self._running = False
        self._waiting: list[asyncio.Future[None]] = []
        #: Directory fsyncs started, and deliveries they covered (``covered / syncs`` > 1:
        #: group commit at work).
        self.syncs = self.covered = 0

    async def wait(self) -> None:
        """Return after an fsync of the directory that started after this call.

        **Cancellation:** the caller is released; the fsync runs on for the others.
        """
        self.covered += 1
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        if not self._running:  # else the running fsync may predate our link: the next one
            self._start()
        await future

    def _start(self) -> None:
        covered, self._waiting = self._waiting, []
        self._running = True
        self.syncs += 1
        self._ring.queue([ops.fsync(self._fd)], functools.partial(self._synced, covered))

    def _synced(self, covered: list[asyncio.Future[None]], results: list[int]) -> None:
        self._running = False
        for future in covered:
            if future.cancelled():
                continue
            if results[0] < 0:
                future.set_exception(_error(results[0], "fsync(new/)"))
            else:
                future.set_result(None)
        if self._waiting:
            self._start()


class UringMaildir:
    """A maildir's ``tmp/`` and ``new/`` fds on a ring, and their group commit."""

    def __init__(self, ring: Ring, tmp_fd: int, new_fd: int) -> None:
        self.ring, self.tmp_fd, self.new_fd = ring, tmp_fd, new_fd
        self.group = GroupSync(ring, new_fd)
        self._active = 0

    @classmethod
    def open(cls, ring: Ring, path: str | os.PathLike[str]) -> UringMaildir:
        """Open the existing maildir at *path* (its ``tmp/`` and ``new/``, symlinks refused)."""
        root = os.open(path, DIR_FLAGS)
        try:
            tmp_fd = os.open("tmp", DIR_FLAGS, dir_fd=root)
            try:
                new_fd = os.open("new", DIR_FLAGS, dir_fd=root)
            except BaseException:
                os.close(tmp_fd)
                raise
        finally:
            os.close(root)
        return cls(ring, tmp_fd, new_fd)

    def close(self) -> None:
        """Close the directory fds (once the ops in flight that use them have completed)."""
        self.ring.close_fd(self.tmp_fd)
        self.ring.close_fd(self.new_fd)

    async def deliver(self, data: bytes) -> str:
        """Deliver *data* durably into ``new/``; return its file name.

        Raises:
            OSError: a step failed (with its errno); nothing is left in ``tmp/`` or ``new/``,
                except when the final ``fsync(new/)`` failed: the message is then in ``new/``
                but not known to be durable.

        **Cancellation:** the caller is released at once; the chain in flight runs to its end
        and its completion cleans up (a message already linked stays delivered).
        """
        alone = not self._active
        self._active += 1
        try:
            for _ in range(NAME_TRIES):
                name = new_name()
                results = await self._attempt(name, data, alone)
                if results[2] != -errno.EEXIST:
                    break
            else:
                raise FileExistsError(errno.EEXIST, f"no free name after {NAME_TRIES} tries")
            if not alone or results[5] == -errno.ECANCELED:
                await self.group.wait()
            elif results[5] < 0:
                raise _error(results[5], "fsync(new/)")
            return name
        finally:
            self._active -= 1

    def _open_op(self, name: str, slot: int) -> ops.Op:
        if self.ring.has_openat2:
            return ops.openat2(self.tmp_fd, name, _SLOT_FLAGS, 0o600, resolve=_RESOLVE, slot=slot)
        return ops.openat(self.tmp_fd, name, _SLOT_FLAGS, 0o600, slot=slot)  # pragma: no cover

    def _publish_ops(self, name: str, slot: int) -> list[ops.Op]:
        return [
            ops.linkat(self.tmp_fd, name, self.new_fd, name),
            ops.unlinkat(self.tmp_fd, name),
            ops.close(slot, fixed=True),
        ]

    async def _run(self, chain: list[ops.Op], orphaned: Callable[[list[int]], None]) -> list[int]:
        future = self.ring.submit(chain, orphaned=orphaned)
        try:
            return await future
        except asyncio.CancelledError:
            if not future.cancelled():  # done, but the task was cancelled before it resumed
                orphaned(future.result())
            raise

    async def _attempt(self, name: str, data: bytes, alone: bool) -> list[int]:
        """Run the delivery's chain under *name*; return its results, the link's checked.

        A link that failed with EEXIST is returned (the chain removed the tmp file); any other
        failure is raised after cleanup.
        """
        slot = self.ring.take_slot()
        chain = [self._open_op(name, slot)]
        chain.append(ops.write(slot, data, offset=0, rw_flags=abi.RWF_SYNC, fixed=True))
        chain += self._publish_ops(name, slot)
        if alone:
            chain.append(ops.fsync(self.new_fd))
        results = await self._run(chain, functools.partial(self._orphaned, slot, name))
        if results[0] < 0:
            self.ring.give_slot(slot)
            raise _error(results[0], f"openat(tmp/{name})")
        if 0 <= results[1] < len(data):  # a short write severed the chain: finish it
            try:
                await self._finish_write(slot, name, data, results[1])
            except BaseException:
                self._cleanup(slot, name)
                raise
            published = self._publish_ops(name, slot)
            orphaned = functools.partial(self._orphaned, slot, name)
            results[2:5] = await self._run(published, lambda r: orphaned([0, 0, *r]))
        elif results[1] < 0:
            self._cleanup(slot, name)
            raise _error(results[1], f"write(tmp/{name})")
        self.ring.give_slot(slot)  # the chain closed it
        if results[2] not in (0, -errno.EEXIST):
            raise _error(results[2], f"linkat(tmp/{name}, new/{name})")
        return results

    async def _finish_write(self, slot: int, name: str, data: bytes, written: int) -> None:
        # A short write is a positive result that severed the chain: write the rest, each
        # part with RWF_SYNC (it syncs what it wrote; the earlier parts are already synced).
        while 0 <= written < len(data):
            part = ops.write(
                slot, data[written:], offset=written, rw_flags=abi.RWF_SYNC, fixed=True
            )
            (result,) = await self.ring.submit([part])
            if result == 0:
                raise OSError(errno.EIO, f"write(tmp/{name}) wrote nothing")
            written = result if result < 0 else written + result
        if written < 0:
            raise _error(written, f"write(tmp/{name})")

    def _cleanup(self, slot: int, name: str) -> None:
        """Remove the tmp file and free its slot (in the background: nothing waits on it)."""
        self.ring.queue([ops.unlinkat(self.tmp_fd, name)], lambda _: None)
        self.ring.queue([ops.close(slot, fixed=True)], lambda _: self.ring.give_slot(slot))

    def _orphaned(self, slot: int, name: str, results: list[int]) -> None:
        # The caller was cancelled while a chain ran; its completion cleans up. A message
        # whose link succeeded is delivered; a chain that reached the close removed its tmp.
        if results[0] < 0 or results[4] != -errno.ECANCELED:
            self.ring.give_slot(slot)
        else:
            self._cleanup(slot, name)
