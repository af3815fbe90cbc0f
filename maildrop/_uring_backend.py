"""The io_uring backend, and which backend a maildir's deliveries run on.

:class:`UringBackend` is the engine's :class:`~maildrop._backend.Backend` on one io_uring ring
per asyncio loop, driven from the loop's own thread (``_uring``). ``run`` and ``spawn``
recognise the engine's own steps and run them as ring chains: a message's writes, fsync and
link (``Steps.write`` and ``Steps.finish``: ``_uring_stream``, whether the message came in one
step or in batches; the directories in ``_uring_steps``) and the group-commit fsync. Every
other step, and a step the ring cannot take (a quota ledger, a synchronous file to copy, a
directory to create, ``deliver_many``'s staging), runs in the thread pool, the same code as
on the thread backend.

A ring step owns the delivery's files like a worker thread does: a cancelled caller is
released at once, the chain in flight runs to its end, and the step then cleans up after an
abort (``_handoff``). A whole message's step, and ``Maildir.deliver(bytes)`` altogether
(:meth:`UringBackend.deliver`), run from completion callbacks (``_uring_whole``,
``_uring_commit``); a streamed message's steps run as jobs of their own (asyncio tasks).

Which backend (``_backend.requested`` when a ``Maildir`` is made, :func:`choose` when a
delivery starts): ``"threads"`` always; ``"uring"`` or an error saying why it cannot run
(kernel, ``kernel.io_uring_disabled``, a seccomp filter, a trio loop, a custom ``Syscalls``
table); ``"auto"`` (the default) io_uring where it runs, else threads, silently, and even
there a delivery that starts alone on its loop (:func:`alone`) takes threads: a lone
delivery is faster there, and such a process never makes a ring (see
``_backend.AUTO_USES_URING``). The
environment variable ``MAILDROP_BACKEND`` (``auto``/``uring``/``threads``) replaces
``"auto"`` for operators; it never overrides a program's own choice, and a custom
``Syscalls`` table (code that needs Python callables) keeps ``"auto"`` on threads.
"""

from __future__ import annotations

import asyncio
import errno
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

from . import _uring_stream as ring_stream
from ._backend import Backend, Done, PoolBackend, busy, current, uring_loaded
from ._delivery import Delivery
from ._group_commit import groups, sync_and_close
from ._handoff import Step, begin, hand_back
from ._loops import per_loop, running_loop
from ._pool import retrieve
from ._steps import Steps
from ._uring import Ring, availability
from ._uring_commit import Delivering, SyncAndClose
from ._uring_setup import UringUnavailableError
from ._uring_whole import Shared, Whole, whole
from ._writer import DeliveryFiles, Settings

__all__ = ["UringBackend", "choose"]

T = TypeVar("T")


def _make(loop: asyncio.AbstractEventLoop | None) -> UringBackend | UringUnavailableError:
    known = availability()
    if loop is None or not known.ok:
        why = "trio" if loop is None else known.reason
        return UringUnavailableError(errno.ENOTSUP, f"io_uring cannot be used here: {why}")
    try:
        return UringBackend(loop)
    except UringUnavailableError as exc:
        return exc
    except OSError as exc:  # EMFILE, ENOMEM (locked memory): this process cannot have a ring
        return UringUnavailableError(exc.errno, f"io_uring cannot be used here: {exc}")
    except NotImplementedError:  # a loop that cannot watch fds: the ring reaps on an eventfd
        why = "the event loop cannot watch file descriptors (add_reader)"
        return UringUnavailableError(errno.ENOTSUP, f"io_uring cannot be used here: {why}")


_backends = per_loop("maildrop_uring_backend", _make)


