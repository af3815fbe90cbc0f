"""Twisted, when it is installed: imported lazily by name, never the reactor.

Nothing here imports ``twisted.internet.reactor``: users install ``asyncioreactor`` after
their imports, and importing the reactor module installs the default reactor for good. The
reactor is only ever *looked up* in ``sys.modules``. Modules are loaded with
``importlib`` so that type checking works the same with and without Twisted.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ._deferred import Deferred as _CompatDeferred

__all__ = [
    "HAVE_TWISTED",
    "IConsumer",
    "call_soon",
    "cancelled_error",
    "declare_consumer",
    "file_sender",
    "find_loop",
    "installed_reactor",
    "new_deferred",
]


def _optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


_defer = _optional("twisted.internet.defer")
_interfaces = _optional("twisted.internet.interfaces")
HAVE_TWISTED = _defer is not None and _interfaces is not None

_zope: Any = importlib.import_module("zope.interface")


def _registerProducer(producer: object, streaming: bool) -> None:
    """Register *producer*; a *streaming* one is an IPushProducer, else IPullProducer."""


def _unregisterProducer() -> None:
    """Stop consuming the registered producer (here: end of the message)."""


def _write(data: bytes) -> None:
    """Consume *data* (bytes)."""


if _interfaces is not None:
    IConsumer: Any = _interfaces.IConsumer
else:
    IConsumer = _zope.interface.InterfaceClass(
        "IConsumer",
        (_zope.Interface,),
        {
            "__doc__": "A consumer consumes data from a producer (Twisted's IConsumer).",
            "registerProducer": _registerProducer,
            "unregisterProducer": _unregisterProducer,
            "write": _write,
        },
        __module__="compat",
    )


def declare_consumer(cls: type) -> None:
    """Declare that instances of *cls* provide :data:`IConsumer`."""
    _zope.classImplements(cls, IConsumer)


def new_deferred(canceller: Callable[[Any], None]) -> Any:
    """Return a Twisted ``Deferred`` when Twisted is installed, else a ``compat.Deferred``."""
    if _defer is not None:
        return _defer.Deferred(canceller)
    return _CompatDeferred(canceller)


def cancelled_error() -> BaseException:
    """Return the exception a cancelled Deferred of :func:`new_deferred` fails with."""
    if _defer is not None:
        err: BaseException = _defer.CancelledError()
        return err
    return asyncio.CancelledError()


def file_sender() -> Any:
    """Return a new pull producer that sends a file: Twisted's ``FileSender`` if installed."""
    basic = _optional("twisted.protocols.basic") if HAVE_TWISTED else None
    if basic is not None:
        return basic.FileSender()
    return _FileSender()


class _FileSender:
    """Twisted's ``basic.FileSender`` (a pull producer reading a file) without Twisted."""

    CHUNK_SIZE = 2**14

    def __init__(self) -> None:
        self.file: Any = None
        self.consumer: Any = None
        self.deferred: _CompatDeferred[bytes] | None = None
        self.transform: Callable[[bytes], bytes] | None = None
        self.lastSent = b""

    def beginFileTransfer(
        self, file: Any, consumer: Any, transform: Callable[[bytes], bytes] | None = None
    ) -> _CompatDeferred[bytes]:
        """Send *file* to *consumer*; the Deferred fires with the last byte sent."""
        self.file = file
        self.consumer = consumer
        self.transform = transform
        self.deferred = d = _CompatDeferred[bytes]()
        consumer.registerProducer(self, False)
        return d

    def resumeProducing(self) -> None:
        """Send the next chunk, or unregister at the end of the file."""
        chunk = self.file.read(self.CHUNK_SIZE) if self.file else b""
        if not chunk:
            self.file = None
            self.consumer.unregisterProducer()
            if self.deferred is not None:
                d, self.deferred = self.deferred, None
                d.callback(self.lastSent)
            return
        if self.transform is not None:
            chunk = self.transform(chunk)
        self.consumer.write(chunk)
        self.lastSent = chunk[-1:]

    def pauseProducing(self) -> None:
        """Nothing to do: a pull producer only produces when asked."""

    def stopProducing(self) -> None:
        """Fail the transfer's Deferred."""
        if self.deferred is not None:
            d, self.deferred = self.deferred, None
            d.errback(Exception("Consumer asked us to stop producing"))


def installed_reactor() -> Any:
    """Return the installed Twisted reactor, or None; never installs one."""
    return sys.modules.get("twisted.internet.reactor")


class _LoopCall:
    """A call scheduled on an asyncio loop, with ``IDelayedCall``'s ``cancel``/``active``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
        self._called = False
        self._fn = fn
        self._handle = loop.call_soon(self._run)

    def _run(self) -> None:
        self._called = True
        self._fn()

    def active(self) -> bool:
        """Whether the call is still pending."""
        return not self._called and not self._handle.cancelled()

    def cancel(self) -> None:
        """Cancel the pending call; like ``DelayedCall.cancel``, refuse one that already ran
        (``AlreadyCalled``) or was cancelled (``AlreadyCancelled``)."""
        if self._called:
            raise _already("AlreadyCalled", "the call already ran")
        if self._handle.cancelled():
            raise _already("AlreadyCancelled", "the call was already cancelled")
        self._handle.cancel()


def _already(kind: str, what: str) -> Exception:
    # Twisted's own exception classes when Twisted is installed, else a RuntimeError.
    error = _optional("twisted.internet.error") if HAVE_TWISTED else None
    cls = getattr(error, kind, None)
    return cls(what) if isinstance(cls, type) else RuntimeError(f"{kind}: {what}")


def call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> Any:
    """Schedule *fn* on the next loop turn (what ``reactor.callLater(0, fn)`` does).

    Straight on the asyncio loop, also under asyncioreactor: a ``callLater(0)`` there costs
    a Twisted ``DelayedCall`` plus a re-armed loop timer, measured as ~10% of a small
    append's loop time; the returned object has ``IDelayedCall``'s ``active``/``cancel``.
    """
    return _LoopCall(loop, fn)


def find_loop(what: str) -> asyncio.AbstractEventLoop:
    """Return the asyncio loop *what* runs on: the running one, else asyncioreactor's.

    Raises:
        RuntimeError: there is none (no running loop, and no reactor or another kind of
            reactor installed); the message says what to install.
    """
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        pass
    reactor = installed_reactor()
    loop = getattr(reactor, "_asyncioEventloop", None)
    if isinstance(loop, asyncio.AbstractEventLoop) and not loop.is_closed():
        return loop
    if reactor is not None:
        raise RuntimeError(
            f"{what} runs on asyncio, but the installed "
            f"Twisted reactor is {type(reactor).__module__}.{type(reactor).__name__}: "
            "install twisted.internet.asyncioreactor first thing in the program "
            "(from twisted.internet import asyncioreactor; asyncioreactor.install())"
        )
    raise RuntimeError(
        f"{what} needs a running asyncio event loop: "
        "start it from asyncio code, or install twisted.internet.asyncioreactor"
    )
