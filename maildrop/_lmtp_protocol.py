"""One LMTP/SMTP connection: an ``asyncio.Protocol`` that drives :mod:`maildrop._wire`.

``data_received`` only hands the bytes to the protocol core; one task per connection pulls
the events in order (so pipelined commands are answered in order), resolves recipients,
and streams the message into a :class:`~maildrop._lmtp_deliver.Transaction` as it arrives.
Memory is bounded per connection: reading pauses while more than :data:`HIGH_WATER` bytes
wait in the core (the delivery is behind) or the client does not read its replies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, cast

from ._lmtp_deliver import SHUTTING_DOWN, Failed, Transaction, reply_for, smtp_reply, where
from ._lmtp_retry import digest
from ._maildir import Maildir
from ._session import Delivery
from ._wire import MAX_LINE, NEED_DATA, Body, Conversation, DataEnd, Mail, Rcpt, Reply

if TYPE_CHECKING:
    import hashlib

    from ._lmtp_server import MaildirServer

__all__ = ["HIGH_WATER", "Connection"]

log = logging.getLogger("maildrop.lmtp")

#: Received bytes waiting in the core beyond which reading pauses.
HIGH_WATER = 128 * 1024
#: Fewer buffered message bytes than this are processed without asking the budget.
SMALL = 16 * 1024


TOO_MANY = b"421 4.3.2 Too many connections, try again later\r\n"
LINE_TOO_LONG = f"451 4.6.0 Line longer than {MAX_LINE} bytes; message not delivered"


class Connection(asyncio.BufferedProtocol):
    """One client of a :class:`~maildrop.lmtp.MaildirServer`."""

    def __init__(self, server: MaildirServer) -> None:
        self.server = server
        self._rbuf = server.read_buffer.view
        self.handler = server.handler
        self.conv = Conversation(
            server.hostname or "localhost", lmtp=server.lmtp, max_size=self.handler.max_size,
            max_recipients=server.max_recipients,
        )  # fmt: skip
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._eof = False
        self._lost = False
        self._waiting_client = False
        self._stash: object = NEED_DATA  # an event taken by data_received for the task
        # The loop's clock (asyncio's is time.monotonic: called directly, once per read).
        base = type(self._loop).time is asyncio.BaseEventLoop.time
        self._clock = time.monotonic if base else self._loop.time
        self._last_command = self._last_byte = self._clock()
        self._timer: asyncio.TimerHandle | None = None
        self._sender: str | None = None
        self._rcpts: list[str] = []
        self._targets: list[Maildir | None] = []
        self._txn: Transaction | None = None
        self._hash: hashlib.blake2b | None = None
        self._retry = False
        self.delivering = False

    @property
    def in_data(self) -> bool:
        """Whether a message is being received or delivered on this connection."""
        return self.conv.in_data or self.delivering or self._txn is not None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Any loop's stream transport (uvloop's do not derive from asyncio.Transport).
        transport = self.transport = cast("asyncio.Transport", transport)
        if not self.server._admit(self):
            transport.write(TOO_MANY)
            transport.close()
            self._lost = True
            return
        transport.write(self.conv.greeting())
        self._task = self._loop.create_task(self._serve())
        self._timer = self._loop.call_later(self.server.timeout, self._tick)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._rbuf

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._rbuf[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        """Take *data* (copied into the core at once: *data* may be reused afterwards)."""
        if self._lost or self.transport is None:
            return
        self._last_byte = self._clock()
        self.conv.receive(data)
        if self.conv.buffered > HIGH_WATER and not self._reading_paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self._reading_paused = True
        if self._asleep() and not self.conv.in_data:
            try:
                self._stash = self._answer_now()
            except Exception as exc:  # a bug of ours: as in _serve
                log.error("connection failed: %r", exc, exc_info=exc)
                self.transport.close()
                return
            conv = self.conv
            large = conv.in_data and conv.buffered >= SMALL
            if self._stash is NEED_DATA and conv.in_data and not large:
                # Right after DATA: the core holds its own line end; only message bytes that
                # came along need the task (a large buffer waits for the turn budget there).
                self._stash = conv.next_event()
            if self._stash is NEED_DATA and not large:
                if self._reading_paused:  # a burst of commands, all answered
                    self.transport.resume_reading()
                    self._reading_paused = False
                return  # all answered here: the task sleeps on
        self._wake()

    def _asleep(self) -> bool:
        """Whether the task waits for the client with nothing left to do."""
        wakeup = self._wakeup
        return (
            self._waiting_client
            and wakeup is not None
            and not wakeup.done()
            and self._stash is NEED_DATA
            and self._drained is None
        )

    def _answer_now(self) -> object:
        """Answer the commands that need no waiting right here, without waking the task
        (most of a transaction); return the first event that needs the task.

        The replies to a pipelined batch (RFC 2920: MAIL, RCPTs, DATA in one packet) go out
        in one write, before anything the task answers later.
        """
        conv = self.conv
        out: list[bytes] = []
        try:
            while not conv.in_data:
                ev = conv.next_event()
                if isinstance(ev, Reply) and self._txn is None:
                    self._last_command = self._last_byte  # received in this read
                    out.append(ev.data)
                    if ev.close:  # QUIT: the task ends when the connection is lost
                        self._send(b"".join(out))
                        out.clear()
                        assert self.transport is not None
                        self.transport.close()
                        return NEED_DATA
                elif isinstance(ev, Mail):
                    self._last_command = self._last_byte  # received in this read
                    out.append(conv.answer(self._mail(ev)))
                elif isinstance(ev, Rcpt) and (now := self.handler.rcpt_reply_now(ev.address)):
                    self._last_command = self._last_byte  # received in this read
                    out.append(conv.answer(self._accept(ev.address, *now)))
                else:
                    return ev
            return NEED_DATA
        finally:
            if out:
                self._send(b"".join(out))

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None and not self._task.done() and not self._waiting_client:
            self._task.cancel()  # busy with the disk: abort the delivery
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self.server._forget(self)

    def pause_writing(self) -> None:
        self._drained = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _tick(self) -> None:
        """Close the connection when the client has been silent for too long."""
        now = self._loop.time()
        if not self._waiting_client:
            deadline = now + self.server.timeout  # the server is busy, not the client
        elif self.conv.in_data:
            deadline = self._last_byte + self.server.data_timeout
        else:
            deadline = self._last_command + self.server.timeout
        if now < deadline:
            self._timer = self._loop.call_later(deadline - now, self._tick)
            return
        log.info("timeout: closing an idle connection")
        self._send(f"421 4.4.2 {self.conv.hostname} Timeout, closing connection\r\n".encode())
        self.shut(say=False)

    def shut(self, *, say: bool = True) -> None:
        """Say ``421`` (unless in the middle of a message) and close the connection."""
        if self.transport is None or self._lost:
            return
        if say and not self.in_data:
            self._send(SHUTTING_DOWN.encode() + b"\r\n")
        self.transport.close()

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- the conversation --------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            await self._converse()
        except Exception as exc:  # a bug of ours: answer nothing more, log it, hang up
            log.error("connection failed: %r", exc, exc_info=exc)
        finally:
            try:
                await self._abort()
            finally:
                if self.transport is not None:
                    self.transport.close()

    async def _next(self) -> object:
        """Return the next event; wait for the client's bytes (and reading room) as needed."""
        while True:
            if self._stash is not NEED_DATA:
                ev, self._stash = self._stash, NEED_DATA
                return ev
            if self.conv.in_data and self.conv.buffered >= SMALL:
                await self.server.budget.take(self.conv.buffered)
            ev = self.conv.next_event()
            if ev is not NEED_DATA or self._eof:
                return ev
            if self._reading_paused:
                assert self.transport is not None
                self.transport.resume_reading()
                self._reading_paused = False
            self._wakeup = self._loop.create_future()
            self._waiting_client = True
            try:
                await self._wakeup
            finally:
                self._waiting_client = False

    async def _converse(self) -> None:
        while not self._lost:
            ev = await self._next()
            if ev is NEED_DATA:
                return  # the client hung up
            if self._drained is not None:  # the client does not read its replies
                self._waiting_client = True
                try:
                    await self._drained
                finally:
                    self._waiting_client = False
            if isinstance(ev, Body):
                await self._body(ev.data)
                continue
            self._last_command = self._loop.time()
            if isinstance(ev, Reply):
                self._send(ev.data)
                if ev.close:
                    return
                if self._txn is not None and not self.conv.in_transaction:
                    await self._abort()  # RSET or a hello after a BDAT chunk
            elif isinstance(ev, Mail):
                self._send(self.conv.answer(self._mail(ev)))
            elif isinstance(ev, Rcpt):
                self._send(self.conv.answer(await self._rcpt(ev.address)))
            elif isinstance(ev, DataEnd):
                self._send(self.conv.answer(await self._data_end(ev)))

    def _mail(self, ev: Mail) -> str:
        if self.handler.closing:
            return SHUTTING_DOWN
        self._sender = ev.sender
        self._rcpts, self._targets = [], []
        return "250 2.1.0 OK"

    async def _rcpt(self, address: str) -> str:
        return self._accept(address, *await self.handler.rcpt_reply(address))

    def _accept(self, address: str, reply: str, md: Maildir | None) -> str:
        if md is not None:
            self._rcpts.append(address)
            self._targets.append(md)
        return reply

    def _start(self) -> Transaction:
        if self.server.retry is not None and not self.conv.lmtp:
            sender = self._sender or ""
            self._hash = digest(sender)
            self._retry = self.server.retry.expect(sender, time.monotonic())
        try:
            self._txn = self.handler.transaction(
                self._sender, self._rcpts, self._targets, separate=self._retry
            )
        except Exception as exc:  # a bug (or an override's error): never a permanent reply
            log.error("cannot start a delivery: %r", exc, exc_info=exc)
            self._txn = Failed(self._rcpts, exc)
        return self._txn

    async def _body(self, data: bytes) -> None:
        txn = self._txn or self._start()
        if self.conv.line_too_long:
            await txn.abort()
            return
        if self._hash is not None:
            self._hash.update(data)
        if not txn.failed:
            await txn.write(data)

    async def _data_end(self, ev: DataEnd) -> str | list[str]:
        txn = self._txn or self._start()
        n = self.conv.recipients if self.conv.lmtp and ev.last else 1
        if ev.line_too_long:
            await self._abort()
            log.warning("refused a message with a line over %d bytes", MAX_LINE)
            return [LINE_TOO_LONG] * n
        if not ev.last and not txn.failed:
            return f"250 2.0.0 {ev.size} octets received"
        skip: frozenset[str] = frozenset()
        key = self._hash.digest() if self._hash is not None else b""
        retry = self.server.retry
        if self._retry and retry is not None:
            skip = retry.delivered(key, time.monotonic())
        self.delivering = True
        started = time.monotonic()  # the log's time: from the end of the data to durable
        self.handler.begin()
        try:
            results = await txn.finish(skip)
        except Exception as exc:
            log.error("delivery failed: %r", exc, exc_info=exc)
            results = [exc] * len(self._rcpts)
        finally:
            self.handler.end()
            self.delivering = False
            self._txn = None
        elapsed = time.monotonic() - started
        replies = [reply_for(a, r, elapsed) for a, r in zip(self._rcpts, results, strict=True)]
        if self.conv.lmtp and ev.last:
            return replies
        if retry is not None and self._hash is not None:
            served = skip | {where(md) for md, r in zip(self._targets, results, strict=True)
                             if md is not None and isinstance(r, Delivery)}  # fmt: skip
            failed = any(not r.startswith("2") for r in replies)
            retry.remember(key, self._sender or "", served if failed else frozenset(),
                           time.monotonic())  # fmt: skip
        return smtp_reply(replies)

    async def _abort(self) -> None:
        txn, self._txn = self._txn, None
        self._hash = None
        self._retry = False
        if txn is not None:
            await txn.abort()
