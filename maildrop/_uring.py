"""maildrop's io_uring driver: one ring over the kernel ABI, its queues and its safety rules.

Why our own driver: on a durability-critical path every pointer handed to the kernel must stay
valid until the kernel is done with it, and a binding that keeps no references turns a
forgotten one into files created under garbage names. This driver owns every lifetime: an
:class:`~maildrop._uring_ops.Op` holds its paths and buffers, the ring holds each op from
queueing until its completion is reaped, so callers may drop theirs at once. It uses only
``ctypes`` and ``mmap`` (no compiler, no dependency).

Rules, each applied where the comment names it (checked on kernel 6.18, see tests/test_uring.py):

- Memory ordering: the ring's head and tail are shared with the kernel. x86-64 keeps stores in
  order and loads in order, so writing an entry then its tail (and reading a tail then its
  entries) needs no fence; the driver refuses every other architecture (:func:`availability`).
- Chains (``IOSQE_IO_LINK``): a failing fsync, linkat, unlinkat, renameat2 or statx does NOT
  sever a chain; a failing or short write, openat or close does (a short write is a positive
  result: compare it with the length). Callers check every result and never put an op after
  one of the non-severing ones unless it may run when that one failed.
- Chain ends: after an op flagged ``IOSQE_CQE_SKIP_SUCCESS`` fails, the kernel posts no
  completion for the rest of its chain, so counting completions cannot find a chain's end. The
  driver never sets that flag: every op posts exactly one completion, keyed by its user_data,
  and a chain is done when each of its members has reported.
- Submission space for a whole chain is reserved before any of it is written (a chain split
  across two submissions would run its tail unlinked), and ops in flight never exceed the
  completion ring's size; an overflow is still flushed after every drain (``reap``), or the
  eventfd would stop firing with completions parked in the kernel.
- No ``IORING_SETUP_DEFER_TASKRUN``: with it, completions wait for the next ``io_uring_enter``
  and the eventfd that wakes the loop never fires.
- Fork: the rings are mapped ``MADV_DONTFORK`` and a child forgets every ring it inherited
  (``os.register_at_fork``) without touching it, so it can never reap the parent's completions.
- A process fd used by an op in flight (a directory fd) is closed only after the op completes
  (:meth:`Ring.close_fd`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import mmap
import os
import platform
import sys
import weakref
from collections import Counter, deque
from collections.abc import Callable, Sequence

from . import _uring_abi as abi
from . import _uring_setup as setup
from ._uring_hooks import Hooks
from ._uring_ops import Op, nop, severs
from ._uring_setup import Availability, UringUnavailableError

__all__ = ["Availability", "Ring", "UringUnavailableError", "availability"]

_U32 = 0xFFFF_FFFF
_RINGS: weakref.WeakSet[Ring] = weakref.WeakSet()
Done = Callable[[list[int]], None]
_NOP = nop()


def _probe() -> Availability:
    if sys.platform != "linux":
        return Availability(f"io_uring needs Linux, this is {sys.platform}")
    machine = platform.machine()
    if machine != "x86_64":
        return Availability(
            f"the ring driver relies on x86-64 memory ordering and has no barriers for {machine}"
        )
    try:
        ring = Ring.open(entries=2, slots=0)
    except UringUnavailableError as exc:
        return Availability(str(exc))
    with ring:
        return Availability(None, openat2=ring.has_openat2)


@functools.cache
def availability() -> Availability:
    """Return whether io_uring works in this process (probed once: opens a tiny ring)."""
    return _probe()


class _Chain:
    __slots__ = ("done", "injected", "next", "ops", "outstanding", "results")

    def __init__(self, ops: list[Op], done: Done) -> None:
        self.ops = ops
        self.done = done
        self.results: list[int] = [-errno.ECANCELED] * len(ops)
        self.injected: dict[int, int] = {}
        self.next = 0  # the first op not yet written to the submission queue
        self.outstanding = 0  # ops written whose completion has not been reaped


class Ring:
    """One io_uring instance: queue ops and chains, submit once per loop turn, reap on eventfd.

    Open it with :meth:`open`; :meth:`attach` it to an asyncio loop to use :meth:`submit`, or
    drive it synchronously with :meth:`run`. Not thread-safe: one thread (the loop's) uses it.
    """

    def __init__(self, fd: int, params: abi.Params, maps: tuple[mmap.mmap, ...], efd: int) -> None:
        self._fd, self._efd = fd, efd
        self._maps = maps
        sq, cq, self._sqes = maps
        so, co = params.sq_off, params.cq_off
        self._sq_entries, self.max_inflight = params.sq_entries, params.cq_entries
        self._sq_khead = ctypes.c_uint32.from_buffer(sq, so.head)
        self._sq_ktail = ctypes.c_uint32.from_buffer(sq, so.tail)
        self._sq_flags = ctypes.c_uint32.from_buffer(sq, so.flags)
        self._sq_mask = ctypes.c_uint32.from_buffer(sq, so.ring_mask).value
        self._cq_khead = ctypes.c_uint32.from_buffer(cq, co.head)
        self._cq_ktail = ctypes.c_uint32.from_buffer(cq, co.tail)
        self._cq_mask = ctypes.c_uint32.from_buffer(cq, co.ring_mask).value
        self._cq, self._cqes = cq, co.cqes
        self._tail = self._sq_ktail.value
        self._cq_head = self._cq_khead.value
        self._unsubmitted = 0
        self._seq = 0
        self._next_ud = 1
        self._pending: deque[_Chain] = deque()
        self._inflight: dict[int, tuple[_Chain, int]] = {}
        self._fd_users: Counter[int] = Counter()
        self._close_later: set[int] = set()
        self._free_slots: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self._closed = self._forked = False
        self.hooks: Hooks | None = None
        self.has_openat2 = False
        #: io_uring_enter calls and eventfd wake-ups so far (the benchmarks report them).
        self.enters = self.wakeups = 0
        _RINGS.add(self)

    @classmethod
    def open(cls, entries: int = 256, *, slots: int = 1024, hooks: Hooks | None = None) -> Ring:
        """Set up a ring with *entries* submission slots and *slots* direct-descriptor slots.

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
            abi.register(fd, abi.REGISTER_EVENTFD, ctypes.c_int(ring._efd), 1)
            if slots:
                abi.register(fd, abi.REGISTER_FILES, (ctypes.c_int * slots)(*[-1] * slots), slots)
                ring._free_slots = list(range(slots - 1, -1, -1))
        except BaseException:
            ring.close()
            raise
        ring.hooks = hooks
        return ring

    # -- lifetimes ------------------------------------------------------------------------

    def take_slot(self) -> int:
        """Return a free direct-descriptor slot (give it back with :meth:`give_slot`)."""
        if not self._free_slots:
            raise OSError(errno.EMFILE, "every direct-descriptor slot of the ring is in use")
        return self._free_slots.pop()

    def give_slot(self, slot: int) -> None:
        """Return *slot* to the free list (it must be empty: never opened, or closed)."""
        self._free_slots.append(slot)

    def close_fd(self, fd: int) -> None:
        """Close process fd *fd* now, or once the last op in flight that uses it completes."""
        if self._fd_users[fd]:
            self._close_later.add(fd)
        else:
            os.close(fd)

    def _release(self, op: Op) -> None:
        for fd in op.fds:
            self._fd_users[fd] -= 1
            if not self._fd_users[fd]:
                del self._fd_users[fd]
                if fd in self._close_later:
                    self._close_later.discard(fd)
                    os.close(fd)

    # -- submission -----------------------------------------------------------------------

    def queue(self, ops: Sequence[Op], done: Done) -> None:
        """Queue *ops* as one chain; call ``done(results)`` once every op has a result.

        Each result is the op's completion (``-errno`` on failure); an op that did not run
        because an earlier one severed the chain reports ``-ECANCELED``.
        """
        if self._closed:
            why = "was inherited across fork" if self._forked else "is closed"
            raise RuntimeError(f"this io_uring ring {why}; open a new one")
        if not 0 < len(ops) <= min(self._sq_entries, self.max_inflight):
            raise ValueError(f"a chain holds 1 to {self._sq_entries} ops, not {len(ops)}")
        for op in ops:
            self._fd_users.update(op.fds)
        self._pending.append(_Chain(list(ops), done))
        self._kick()

    def _kick(self) -> None:
        # One io_uring_enter per loop iteration: every chain queued in this turn goes together.
        if self._loop is not None and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._closed:
            self._fill()
            self._enter(0)
            self.reap()  # completions that are already there save a wake-up through the eventfd

    def _fill(self) -> None:
        while self._pending:
            chain = self._pending[0]
            count = len(chain.ops) - chain.next
            free = self._sq_entries - ((self._tail - self._sq_khead.value) & _U32)
            if count > free or len(self._inflight) + count > self.max_inflight:
                return  # the whole rest of the chain, or nothing: see the module's rules
            self._write(chain)  # a hook that raises there leaves the chain queued
            self._pending.popleft()

    def _write(self, chain: _Chain) -> None:
        last, i, tail = len(chain.ops) - 1, chain.next, self._tail
        while True:
            op = chain.ops[i]
            op.seq = self._seq
            inject = None if self.hooks is None else self.hooks.before_submit(op)
            self._seq += 1
            if inject is not None and op.opcode == abi.OP_WRITE and 0 <= inject < op.length:
                op.length = inject  # a real short write: the kernel severs the chain itself
            elif inject is not None:
                chain.injected[i] = inject
                if inject < 0:
                    op = _NOP  # an injected failure does nothing: a nop takes the op's place
            # With hooks, each op goes alone after its predecessor completed (_complete applies
            # the kernel's severing rules), so "stop before op N" means ops before it are done.
            link = i < last and self.hooks is None
            ud, self._next_ud = self._next_ud, self._next_ud + 1
            self._inflight[ud] = (chain, i)
            fields = op.pack(abi.IOSQE_IO_LINK if link else 0, ud)
            abi.SQE.pack_into(self._sqes, (tail & self._sq_mask) * abi.SQE.size, *fields)
            tail, i = tail + 1, i + 1
            if not link:
                break
        chain.outstanding += i - chain.next
        self._unsubmitted += i - chain.next
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
        handled = 0
        while True:
            head, tail = self._cq_head, self._cq_ktail.value
            while head != tail:
                offset = self._cqes + (head & self._cq_mask) * abi.CQE.size
                ud, result, _ = abi.CQE.unpack_from(self._cq, offset)
                head = (head + 1) & _U32
                self._cq_head = self._cq_khead.value = head  # before the callback: it may raise
                self._complete(ud, result)
                handled += 1
            if not self._sq_flags.value & abi.SQ_CQ_OVERFLOW:
                break
            abi.enter(self._fd, 0, 0, abi.ENTER_GETEVENTS)  # move parked completions into the ring
        if self._pending:
            self._kick()
        return handled

    def _complete(self, ud: int, result: int) -> None:
        chain, i = self._inflight.pop(ud)
        op = chain.ops[i]
        if i in chain.injected and result != -errno.ECANCELED:
            result = chain.injected[i]
        chain.results[i] = result
        self._release(op)
        chain.outstanding -= 1
        if not chain.outstanding:
            self._settle(chain, op, result)
        if self.hooks is not None:  # last: a hook that raises leaves the ring consistent
            self.hooks.after_reap(op, result)

    def _settle(self, chain: _Chain, last: Op, result: int) -> None:
        if chain.next < len(chain.ops):  # the rest of the chain waits for this op (hooks)
            if not severs(last, result):
                self._pending.appendleft(chain)
                self._kick()
                return
            for rest in chain.ops[chain.next :]:
                self._release(rest)
        chain.done(chain.results)

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
        """Reap on *loop* (an eventfd reader) and flush submissions once per loop iteration."""
        self._loop = loop
        loop.add_reader(self._efd, self._on_eventfd)

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

        Cancelling the future releases the waiter only: the chain runs to its end, its
        completions are still reaped (its paths, buffers and fds released) and *orphaned*, if
        given, is called with the results so the caller's cleanup can follow.
        """
        if self._loop is None:
            raise RuntimeError("attach() the ring to an event loop before submit()")
        future: asyncio.Future[list[int]] = self._loop.create_future()

        def done(results: list[int]) -> None:
            if not future.cancelled():
                future.set_result(results)
            elif orphaned is not None:
                orphaned(results)

        self.queue(ops, done)
        return future

    # -- closing --------------------------------------------------------------------------

    def close(self) -> None:
        """Run every queued op and wait for every op in flight (blocking), then unmap.

        The kernel may still read an op's buffers until it completes: nothing is freed before.
        """
        if self._closed:
            return
        self.drain()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._efd)
        self._drop()

    def _drop(self) -> None:
        self._closed = True
        del self._sq_khead, self._sq_ktail, self._sq_flags, self._cq_khead, self._cq_ktail
        for m in self._maps:
            m.close()
        os.close(self._fd)
        os.close(self._efd)
        _RINGS.discard(self)

    def _forget(self) -> None:  # pragma: no cover - runs in forked children (os._exit)
        # In a forked child: the maps are absent (MADV_DONTFORK), so touch nothing; no
        # remove_reader either, the epoll set is shared with the parent.
        self._forked = True
        self._drop()

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _forget_inherited() -> None:  # pragma: no cover - runs in forked children (os._exit)
    for ring in list(_RINGS):
        ring._forget()


os.register_at_fork(after_in_child=_forget_inherited)
