"""A prototype delivery of one small message on the io_uring driver, with group commit.

Phase 1 of the io_uring backend: it proves the driver carries the engine's protocol
(``DESIGN.md``) in the same steps and order, from the event loop's thread, with no worker
thread. Per message:

1. ``openat2(tmp/, name, O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW, 0600,
   RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)`` (``openat`` where the kernel lacks openat2) into a
   direct-descriptor slot, relative to ``tmp/`` opened ``O_DIRECTORY|O_NOFOLLOW``; linked to
2. ``write`` with ``RWF_SYNC``: the data and the inode are durable when it completes. This
   replaces ``fsync(file)`` only because the whole message is this one write. A failed or
   short write severs the chain, so 3 does not run on a partial file; linked to
3. ``linkat(tmp/name, new/name)``: a failed linkat does NOT sever a chain, so nothing that
   must not follow a failed link is chained after it; ``EEXIST`` picks a new name (never
   clobbers). The file has no ``/proc/self/fd`` path in a slot, so it is linked by its tmp
   name (the engine's fallback where ``/proc`` is missing).
4. ``unlinkat(tmp/name)`` and the close of the slot.
5. ``fsync(new/)``: chained after 3 when no other delivery is in flight; otherwise shared
   (group commit): one fsync started after a link completed covers it and every other link
   completed before it started. The caller returns only after that fsync.

Not yet here (phase 2, behind the engine's backend interface): streaming (a separate fsync),
``max_size``, quota, flags, folders, the xfs ``fstat`` check after a directory fsync.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os

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
        self._running: asyncio.Future[None] | None = None
        self._next: asyncio.Future[None] | None = None
        #: Directory fsyncs started, and deliveries they covered (``covered / syncs`` > 1:
        #: group commit at work).
        self.syncs = self.covered = 0

    async def wait(self) -> None:
        """Return after an fsync of the directory that started after this call.

        **Cancellation:** the caller is released; the fsync runs on for the others.
        """
        self.covered += 1
        if self._running is None:
            future = self._running = self._start()
        else:  # the running fsync may have started before our link: wait for the next one
            if self._next is None:
                self._next = asyncio.get_running_loop().create_future()
            future = self._next
        await asyncio.shield(future)

    def _start(self) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        self.syncs += 1
        self._ring.queue([ops.fsync(self._fd)], functools.partial(self._synced, future))
        return future

    def _synced(self, future: asyncio.Future[None], results: list[int]) -> None:
        if results[0] < 0:
            future.set_exception(_error(results[0], "fsync(new/)"))
            future.exception()  # retrieved here: cancelled waiters must not leave it unread
        else:
            future.set_result(None)
        self._running = None
        if self._next is not None:
            waiting, self._next = self._next, None
            self._running = waiting
            self.syncs += 1
            self._ring.queue([ops.fsync(self._fd)], functools.partial(self._synced, waiting))


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
        slot = self.ring.take_slot()
        alone = not self._active
        self._active += 1
        try:
            return await self._deliver(slot, new_name(), data, alone)
        finally:
            self._active -= 1

    def _open_op(self, name: str, slot: int) -> ops.Op:
        if self.ring.has_openat2:
            return ops.openat2(self.tmp_fd, name, _SLOT_FLAGS, 0o600, resolve=_RESOLVE, slot=slot)
        return ops.openat(self.tmp_fd, name, _SLOT_FLAGS, 0o600, slot=slot)  # pragma: no cover

    async def _deliver(self, slot: int, name: str, data: bytes, alone: bool) -> str:
        chain = [
            self._open_op(name, slot),
            ops.write(slot, data, offset=0, rw_flags=abi.RWF_SYNC, fixed=True),
            ops.linkat(self.tmp_fd, name, self.new_fd, name),
        ]
        if alone:
            chain.append(ops.fsync(self.new_fd))
        orphaned = functools.partial(self._orphaned, slot, name)
        first = self.ring.submit(chain, orphaned=orphaned)
        try:
            results = await first
        except asyncio.CancelledError:
            if not first.cancelled():  # done, but the task was cancelled before it resumed
                orphaned(first.result())
            raise
        if results[0] < 0:
            self.ring.give_slot(slot)
            raise _error(results[0], f"openat(tmp/{name})")
        try:
            await self._finish_write(slot, name, data, results[1])
            final = await self._publish(name, results[2])
        except BaseException:
            self._cleanup(slot, name)
            raise
        synced = alone and results[2] == 0  # the chained fsync(new/) ran after this link
        if synced and results[3] < 0:
            self._cleanup(slot, name)
            raise _error(results[3], "fsync(new/)")
        unlinked = self.ring.submit([ops.unlinkat(self.tmp_fd, name)])
        self.ring.queue([ops.close(slot, fixed=True)], lambda _: self.ring.give_slot(slot))
        if not synced:
            await self.group.wait()
        await unlinked
        return final

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

    async def _publish(self, name: str, result: int) -> str:
        # ECANCELED: the link was severed by a short write that has now been completed.
        final = name
        for _ in range(NAME_TRIES):
            if result == 0:
                return final
            if result not in (-errno.EEXIST, -errno.ECANCELED):
                raise _error(result, f"linkat(tmp/{name}, new/{final})")
            if result == -errno.EEXIST:
                final = new_name()
            link = ops.linkat(self.tmp_fd, name, self.new_fd, final)
            (result,) = await self.ring.submit([link])
        raise FileExistsError(errno.EEXIST, f"no free name in new/ after {NAME_TRIES} tries")

    def _cleanup(self, slot: int, name: str) -> None:
        """Remove the tmp file and free its slot (in the background: nothing waits on it)."""
        self.ring.queue([ops.unlinkat(self.tmp_fd, name)], lambda _: None)
        self.ring.queue([ops.close(slot, fixed=True)], lambda _: self.ring.give_slot(slot))

    def _orphaned(self, slot: int, name: str, results: list[int]) -> None:
        # The caller was cancelled while the first chain ran; its completion cleans up. A
        # message whose link succeeded is delivered: only its tmp name goes.
        if results[0] < 0:
            self.ring.give_slot(slot)
        else:
            self._cleanup(slot, name)