def choose(choice: str) -> Backend:
    """Return the running loop's backend for a maildir's *choice*, ``"auto"`` or ``"uring"``.

    Raises:
        UringUnavailableError: *choice* is ``"uring"`` and io_uring cannot run here (the
            message says why).
    """
    loop = running_loop()
    if loop is None:
        if choice == "uring":
            raise UringUnavailableError(
                errno.ENOTSUP,
                "backend='uring' runs on asyncio event loops only, not on trio; "
                "use backend='threads' or 'auto'",
            )
        return current()
    if choice == "auto" and alone(loop):
        return current(loop)
    made = _backends(loop)
    if isinstance(made, UringUnavailableError):
        if choice == "uring":
            raise UringUnavailableError(made.errno, made.strerror)
        return current(loop)
    return made


def alone(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether a delivery starting now on *loop* would run alone: no work in flight in its
    thread pool or on its ring (``"auto"`` then takes threads, without making a ring)."""
    made = _backends.made(loop)
    if isinstance(made, UringBackend) and (made.active or made.jobs):
        return False
    return not busy(current(loop))


class UringBackend(PoolBackend):
    """The engine's own steps as chains on one ring per loop; the rest in the thread pool."""

    __slots__ = ("_loop", "active", "groups", "jobs", "ring", "shared")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # The loop's thread pool, shared with its thread backend: "auto" runs a loop's
        # deliveries on both, and one set of workers serves them.
        threads = current(loop)
        assert isinstance(threads, PoolBackend)  # an asyncio loop's
        self.pool = threads.pool
        # No direct-descriptor slots: a message's file is a process fd (see _uring_steps).
        ring = self.ring = Ring.open(slots=0)
        try:
            ring.attach(loop)
        except BaseException:
            ring.close()
            raise
        # The loop never closes the ring: it goes with the loop (the ring holds it weakly).
        weakref.finalize(loop, ring.close)
        self.jobs: set[asyncio.Future[Any]] = set()
        #: The loop's group commits (``_group_commit.groups``: one lookup, not one a delivery).
        self.groups = groups(loop)
        #: Whole messages in flight on the ring (``_uring_whole``); with :attr:`jobs`, what
        #: makes a delivery that starts now not alone (:func:`alone`).
        self.active = 0
        # Weakly: this backend is the loop's own per-loop value (``current``), so a strong
        # reference would keep every loop that used the ring alive, with its ring.
        self._loop = weakref.ref(loop)
        #: Directories held open by the deliveries in flight (``_uring_whole``).
        self.shared = Shared()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this backend serves."""
        loop = self._loop()
        if loop is None:  # pragma: no cover - nothing runs on a collected loop
            raise RuntimeError("the event loop of this io_uring backend is gone")
        return loop

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the step ``fn(*args)`` on the ring or in a worker (see :meth:`Backend.run`)."""
        whole = self._whole(fn, args)
        if whole is not None:
            return cast(T, await self._outcome(whole))  # Steps.finish returns the name
        job = self._on_ring(fn, args)
        if job is None:
            return await super().run(fn, *args)
        return await self._released(job)

    async def _outcome(self, whole: Whole) -> Any:
        """Wait for *whole*'s outcome; a cancelled caller leaves at once, and the backend
        waits for the chain's cleanup as for a job (shutdown, tests)."""
        try:
            return await whole.future
        except asyncio.CancelledError:
            ending = whole.ending()
            self.jobs.add(ending)
            ending.add_done_callback(self.jobs.discard)
            raise

    def deliver(self, settings: Settings, data: bytes) -> Coroutine[Any, Any, Delivery] | None:
        """Return ``Maildir.deliver(data)`` from completion callbacks (``_uring_commit``),
        or None where the session must do it (see ``Whole.fits``).

        **Cancellation:** the caller is released at once; the chain's completion cleans up
        (a message linked already stays, and becomes durable with the next fsync).
        """
        path = settings.path  # a property: computed once for the delivery
        if path in ring_stream.FOREIGN:  # Whole.fits(), inline
            return None
        job = Delivering(self, settings, data, path)
        job.start()
        return self._outcome(job)

    def _whole(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Whole | None:
        """Start a whole message's ``Steps.finish`` from completion callbacks
        (``_uring_whole``); None where it is not one, or the thread step takes it."""
        steps = getattr(fn, "fn", None)
        steps = getattr(steps, "__self__", None)
        if args or not isinstance(fn, Step) or not isinstance(steps, Steps):
            return None
        if getattr(fn.fn, "__func__", None) is not Steps.finish or steps.started:
            return None
        if steps.threads_only:
            return None
        return whole(self, steps, *fn.args)

    def _on_ring(
        self, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> Coroutine[Any, Any, Any] | None:
        """Return the ring job for the engine's step *fn*, or None (a thread runs it)."""
        if args or not isinstance(fn, Step):
            return None
        func, steps = getattr(fn.fn, "__func__", None), getattr(fn.fn, "__self__", None)
        if not isinstance(steps, Steps) or steps.threads_only:
            return None
        body: Callable[..., Awaitable[Any]]
        if func is Steps.write:
            body = self._write
        elif func is Steps.finish and steps.started:
            body = self._finish_streamed
        else:  # a whole message that _whole() declined (another user's maildir): a thread
            return None
        return self._owned(fn.tmp, lambda: body(steps, *fn.args))

    def _released(self, job: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Start *job*; return a future of its outcome whose cancellation releases the waiter
        only (``asyncio.shield``'s contract, without its extra future and callbacks)."""
        future: asyncio.Future[T] = self.loop.create_future()

        def settle(task: asyncio.Task[T]) -> None:
            if future.cancelled():
                retrieve(task)  # the caller left: nobody looks at the job's outcome
            elif task.cancelled():
                future.cancel()
            elif (exc := task.exception()) is not None:
                future.set_exception(exc)
            else:
                future.set_result(task.result())

        self.job(job).add_done_callback(settle)
        return future

    def job(self, job: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run *job* as a task the backend holds until it ends."""
        task = self.loop.create_task(job)
        self.jobs.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.jobs.discard)
        return task

    async def _owned(self, tmp: DeliveryFiles, body: Callable[[], Awaitable[T]]) -> T:
        """Run *body* as the owner of *tmp*'s files, as ``_handoff.Step`` does in a worker."""
        begin(tmp)
        ok = False
        try:
            result = await body()
            ok = True
            return result
        finally:
            await self._hand_back(tmp, failed=not ok)

    async def _hand_back(self, tmp: DeliveryFiles, *, failed: bool = False) -> None:
        """``_handoff.hand_back``, with a cleanup's blocking calls in a worker."""
        if failed or tmp.aborted:  # only the loop's thread sets `aborted`: no race here
            await self.pool.submit(_hand_back_failed if failed else hand_back, (tmp,))
        else:
            hand_back(tmp)

    async def _finish_streamed(
        self, steps: Steps, chunks: list[bytes | memoryview], sync_new: bool
    ) -> str:
        final = await ring_stream.finish(self.ring, steps, chunks, sync_new)
        if final is None:  # no hard links here: the thread step's rename fallback
            return await self.pool.submit(steps.publish, (sync_new,))
        return final

    async def _write(self, steps: Steps, chunks: list[bytes | memoryview]) -> None:
        if not await ring_stream.write(self.ring, steps, chunks):
            await self.pool.submit(steps.write, (chunks,))

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue ``fn(*args)`` on the ring or for a worker (see :meth:`Backend.submit`)."""
        job = self._on_ring(fn, args)
        if job is None:
            return super().submit(fn, *args)
        future = self._released(job)
        future.add_done_callback(retrieve)
        return future

    def spawn(self, fn: Callable[..., Any], *args: Any, done: Done) -> None:
        """Run ``fn(*args)`` for nobody, on the ring where it can (see :meth:`Backend.spawn`)."""
        if fn is not sync_and_close:
            super().spawn(fn, *args, done=done)
            return
        SyncAndClose(self, args[0], done).start()


def _hand_back_failed(tmp: DeliveryFiles) -> None:
    hand_back(tmp, failed=True)


# Last: "auto" may take the ring only once everything above exists (``_backend.backend_for``
# may have this module loaded in a thread while the loop runs).
uring_loaded(choose)
