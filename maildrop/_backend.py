"""The engine's backend: how the worker-side steps of a delivery get run.

The session (``_session``), group commit (``_group_commit``), ``deliver_many`` and the
sources talk to one small object per event loop, got with :func:`current`, and never branch
on the event loop themselves. A backend does five things (:class:`Backend`): run a
worker-side step and wait for it, queue one without waiting (pipelined writes), spawn a job
nobody waits for (a cleanup, a shared directory fsync), run a step for many items at once
(``deliver_many``'s directory fsyncs), and read a blocking source in a lane of its own.

The steps are plain functions that do their disk calls through the syscall table
(``_sys``), so they run the same in any backend. Today's backends run them in threads:
:class:`PoolBackend` on asyncio (maildrop's own pool, ``_pool``) and :class:`AnyioBackend`
elsewhere (anyio worker threads, on trio). Both release a cancelled caller at once and let
the step run to completion; both run the step in a copy of the caller's ``contextvars``.

A backend that submits the steps' syscalls to the kernel itself (io_uring) implements the
same five methods: ``run`` and ``spawn`` recognise the engine's own steps (the ``Steps``
methods, the group-commit fsync, the cleanup) and submit their syscalls as a chain, whose
completion plays the part of the worker's return (it owns the files until then, and cleans
up after an abort); any other callable, and every step when the syscall table is not the
default one, still goes to a thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import anyio

from ._loops import per_loop
from ._pool import Pool, anyio_limiter, retrieve, source_limiter
from ._sys import DEFAULT_SYSCALLS, Syscalls

__all__ = [
    "AUTO_USES_URING",
    "BACKENDS",
    "ENV",
    "AnyioBackend",
    "Backend",
    "Done",
    "PoolBackend",
    "backend_for",
    "busy",
    "current",
    "requested",
    "run_sync",
    "server_backend",
]

T = TypeVar("T")

#: Called on the event loop's thread with None or the exception of a spawned job.
Done = Callable[[BaseException | None], None]


class Backend(Protocol):
    """What the engine needs from whatever runs its worker-side steps."""

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the step ``fn(*args)`` and return its result.

        **Cancellation:** the caller is released at once; the step still runs to completion.
        """

    def submit(self, fn: Callable[..., T], *args: Any) -> Awaitable[T] | None:
        """Queue ``fn(*args)`` and return an awaitable of its result, or None (queue nothing)
        where the backend cannot run a step behind its caller's back; an error nobody
        awaits is not reported."""

    def spawn(self, fn: Callable[..., Any], *args: Any, done: Done) -> None:
        """Run ``fn(*args)`` for nobody in particular, then ``done(error)`` on the loop.

        No caller's cancellation reaches the job: a caller that hands its files over to
        it (a cleanup, a shared directory fsync) can leave at once.
        """

    async def run_each(self, fn: Callable[[T], object], items: list[T]) -> None:
        """Run ``fn(item)`` for every item concurrently and wait for all.

        **Cancellation:** the caller is released at once; calls already started finish.
        """

    async def read_source(self, read: Callable[[int], T], n: int) -> T:
        """Call a blocking source's ``read(n)`` where it holds none of the steps' workers.

        **Cancellation:** the caller is released at once; the read's data is dropped.
        """


class _SourceLane:
    async def read_source(self, read: Callable[[int], T], n: int) -> T:
        """Call ``read(n)`` in the source lane (``_pool.SOURCE_THREADS`` threads)."""
        return await anyio.to_thread.run_sync(
            read, n, abandon_on_cancel=True, limiter=source_limiter()
        )


