"""Twisted's maildir append task, re-created on the maildrop engine.

``twisted.mail.maildir._MaildirMailboxAppendMessageTask`` is an ``IConsumer`` that writes a
message into ``tmp/`` on the reactor thread and renames it into ``new/``. This one keeps its
names and its overridable ``os*`` hooks but hands the bytes to a maildrop
:class:`~maildrop.DeliverySession`, which writes them in worker threads, fsyncs, publishes
with ``link()`` (never clobbering), fsyncs ``new/`` and cleans up on every failure.

How it runs: ``createTempFile()`` opens the session and starts one asyncio task (the *pump*)
on the event loop: Twisted's when ``asyncioreactor`` is installed, else the running asyncio
loop. ``write()`` only queues bytes and wakes the pump, which feeds the session; producers
are throttled by :attr:`highWaterMark`/:attr:`lowWaterMark` on the bytes queued.
``unregisterProducer()`` (end of message) lets the pump ``commit()``. A message given as
bytes skips the ``FileSender`` (``startUp()`` writes it whole and ends it). The outcome is
decided once, on the loop's (reactor's) thread: the pump fires ``defer`` in its last step
(as Twisted's task fires it inside ``moveFileToNew()``); a failure decided outside the pump
(``fail()`` before the pump ran) fires on the next loop turn, never inside the caller's
call. A small durable append takes four loop turns (maildrop's own ``deliver()``: three).
Which steps are allowed when is :mod:`compat._lifecycle`'s transition tables (one phase and
one flow-control state instead of flags).

The hooks: an overridden ``osopen``/``oswrite``/``osclose``/``osrename`` is always called,
with the original positional arguments and full paths, from a maildrop worker thread; hooks
left at their defaults let the engine do the step its own safer way (relative to directory
fds; ``link()`` instead of ``rename()``).
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import Callable
from typing import Any

from maildrop import DEFAULT_SYSCALLS, DeliverySession, MaildropError, Syscalls

from . import _twisted
from ._feed import Feed
from ._hooks import bind, hook_table, join, maildir_for, unbind
from ._lifecycle import Event, Flow, FlowEvent, Lifecycle, Phase, ProducerFlow

__all__ = ["DeliveryAborted", "MaildirMailboxAppendMessageTask"]


class DeliveryAborted(MaildropError):
    """The delivery was stopped (``stopProducing()``, ``fail()``) before it completed."""


class MaildirMailboxAppendMessageTask:
    """A task that adds a message to a maildir mailbox: an ``IConsumer`` fed by a producer.

    Drop-in for ``twisted.mail.maildir._MaildirMailboxAppendMessageTask``. ``defer`` fires
    with None once the message is durable in ``new/`` (file and directory fsynced), or with
    a failure carrying the original exception after everything the delivery created was
    removed. It fires exactly once.

    Args:
        mbox: the mailbox; its ``path`` (str, bytes or path-like) is the maildir, created on
            first delivery when missing. On success the message's path (same type) is
            appended to ``mbox.list`` if the mailbox has one.
        msg: the message, as bytes or a binary file-like object (read on the loop, in
            ``FileSender.CHUNK_SIZE`` pieces).

    Attributes ``tmpname`` and ``fh`` are set when the engine creates the tmp file, in its
    first write batch (at commit for messages under 1 MiB); until then they are None and -1.
    ``defer`` stays set after it fired (Twisted's task sets it to None).

    Hooks: an overridden ``osopen(path, flags, mode)``, ``oswrite(fd, data)``,
    ``osclose(fd)`` or ``osrename(src, dst)`` is called with full paths typed like
    ``mbox.path``, **in a worker thread**: it must not touch the reactor (use
    ``reactor.callFromThread``). ``oswrite`` may write less than it was given (the rest is
    written by further calls); returning None means it wrote everything. With ``osrename``
    overridden the message is published by it (after a check that the name is free) instead
    of by ``link()``. Other steps (fsyncs, directory opens) go through :attr:`syscalls`.

    Failures: every error (a hook, the disk, the source's ``read``, ``fail()``,
    ``stopProducing()``, cancelling ``defer``) removes the tmp file and closes the fd, then
    errbacks ``defer``. A cancelled ``defer`` fails at once with ``CancelledError`` and the
    cleanup finishes in the background. Like any maildrop delivery, one abandoned after its
    link into ``new/`` stays there (complete) while the errback reports the abandon.
    """

    osopen = staticmethod(os.open)
    oswrite = staticmethod(os.write)
    osclose = staticmethod(os.close)
    osrename = staticmethod(os.rename)

    #: A push producer is paused (a pull producer no longer prodded) while more bytes than
    #: this wait for the engine: about one 1 MiB write batch in flight plus the next one.
    highWaterMark = 2 << 20
    #: ...and resumed (prodded again) once no more than this many wait.
    lowWaterMark = 512 << 10
    #: The syscall table the hooks are layered on (fault injection for the other steps).
    syscalls: Syscalls = DEFAULT_SYSCALLS

    def __init__(self, mbox: Any, msg: bytes | Any) -> None:
        if not hasattr(msg, "read"):
            if not isinstance(msg, bytes | bytearray | memoryview):
                raise TypeError(
                    f"msg must be bytes or a binary file, not {type(msg).__name__}"
                    + ("; encode it first (e.g. msg.encode())" if isinstance(msg, str) else "")
                )
            msg = io.BytesIO(msg)
            # startUp() writes it in one piece: a FileSender would take two loop turns (a
            # chunk, then the empty read that ends the message) for what is already here.
            self._own_msg: io.BytesIO | None = msg
        else:
            self._own_msg = None
        self.mbox = mbox
        # Any: a twisted.internet.defer.Deferred when Twisted is installed, else compat's.
        self.defer: Any = _twisted.new_deferred(self._cancel)
        self.openCall: Any = None
        self.msg: Any = msg
        self.tmpname: str | bytes | None = None
        self.fh = -1
        self.filesender: Any = None
        self.myproducer: Any = None
        self.streaming: bool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: DeliverySession | None = None
        self._pump: asyncio.Task[None] | None = None
        self._feed = Feed()
        self._life = Lifecycle()
        self._flow = ProducerFlow()
        self._error: Any = None  # why it was abandoned (the first reason wins)
        self._pending: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.mbox.path!r} tmpname={self.tmpname!r}>"

    @property
    def opencall(self) -> Any:
        """The scheduled call to :meth:`prodProducer` (Twisted's code names it ``openCall``)."""
        return self.openCall

    @opencall.setter
    def opencall(self, value: Any) -> None:
        self.openCall = value

    # -- Twisted's methods -----------------------------------------------------------------

    def startUp(self) -> None:
        """Start transferring ``msg`` to the mailbox.

        A message given as bytes (and still unread in ``msg``) is handed to the engine whole,
        at once; a file is read by a ``FileSender`` (a pull producer prodded once per loop
        turn), as Twisted's task does. An exception of an overridden ``write()`` or
        ``moveFileToNew()`` fails ``defer``, as it would from the ``FileSender``.
        """
        self.createTempFile()
        if self._life.decided:
            return
        own = self._own_msg
        if own is not None and self.msg is own and own.tell() == 0:
            data = own.getvalue()
            own.seek(0, io.SEEK_END)  # consumed, as a FileSender would leave it
            try:
                self.write(data)
                self.moveFileToNew()
            except Exception as exc:
                self._abandon(exc)
            return
        self.filesender = _twisted.file_sender()
        self.filesender.beginFileTransfer(self.msg, self)

    def createTempFile(self) -> None:
        """Start the delivery; the engine creates the tmp file with its first write batch.

        Fails ``defer`` at once when there is no asyncio event loop to run on (for instance
        under a Twisted reactor that is not ``asyncioreactor``).
        """
        if self._life.state is not Phase.IDLE:
            return
        try:
            loop = _twisted.find_loop("compat.MaildirMailboxAppendMessageTask")
            md = maildir_for(self.mbox.path, hook_table(self))
        except Exception as exc:
            self._abandon(exc)
            return
        self._loop = loop
        self._session = md.open_delivery()
        self._life.on(Event.START)
        self._pump = loop.create_task(self._run())
        self._pump.add_done_callback(self._pump_done)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Register *producer*; a pull producer (*streaming* false) is prodded on the loop.

        Raises:
            RuntimeError: a producer is already registered.
        """
        if self.myproducer is not None:
            raise RuntimeError(
                f"{self!r} already has a producer ({self.myproducer!r}); "
                "unregisterProducer() it first"
            )
        self.myproducer = producer
        self.streaming = bool(streaming)
        self.createTempFile()
        if not streaming:
            self.prodProducer()

    def prodProducer(self) -> None:
        """Ask the pull producer for data, then again on the next loop turn (``openCall``).

        While more than :attr:`highWaterMark` bytes wait for the engine it is not asked;
        it is prodded again once they drain.
        """
        self.openCall = None
        producer = self.myproducer
        if producer is None or self._life.decided or self._loop is None:
            return
        if self._feed.backlog > self.highWaterMark:
            self._flow.on(FlowEvent.HOLD)
            return
        self.openCall = _twisted.call_soon(self._loop, self.prodProducer)
        try:
            producer.resumeProducing()
        except Exception as exc:
            # Twisted's task never fired its Deferred when the source failed: this one does.
            self._abandon(exc)

    def unregisterProducer(self) -> None:
        """End the message: forget the producer and publish (see :meth:`moveFileToNew`)."""
        self._release_producer()
        self.moveFileToNew()

    def write(self, data: bytes) -> None:
        """Queue *data* for the engine; never blocks. Errors go to ``defer``, not the caller."""
        if self._life.decided:
            return
        if not isinstance(data, bytes):
            if not isinstance(data, bytearray | memoryview):
                kind = type(data).__name__
                hint = "; encode it first or open files in binary mode" if kind == "str" else ""
                self._abandon(TypeError(f"write() takes bytes, not {kind}{hint}"))
                return
            data = bytes(data)  # the caller may reuse its buffer
        self.createTempFile()
        if self._life.decided or not data:
            return
        if self._life.state is Phase.ENDED:
            # The pump may already be committing: these bytes would silently be left out.
            self._abandon(RuntimeError("write() after the message ended (moveFileToNew)"))
            return
        self._feed.push(data)
        if (
            self.streaming
            and self._flow.state is Flow.FLOWING
            and self._feed.backlog > self.highWaterMark
            and self.myproducer is not None
        ):
            self._flow.on(FlowEvent.PAUSE)
            self.myproducer.pauseProducing()

    def fail(self, err: Any = None) -> None:
        """Abandon the delivery: remove what it created, then errback ``defer`` with *err*.

        *err* may be a Failure or an exception; by default the exception being handled
        (or :class:`DeliveryAborted`). Does nothing once the outcome is decided.
        """
        if err is None:
            err = sys.exc_info()[1] or DeliveryAborted(
                "fail() was called; the message was not delivered"
            )
        self._abandon(err)

    def stopProducing(self) -> None:
        """Abandon the delivery (as ``IProducer.stopProducing``): ``defer`` fails."""
        self._abandon(DeliveryAborted("stopProducing() was called; the message was not delivered"))

    def moveFileToNew(self) -> None:
        """Publish the message: fsync, link into ``new/``, fsync ``new/``, then fire ``defer``.

        Asynchronous: it ends the message and the engine commits it off the loop.
        """
        if self._life.state not in (Phase.IDLE, Phase.OPEN):
            return
        self.createTempFile()
        if self._life.state is Phase.OPEN:
            self._life.on(Event.END)
            self._feed.wake()

    # -- the engine side -------------------------------------------------------------------

    def _ended(self) -> bool:
        return self._life.state is Phase.ENDED

    def _drained(self) -> None:
        if self._flow.state is Flow.FLOWING or self._feed.backlog > self.lowWaterMark:
            return  # nothing held back, or not drained enough yet
        held = self._flow.on(FlowEvent.DRAIN)
        if held is Flow.PAUSED and self.myproducer is not None:
            self.myproducer.resumeProducing()
        if held is Flow.WAITING and self.myproducer is not None and self._loop is not None:
            self.openCall = _twisted.call_soon(self._loop, self.prodProducer)

    async def _run(self) -> None:
        session = self._session
        loop = self._loop
        assert session is not None
        assert loop is not None
        token = bind(self)  # this task's context: the engine's steps run in copies of it
        try:
            delivery = await self._feed.run(session, loop, self._ended, self._drained)
        except BaseException as exc:  # CancelledError too: _abandon cancels this task
            unbind(token)  # before defer fires: what its callbacks schedule copies the context
            await session.abort()  # a no-op when the engine already cleaned up
            err = self._error if self._life.decided and self._error is not None else exc
            self._decide(err, now=True)
            return
        unbind(token)
        if self._life.decided:  # abandoned after the link: the message stays, errback fires
            assert self._error is not None
            self._decide(self._error, now=True)
            return
        published = join(self.mbox.path, "new", delivery.name)
        self._decide(None, published, now=True)

    def _pump_done(self, pump: asyncio.Task[None]) -> None:
        self._pump = None  # its context refers to this task (bind): no cycle for the GC
        # A pump cancelled before its first step never ran its except clause; it had
        # opened nothing either, so there is nothing to clean up.
        if not self._life.scheduled:
            err = self._error
            if err is None:
                err = _twisted.cancelled_error() if pump.cancelled() else pump.exception()
            self._decide(err)

    def _decide(
        self, err: Any, published: str | bytes | None = None, *, now: bool = False
    ) -> None:
        """Fire ``defer`` with the outcome: at once from the pump's last step (*now*), else on
        the next loop turn (never inside a caller's ``write()``/``fail()``/... call)."""
        self._life.on(Event.DECIDE)
        self._release_producer()

        def fire() -> None:
            self._pending = None
            self._life.on(Event.FIRE)
            d = self.defer
            if d.called:  # cancelled meanwhile
                return
            if err is not None:
                d.errback(err)
                return
            box_list = getattr(self.mbox, "list", None)
            if isinstance(box_list, list):
                box_list.append(published)
            d.callback(None)

        self._pending = fire
        loop = self._loop
        if now or loop is None or loop.is_closed():
            fire()
        else:
            loop.call_soon(self._fire_pending)

    def _fire_pending(self) -> None:
        if self._pending is not None:
            self._pending()

    def _abandon(self, err: Any) -> None:
        if self._life.decided:
            return
        self._life.on(Event.ABANDON)
        self._error = err
        self._release_producer()
        pump = self._pump
        if pump is None or pump.done():
            self._decide(err)  # nothing was started: nothing to clean up
        else:
            pump.cancel()  # the pump fires defer once the engine has cleaned up

    def _release_producer(self) -> None:
        call, self.openCall = self.openCall, None
        if call is not None and call.active():
            call.cancel()
        producer, self.myproducer = self.myproducer, None
        self.streaming = None
        if self._flow.state is Flow.FLOWING:
            return  # nothing to undo
        # Only undo what this task did; a stopped consumer does not stop the producer
        # (Twisted's never did, and e.g. a transport would drop its SMTP client).
        if self._flow.on(FlowEvent.RELEASE) is Flow.PAUSED and producer is not None:
            producer.resumeProducing()

    def _cancel(self, d: Any) -> None:
        # Deferred.cancel(): fire a result that is already decided, else abandon; Twisted
        # then fails d with CancelledError and the cleanup finishes in the background.
        if self._pending is not None:
            self._pending()
            return
        self._abandon(_twisted.cancelled_error())


_twisted.declare_consumer(MaildirMailboxAppendMessageTask)
