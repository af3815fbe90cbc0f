"""A small Twisted-style Deferred for when Twisted is not installed, backed by asyncio.

Only the part of ``twisted.internet.defer.Deferred`` that callers of the append task use:
``addCallbacks``/``addCallback``/``addErrback``/``addBoth``, ``callback``/``errback``,
``cancel``, ``asFuture(loop)`` and ``await``. Callbacks run synchronously when the Deferred
fires, as in Twisted; a callback may return another Deferred, which pauses the chain until it
fires. Errbacks receive a :class:`Failure` whose ``value`` is the original exception.

Awaiting goes through an asyncio future: ``await d`` (or ``await d.asFuture(loop)``) gives
the chain's result or raises its exception, and cancelling the awaiting task cancels ``d``.
A Twisted ``Deferred`` cannot be awaited in an asyncio task ("Task got bad yield"):
:func:`as_future` is the one spelling that works for both kinds.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any, Generic, TypeVar

__all__ = ["AlreadyCalledError", "Deferred", "Failure", "as_future"]

T = TypeVar("T")

_log = logging.getLogger("compat")


class AlreadyCalledError(Exception):
    """``callback()`` or ``errback()`` was called on a Deferred that already fired."""


class Failure:
    """An exception travelling down an errback chain (Twisted's ``Failure``, reduced).

    Args:
        exc_value: the exception; by default the one being handled right now.
    """

    def __init__(self, exc_value: BaseException | None = None) -> None:
        if exc_value is None:
            exc_value = sys.exc_info()[1]
            if exc_value is None:
                raise TypeError("Failure() needs an exception, or must be made in an except block")
        self.value: BaseException = exc_value
        self.type: type[BaseException] = type(exc_value)
        self.tb: TracebackType | None = exc_value.__traceback__

    def check(self, *errorTypes: type[BaseException]) -> type[BaseException] | None:
        """Return the first of *errorTypes* that the exception is an instance of, else None."""
        for t in errorTypes:
            if isinstance(self.value, t):
                return t
        return None

    def trap(self, *errorTypes: type[BaseException]) -> type[BaseException]:
        """Return the matching type of *errorTypes*, or re-raise the exception."""
        t = self.check(*errorTypes)
        if t is None:
            self.raiseException()
        assert t is not None
        return t

    def raiseException(self) -> None:
        """Raise the original exception with its traceback."""
        raise self.value.with_traceback(self.tb)

    def getErrorMessage(self) -> str:
        """Return the exception's message (its repr when it has none)."""
        return str(self.value) or repr(self.value)

    def __repr__(self) -> str:
        return f"<compat.Failure {self.type.__qualname__}: {self.getErrorMessage()}>"


_Callback = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


def _passthru(result: Any) -> Any:
    return result


class Deferred(Generic[T]):
    """A result that is not there yet: Twisted's callback chain, awaitable from asyncio.

    Args:
        canceller: called with the Deferred by :meth:`cancel` before it fires; if it does
            not fire the Deferred itself, ``cancel()`` errbacks it with
            ``asyncio.CancelledError``.
    """

    def __init__(self, canceller: Callable[[Deferred[T]], None] | None = None) -> None:
        self.called = False
        self.result: Any = None
        self._chain: list[tuple[_Callback, _Callback]] = []
        self._canceller = canceller
        self._paused = 0
        self._running = False
        self._unhandled = False

    def __repr__(self) -> str:
        state = "pending" if not self.called else f"current result: {self.result!r}"
        return f"<compat.Deferred at {id(self):#x} {state}>"

    # -- building the chain ----------------------------------------------------------------

    def addCallbacks(
        self,
        callback: Callable[..., Any],
        errback: Callable[..., Any] | None = None,
        callbackArgs: tuple[Any, ...] = (),
        callbackKeywords: dict[str, Any] | None = None,
        errbackArgs: tuple[Any, ...] = (),
        errbackKeywords: dict[str, Any] | None = None,
    ) -> Deferred[Any]:
        """Add a callback and an errback at the same point of the chain; return self."""
        cb = (callback, tuple(callbackArgs), dict(callbackKeywords or {}))
        eb = (errback or _passthru, tuple(errbackArgs), dict(errbackKeywords or {}))
        self._chain.append((cb, eb))
        if self.called:
            self._run()
        return self

    def addCallback(self, callback: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
        """Add a callback (the errback passes failures through); return self."""
        return self.addCallbacks(callback, callbackArgs=args, callbackKeywords=kw)

    def addErrback(self, errback: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
        """Add an errback (the callback passes results through); return self."""
        return self.addCallbacks(_passthru, errback, errbackArgs=args, errbackKeywords=kw)

    def addBoth(self, callback: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
        """Add *callback* as both the callback and the errback; return self."""
        return self.addCallbacks(
            callback, callback, callbackArgs=args, callbackKeywords=kw, errbackArgs=args,
            errbackKeywords=kw,
        )  # fmt: skip

    # -- firing ----------------------------------------------------------------------------

    def callback(self, result: Any) -> None:
        """Fire the chain with *result*."""
        self._start(result)

    def errback(self, fail: Failure | BaseException | None = None) -> None:
        """Fire the chain with a failure (by default the exception being handled)."""
        if not isinstance(fail, Failure):
            fail = Failure(fail)
        self._start(fail)

    def cancel(self) -> None:
        """Cancel the operation: run the canceller; fail with CancelledError if still unfired."""
        if self.called:
            return
        if self._canceller is not None:
            self._canceller(self)
        if not self.called:
            self.errback(Failure(asyncio.CancelledError()))

    def _start(self, result: Any) -> None:
        if self.called:
            raise AlreadyCalledError(f"{self!r} already fired")
        self.called = True
        self.result = result
        self._run()

    def _continue(self, result: Any) -> None:
        self.result = result
        self._paused -= 1
        self._run()

    def _run(self) -> None:
        if self._running or self._paused:
            return
        self._running = True
        try:
            while self._chain and not self._paused:
                cb, eb = self._chain.pop(0)
                fn, args, kw = eb if isinstance(self.result, Failure) else cb
                try:
                    self.result = fn(self.result, *args, **kw)
                except BaseException:
                    self.result = Failure()
                if isinstance(self.result, Deferred):
                    inner, self.result = self.result, None
                    self._paused += 1
                    inner.addBoth(self._continue)
        finally:
            self._running = False
        self._unhandled = isinstance(self.result, Failure) and not self._chain

    def __del__(self) -> None:
        if self._unhandled and isinstance(self.result, Failure):
            f = self.result
            _log.error(
                "Unhandled error in compat.Deferred: %s", f.getErrorMessage(),
                exc_info=(f.type, f.value, f.tb),
            )  # fmt: skip

    # -- asyncio ---------------------------------------------------------------------------

    def asFuture(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        """Return a future on *loop* that gets this chain's result; cancelling it cancels this.

        As in Twisted, the chain's result is consumed: afterwards it continues with None.
        """
        fut: asyncio.Future[Any] = loop.create_future()

        def ok(result: Any) -> None:
            if not fut.cancelled():
                fut.set_result(result)

        def failed(f: Failure) -> None:
            if not fut.cancelled():
                fut.set_exception(f.value)

        def check_cancel(f: asyncio.Future[Any]) -> None:
            if f.cancelled():
                self.cancel()

        self.addCallbacks(ok, failed)
        fut.add_done_callback(check_cancel)
        return fut

    def __await__(self) -> Generator[Any, None, T]:
        fut = self.asFuture(asyncio.get_running_loop())
        result: T = yield from fut.__await__()
        return result


def as_future(d: Any) -> asyncio.Future[Any]:
    """Return a future of the running asyncio loop that gets the Deferred *d*'s result.

    ``await compat.as_future(mbox.appendMessage(msg))`` works whether *d* is a Twisted
    ``Deferred`` (Twisted installed) or a :class:`Deferred` of this package (Twisted
    absent). As with ``asFuture``, *d*'s chain continues with None afterwards.

    Raises:
        TypeError: *d* is not a Deferred.
        RuntimeError: no asyncio loop is running in this thread.

    **Cancellation:** cancelling the future (or the task awaiting it) cancels *d*.
    """
    convert = getattr(d, "asFuture", None)
    if not callable(convert):
        raise TypeError(
            f"as_future() takes a Deferred (Twisted's or compat's), not {type(d).__name__}"
        )
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("as_future() needs a running asyncio event loop") from None
    fut: asyncio.Future[Any] = convert(loop)
    return fut
