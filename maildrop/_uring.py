"""maildrop's io_uring driver: one ring over the kernel ABI, its queues and its safety rules.

It owns every lifetime (why our own driver: README, "io_uring"): an ``Op`` holds its paths and
buffers until its completion is reaped. Only ``ctypes`` and ``mmap``: no compiler, no dependency.

Rules, each applied where the comment names it (checked on kernel 6.18, see tests/test_uring.py):

- Memory ordering: x86-64 keeps stores in order and loads in order, so writing an entry then
  the shared tail (and reading a tail then its entries) needs no fence; the driver refuses
  every other architecture (:func:`availability`).
- Chains (``IOSQE_IO_LINK``): a failing fsync, sync_file_range, linkat, unlinkat, renameat2 or
  statx does NOT sever a chain; a failing or short write, openat or close does (a short write
  is a positive result: compare it with the length). Callers check every result and never put
  an op after one of the non-severing ones unless it may run when that one failed.
- Quiet ops (``IOSQE_CQE_SKIP_SUCCESS``) post no completion on success, and after one fails
  none is posted for the rest of its chain: counting completions cannot find a chain's end.
  Only ops whose success value is known and whose failure severs are made quiet
  (``Op.success``); fsync/linkat/unlinkat/renameat2 never (an EEXIST link would look like
  a success), nor a chain's last op. A chain ends at its last op's completion or a quiet op's
  (``reap``); every result is then known.
- Submission space for a whole chain is reserved before any of it is written; ops in flight
  never exceed the completion ring's size; an overflow is still flushed after every drain
  (``reap``), or the eventfd would stop firing; no ``IORING_SETUP_DEFER_TASKRUN`` (starves it).
- Fork: rings are mapped ``MADV_DONTFORK``; a child forgets each inherited ring (at fork)
  without reaping, ``remove_reader`` or munmap: it may have reused the range (SIGSEGV).
- A process fd used by an op in flight is closed only after its chain ends (``close_fd``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import errno
import functools
import mmap
import os
import weakref
from collections import deque
from collections.abc import Sequence

from . import _uring_abi as abi
from . import _uring_setup as setup
from ._uring_chain import Chain, Done
from ._uring_hooks import Hooks
from ._uring_ops import Op, severs
from ._uring_setup import Availability, UringUnavailableError

__all__ = ["Availability", "Ring", "UringUnavailableError", "availability"]

_U32 = 0xFFFF_FFFF
_RINGS: weakref.WeakSet[Ring] = weakref.WeakSet()
_INHERITED: list[tuple[mmap.mmap, ...]] = []  # a forked child's ring maps (Ring._forget)
_LINK_QUIET = abi.IOSQE_IO_LINK | abi.IOSQE_CQE_SKIP_SUCCESS
_SQE_SIZE, _CQE_SIZE = abi.SQE.size, abi.CQE.size
_PACK, _U64 = abi.SQE.pack_into, abi.U64


@functools.cache
def availability() -> Availability:
    """Return whether io_uring works in this process (probed once: opens a tiny ring)."""
    return setup.probe(lambda: Ring.open(entries=2, slots=0))


class Ring:
    """One io_uring instance: queue ops and chains, submit once per loop turn, reap on eventfd.

    Open it with :meth:`open`; :meth:`attach` it to an asyncio loop to use :meth:`submit`, or
    drive it synchronously with :meth:`run`. Not thread-safe: one thread (the loop's) uses it.
    """

    def __init__(self, fd: int, params: abi.Params, maps: tuple[mmap.mmap, ...], efd: int) -> None:
        self._fd, self._efd, self._maps = fd, efd, maps
        sq, cq, self._sqes = maps
        so, co = params.sq_off, params.cq_off
        self._sq_entries, self.max_inflight = params.sq_entries, params.cq_entries
        self._max_chain = min(self._sq_entries, self.max_inflight)
        self._sq_khead = ctypes.c_uint32.from_buffer(sq, so.head)
        self._sq_ktail = ctypes.c_uint32.from_buffer(sq, so.tail)
        self._sq_flags = ctypes.c_uint32.from_buffer(sq, so.flags)
        self._sq_mask = ctypes.c_uint32.from_buffer(sq, so.ring_mask).value
        self._cq_khead = ctypes.c_uint32.from_buffer(cq, co.head)
        self._cq_ktail = ctypes.c_uint32.from_buffer(cq, co.tail)
        self._cq_mask = ctypes.c_uint32.from_buffer(cq, co.ring_mask).value
        self._cq, self._cqes = cq, co.cqes
        self._tail, self._cq_head = self._sq_ktail.value, self._cq_khead.value
        self._unsubmitted, self._seq, self._next_ud = 0, 0, 1
        self._pending: deque[Chain] = deque()
        self._inflight: dict[int, tuple[Chain, int]] = {}
        self._fd_users: dict[int, int] = {}  # not a Counter: its update() is slow (hot path)
        self._close_later: set[int] = set()
        self.free_slots: list[int] = []  # direct-descriptor slots (take_slot, give_slot)
        self._loop: weakref.ref[asyncio.AbstractEventLoop] | None = None  # weak: see attach()
        self._flush_scheduled = self._closed = self._forked = self.has_openat2 = False
        self.hooks: Hooks | None = None
        #: io_uring_enter calls, eventfd wake-ups, completions reaped (for the benchmarks).
        self.enters = self.wakeups = self.completions = 0
        self._quiet_ok = bool(params.features & abi.FEAT_CQE_SKIP)
        _RINGS.add(self)

    @classmethod
    def open(
        cls, entries: int = 256, *, slots: int = 1024, workers: int = 0, hooks: Hooks | None = None
    ) -> Ring:
        """Set up a ring of *entries* submission and *slots* direct-descriptor slots, with at
        most *workers* bounded io-wq workers (0: the kernel's default).

        Raises:
            UringUnavailableError: the kernel, its settings or a seccomp filter forbid it, or
                it lacks an op the driver needs.
        """
        fd, params, maps = setup.create(entries)
        try:
            ring = cls(fd, params, maps, os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        except BaseException:
            setup.discard(fd, maps)
            raise
        try:
            ring.has_openat2 = setup.check_ops(fd)
            if workers:
                setup.max_workers(fd, workers)
            abi.register(fd, abi.REGISTER_EVENTFD, ctypes.c_int(ring._efd), 1)
            if slots:
                abi.register(fd, abi.REGISTER_FILES, (ctypes.c_int * slots)(*[-1] * slots), slots)
                ring.free_slots = list(range(slots - 1, -1, -1))
        except BaseException:
            ring.close()
            raise
        ring.hooks = hooks
        return ring

    def take_slot(self) -> int:
        """Return a free direct-descriptor slot (give it back with :meth:`give_slot`)."""
        if not self.free_slots:
            raise OSError(errno.EMFILE, "every direct-descriptor slot of the ring is in use")
        return self.free_slots.pop()

    def give_slot(self, slot: int) -> None:
        """Return *slot* to the free list (it must be empty: never opened, or closed)."""
        self.free_slots.append(slot)

    def close_fd(self, fd: int) -> None:
        """Close process fd *fd* now, or once the last op in flight that uses it completes."""
        if self._fd_users.get(fd):
            self._close_later.add(fd)
        else:
            os.close(fd)

    # -- submission -----------------------------------------------------------------------
    def queue(self, ops: Sequence[Op], done: Done, *, linked: bool = True) -> None:
        """Queue *ops* as one chain; call ``done(results)`` once every op has a result.

        Each result is the op's completion (``-errno`` on failure); an op that did not run
        because an earlier one severed the chain reports ``-ECANCELED``. With *linked* False
        the ops are independent (no ``IOSQE_IO_LINK``: they may run concurrently, none
        cancels another); ``done`` runs once all of them completed.
        """
        if self._closed:
            why = "was inherited across fork" if self._forked else "is closed"
            raise RuntimeError(f"this io_uring ring {why}; open a new one")
        if not 0 < len(ops) <= self._max_chain:
            raise ValueError(f"a chain holds 1 to {self._max_chain} ops, not {len(ops)}")
        users = self._fd_users
        for op in ops:
            for fd in op.fds:
                users[fd] = users.get(fd, 0) + 1
        self._pending.append(Chain(list(ops), done, linked))
        self._kick()

    def _live_loop(self) -> asyncio.AbstractEventLoop | None:
        return None if self._loop is None else self._loop()

    def _kick(self) -> None:
        # One io_uring_enter per loop iteration: every chain queued in this turn goes together.
        if self._flush_scheduled or self._loop is None:
            return
        loop = self._loop()
        if loop is not None:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._closed:
            self._fill()
            self._enter(0)
            self.reap()  # completions that are already there save a wake-up through the eventfd

    def _fill(self) -> None:
        pending = self._pending
        while pending:
            chain = pending[0]
            count = chain.count - chain.next
            free = self._sq_entries - ((self._tail - self._sq_khead.value) & _U32)
            if count > free or len(self._inflight) + count > self.max_inflight:
                return  # the whole rest of the chain, or nothing: see the module's rules
            self._write(chain)  # a hook that raises there leaves the chain queued
            if chain.linked or chain.next == chain.count:
                pending.popleft()

    def _write(self, chain: Chain) -> None:
        ops, hooks, inflight = chain.ops, self.hooks, self._inflight
        uds, quiets, seq, ud = chain.uds, chain.quiet, self._seq, self._next_ud
        last, i, tail = chain.count - 1, chain.next, self._tail
        sqes, mask, quiet_ok = self._sqes, self._sq_mask, self._quiet_ok
        # With hooks, each op goes alone after its predecessor completed (reap applies the
        # kernel's severing rules), so "stop before op N" means ops before it are done.
        linked = chain.linked and hooks is None
        chain.start = i
        while True:
            op = ops[i]
            op.seq = seq
            if hooks is not None:
                op = chain.inject(i, op, hooks)  # may raise: this op then keeps its number
            seq, ud = seq + 1, ud + 1
            link = i < last and linked
            quiet = link and quiet_ok and op.success is not None
            inflight[ud] = (chain, i)
            uds[i], quiets[i] = ud, quiet
            flags = _LINK_QUIET if quiet else abi.IOSQE_IO_LINK if link else 0
            if op.fixed:
                flags |= abi.IOSQE_FIXED_FILE
            # put(), inline: one entry per op of every delivery
            _PACK(sqes, (tail & mask) * _SQE_SIZE, op.opcode, flags, 0, op.fd,
                  op.addr2 & _U64, op.addr, op.length, op.op_flags, ud, 0, 0, op.file_index,
                  op.addr3, 0)  # fmt: skip
            tail, i = tail + 1, i + 1
            if i > last or hooks is not None:  # a linked chain's ops go together, or alone
                break
        self._seq, self._next_ud, self._unsubmitted = seq, ud, self._unsubmitted + i - chain.next
        chain.next, self._tail = i, tail
        self._sq_ktail.value = tail & _U32  # after the entries: x86-64 keeps stores in order

    def _enter(self, wait: int) -> None:
        if not self._unsubmitted and not wait:
            return
        flags = abi.ENTER_GETEVENTS if wait else 0
        self.enters += 1
        self._unsubmitted -= abi.enter(self._fd, self._unsubmitted, wait, flags)

    # -- completion -----------------------------------------------------------------------
    def reap(self) -> int:
        """Handle every completion in the ring; return how many there were."""
        handled, inflight, canceled = 0, self._inflight, -errno.ECANCELED
        cq, cqes, mask, unpack = self._cq, self._cqes, self._cq_mask, abi.CQE.unpack_from
        while True:
            head, tail = self._cq_head, self._cq_ktail.value
            while head != tail:
                ud, result, _ = unpack(cq, cqes + (head & mask) * _CQE_SIZE)
                head = (head + 1) & _U32
                self._cq_head = self._cq_khead.value = head  # before the callback: it may raise
                handled += 1
                # One completion (inline: a call fewer for each op of every delivery).
                chain, i = inflight.pop(ud)
                if chain.injected is not None and i in chain.injected and result != canceled:
                    result = chain.injected[i]
                chain.results[i], chain.reported[i] = result, True
                if not chain.linked:
                    chain.left -= 1
                    if not chain.left:
                        self._finish(chain)
                # Completions come in chain order. The part in the kernel ends with its
                # last op, or a quiet op that reports: it failed (or wrote short), the rest
                # is cancelled silently; one reporting ECANCELED was cancelled by a
                # reporting op's failure, after which every op reports.
                elif i == chain.next - 1 or (chain.quiet[i] and result != canceled):
                    self._end_part(chain, i)
                if self.hooks is not None:  # last: a hook that raises leaves the ring sound
                    self.hooks.after_reap(chain.ops[i], result)
            if not self._sq_flags.value & abi.SQ_CQ_OVERFLOW:
                break
            abi.enter(self._fd, 0, 0, abi.ENTER_GETEVENTS)  # move parked completions into the ring
        if self._pending:
            self._kick()
        self.completions += handled
        return handled

    def _end_part(self, chain: Chain, stop: int) -> None:
        if True in chain.quiet:  # else every op of the part reported: nothing to settle
            for j in chain.settle(stop):  # quiet ops, which report nothing on success
                del self._inflight[chain.uds[j]]
        # The rest of the chain waits for this op (hooks) unless this one severed it.
        if chain.next < chain.count and not severs(chain.ops[stop], chain.results[stop]):
            self._pending.appendleft(chain)
            self._kick()
            return
        self._finish(chain)

    def _finish(self, chain: Chain) -> None:
        """Release the process fds of the ended *chain*'s ops, then call its callback."""
        users = self._fd_users
        for op in chain.ops:
            for fd in op.fds:
                users[fd] -= 1
                if not users[fd]:
                    del users[fd]
                    if fd in self._close_later:
                        self._close_later.discard(fd)
                        os.close(fd)
        try:
            chain.done(chain.results)
        except Exception as exc:
            chain.failed(exc, self._loop)

    # -- driving it -----------------------------------------------------------------------
    def run(self, ops: Sequence[Op]) -> list[int]:
        """Submit *ops* as a chain and block until it is done; return the results."""
        box: list[list[int]] = []
        self.queue(ops, box.append)
        while not box:
            self._fill()
            self._enter(1)
            self.reap()
        return box[0]

    def drain(self) -> None:
        """Submit everything queued and block until every op has completed."""
        while self._pending or self._inflight:
            self._fill()
            self._enter(1)
            self.reap()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reap on *loop* (an eventfd reader) and flush submissions once per loop iteration
        (held weakly: a ring kept per loop must not keep a closed loop alive)."""
        self._loop = weakref.ref(loop)
        # In an empty context: the handle lives as long as the loop (see _pool._Wakeup).
        contextvars.Context().run(loop.add_reader, self._efd, self._on_eventfd)

    def _on_eventfd(self) -> None:
        self.wakeups += 1
        # BlockingIOError: a flush already reaped what this wake-up announced.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        self.reap()

    def submit(
        self, ops: Sequence[Op], *, orphaned: Done | None = None
    ) -> asyncio.Future[list[int]]:
        """Queue *ops* as a chain; return a future of their results (see :meth:`queue`).

        Cancelling the future releases the waiter only: the chain runs to its end (its
        paths, buffers and fds are released then) and *orphaned*, if given, gets the results.
        """
        loop = self._live_loop()
        if loop is None:
            raise RuntimeError("attach() the ring to an event loop before submit()")
        future: asyncio.Future[list[int]] = loop.create_future()

        def done(results: list[int]) -> None:
            if not future.cancelled():
                future.set_result(results)
            elif orphaned is not None:
                orphaned(results)

        self.queue(ops, done)
        return future

    def close(self) -> None:
        """Run every queued op and wait for every op in flight (blocking: the kernel may
        still read an op's buffers until it completes), then unmap."""
        if self._closed:
            return
        try:
            self.drain()
        finally:
            if (loop := self._live_loop()) is not None and not loop.is_closed():
                loop.remove_reader(self._efd)
            self._drop()

    def _drop(self) -> None:
        self._closed = True
        del self._sq_khead, self._sq_ktail, self._sq_flags, self._cq_khead, self._cq_ktail
        for m in self._maps:
            m.close()
        for fd in (self._fd, self._efd):
            os.close(fd)
        _RINGS.discard(self)

    def _forget(self) -> None:  # pragma: no cover - runs in forked children (os._exit)
        _INHERITED.append(self._maps)  # kept, never closed: see the module's Fork rule
        self._forked, self._maps = True, ()
        self._drop()

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _forget_inherited() -> None:  # pragma: no cover - runs in forked children (os._exit)
    for ring in list(_RINGS):
        ring._forget()


if hasattr(os, "register_at_fork"):  # pragma: no branch - only Windows lacks it (no fork)
    os.register_at_fork(after_in_child=_forget_inherited)