class PoolBackend(_SourceLane):
    """Steps in maildrop's own worker pool (asyncio)."""

    __slots__ = ("pool",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = Pool(loop)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a worker (see :meth:`Backend.run`)."""
        return await self.pool.submit(fn, args)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue ``fn(*args)`` for a worker (see :meth:`Backend.submit`)."""
        fut = self.pool.submit(fn, args)
        fut.add_done_callback(retrieve)
        return fut

    def spawn(self, fn: Callable[..., Any], *args: Any, done: Done) -> None:
        """Queue ``fn(*args)``, owned by no task (see :meth:`Backend.spawn`)."""
        fut = self.pool.submit(fn, args)
        fut.add_done_callback(lambda f: done(None if f.cancelled() else f.exception()))

    async def run_each(self, fn: Callable[[T], object], items: list[T]) -> None:
        """Queue ``fn(item)`` for every item; wait for all (see :meth:`Backend.run_each`)."""
        futs = [self.submit(fn, item) for item in items]
        for fut in futs:
            await fut  # one wake-up collects every result that finished meanwhile


class AnyioBackend(_SourceLane):
    """Steps in anyio's worker threads, with maildrop's own capacity limiter (trio)."""

    __slots__ = ()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a worker thread (see :meth:`Backend.run`)."""
        return await anyio.to_thread.run_sync(
            fn, *args, abandon_on_cancel=True, limiter=anyio_limiter()
        )

    def submit(self, fn: Callable[..., T], *args: Any) -> None:
        """Decline: a step is run only while its caller awaits it (see :meth:`Backend.submit`)."""
        return None

    def spawn(self, fn: Callable[..., Any], *args: Any, done: Done) -> None:
        """Run ``fn(*args)`` from a trio system task (see :meth:`Backend.spawn`)."""
        # A system task is the one kind of task that no caller's cancel scope reaches.
        import trio

        trio.lowlevel.spawn_system_task(
            self._detached, fn, args, done, context=contextvars.copy_context()
        )

    async def _detached(self, fn: Callable[..., Any], args: tuple[Any, ...], done: Done) -> None:
        try:
            await self.run(fn, *args)
        except Exception as exc:  # handed to *done*, never raised into trio's system nursery
            done(exc)
            return
        done(None)

    async def run_each(self, fn: Callable[[T], object], items: list[T]) -> None:
        """Run ``fn(item)`` for every item in a task group (see :meth:`Backend.run_each`)."""
        async with anyio.create_task_group() as tg:
            for item in items:
                tg.start_soon(self.run, fn, item)


def _make(loop: asyncio.AbstractEventLoop | None) -> Backend:
    return AnyioBackend() if loop is None else PoolBackend(loop)


#: The running event loop's backend (``current(loop)`` for *loop*'s, from outside it).
current = per_loop("maildrop_backend", _make)


#: The backends a ``Maildir`` may ask for.
BACKENDS = ("auto", "uring", "threads")
#: Whether "auto" may pick io_uring where it runs: for a delivery that starts while others
#: are in flight on its loop (the ring is ahead of the thread pool under concurrency, and
#: behind it for a lone delivery, which pays two ring round trips where a worker makes the
#: same calls in one go: ``benchmarks/README.md``); a lone one runs in threads
#: (``_uring_backend.alone``).
AUTO_USES_URING = True
#: The environment variable that replaces ``"auto"`` (see ``_uring_backend``).
ENV = "MAILDROP_BACKEND"


def requested(backend: str, syscalls: Syscalls) -> str:
    """Return the backend a ``Maildir(backend=...)`` asks for, with ``MAILDROP_BACKEND``.

    Raises:
        ValueError: *backend* (or the variable) is not one of :data:`BACKENDS`.
        UringUnavailableError: ``"uring"`` with a custom syscall table.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    custom = syscalls is not DEFAULT_SYSCALLS
    if backend == "uring" and custom:
        from ._uring_setup import UringUnavailableError

        raise UringUnavailableError(
            errno.ENOTSUP,
            "backend='uring' cannot run a custom Syscalls table (its entries are Python "
            "callables); use backend='threads' or 'auto'",
        )
    if backend != "auto" or custom:
        return "threads" if custom else backend
    env = os.environ.get(ENV, "") or "auto"
    if env not in BACKENDS:
        raise ValueError(f"{ENV} must be one of {', '.join(BACKENDS)}, not {env!r}")
    return env


def busy(threads: Backend) -> bool:
    """Whether the thread backend *threads* (an event loop's, :func:`current`) has jobs in
    flight: maildrop's own pool only (trio's anyio threads are never asked)."""
    return isinstance(threads, PoolBackend) and threads.pool.pending > 0


def server_backend() -> str:
    """Return the backend a server's maildirs take by default: ``"threads"``, unless the
    operator set ``MAILDROP_BACKEND`` to ``uring`` or ``threads`` (then ``"auto"``, which
    reads it; ``auto`` or nothing leaves the choice to maildrop, which is threads here).

    A server runs one worker process per CPU; on io_uring each has its ring and its io-wq
    kernel threads, which compete with the other workers for the CPUs, and costs more CPU
    per message than on threads (``benchmarks/README.md``, the LMTP server).
    """
    return "threads" if os.environ.get(ENV, "auto") in ("", "auto") else "auto"


def backend_for(choice: str) -> Backend:
    """Return the running loop's backend for a maildir's *choice* of backend
    (``"auto"``, ``"uring"`` or ``"threads"``: ``_uring_backend.choose``)."""
    if choice == "threads" or (choice == "auto" and not AUTO_USES_URING):
        return current()
    if _choose is not None:
        return _choose(choice)
    if choice == "auto":
        # The ring's modules are not loaded yet: a delivery that starts alone takes threads
        # without them (an MDA's one delivery; a process that dropped privileges opens no
        # more files than it needs). One that finds work in flight has them loaded in a
        # thread (tens of ms of imports would stall the loop) and takes threads meanwhile.
        threads = current()
        if busy(threads):
            _load_in_background()
        return threads
    from ._uring_backend import choose  # noqa: F401 - loading it sets _choose (uring_loaded)

    assert _choose is not None
    return _choose(choice)


_choose: Callable[[str], Backend] | None = None
_loading = False


def uring_loaded(choose: Callable[[str], Backend]) -> None:
    """Take *choose* (``_uring_backend.choose``), once its module is wholly loaded."""
    global _choose
    _choose = choose


def _load_in_background() -> None:
    global _loading
    if not _loading:
        _loading = True
        threading.Thread(target=_load, name="maildrop io_uring import", daemon=True).start()


def _load() -> None:
    global _loading
    try:
        from ._uring_backend import choose
    except Exception:  # a failed import (EMFILE, a broken install): a later overlap retries
        _loading = False
        return
    uring_loaded(choose)


def _forked() -> None:  # pragma: no cover - runs in forked children
    global _loading
    _loading = False  # the loading thread, if any, did not come along


if hasattr(os, "register_at_fork"):  # pragma: no branch - only Windows lacks it (no fork)
    os.register_at_fork(after_in_child=_forked)


async def run_sync(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a worker of the running loop's backend and return its result.

    **Cancellation:** the caller is released at once; *fn* still runs to completion.
    """
    return await current().run(fn, *args)
