"""The sockets side of :mod:`maildrop.lmtp`: aiosmtpd's protocols with two fixes, and the
server that runs them and shuts down cleanly. Import it from :mod:`maildrop.lmtp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from typing import Any, AnyStr

from aiosmtpd.lmtp import LMTP as _AioLMTP
from aiosmtpd.smtp import SMTP as _AioSMTP

from . import MessageTooLargeError, outcome
from ._listen import BACKLOG, Listener, bind, describe, parse_hostport
from ._lmtp_handler import SHUTTING_DOWN, MaildirHandler

__all__ = ["LMTP", "SMTP", "MaildirServer", "parse_hostport"]

# Python 3.13's asyncio removes a Unix server's socket file when the server closes, even for a
# socket it was handed: forked workers would delete the socket their siblings still serve.
_KEEP_SOCKET_FILE: dict[str, Any] = (
    {"cleanup_socket": False} if sys.version_info >= (3, 13) else {}
)

# Replies that aiosmtpd itself sends after the data of DATA was read. Under LMTP the client
# waits for one reply per accepted recipient, so they are repeated that many times.
_TOO_MUCH_DATA = "552 Error: Too much mail data"
_AIOSMTPD_DATA_ERRORS = frozenset(
    {
        _TOO_MUCH_DATA,
        "500 Line too long (see RFC5321 4.5.3.1.6)",
        "500 Error: strict ASCII mode",
    }
)


class SMTP(_AioSMTP):
    """aiosmtpd's ``SMTP``, tracked by its :class:`MaildirServer` for a clean shutdown."""

    def __init__(self, handler: Any, *, owner: MaildirServer | None = None, **kw: Any) -> None:
        super().__init__(handler, **kw)
        self._owner = owner
        self._in_data = False
        self._data_rcpts = 0

    @property
    def in_data(self) -> bool:
        """Whether a message is being received or delivered on this connection."""
        return self._in_data

    async def smtp_DATA(self, arg: str) -> None:
        self._data_rcpts = len(self.envelope.rcpt_tos) if self.envelope is not None else 0
        self._in_data = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self._in_data = False
            self._data_rcpts = 0
            if self._owner is not None:
                self._owner._changed()

    async def push(self, status: AnyStr) -> None:
        text = status if isinstance(status, str) else status.decode("utf-8", "replace")
        if self._data_rcpts and text in _AIOSMTPD_DATA_ERRORS:
            if text == _TOO_MUCH_DATA:
                # The same reply as the handler's own size check, with its enhanced code.
                text = outcome(MessageTooLargeError(self.data_size_limit or 0)).reply
            n = self._data_rcpts if isinstance(self, _AioLMTP) else 1
            await super().push("\r\n".join([text] * n))
            return
        await super().push(status)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if self._owner is not None:
            self._owner._forget(self)

    def shut(self) -> None:
        """Say ``421`` (unless in the middle of a message) and close the connection."""
        transport = self.transport
        if transport is None:
            return
        if not self._in_data and isinstance(transport, asyncio.WriteTransport):
            with contextlib.suppress(Exception):
                transport.write(SHUTTING_DOWN.encode("ascii") + b"\r\n")
        transport.close()


class LMTP(SMTP, _AioLMTP):
    """aiosmtpd's ``LMTP``; its own DATA errors get one reply per recipient (RFC 2033).

    "Too much mail data" becomes ``552 5.3.4 Message too big for system``, as in SMTP.
    """


class MaildirServer:
    """Serve LMTP (or SMTP) on sockets, delivering with a :class:`MaildirHandler`.

    Creating one does no I/O; :meth:`listen` binds, :meth:`shutdown` stops.

    Args:
        handler: the handler (usually a :class:`MaildirHandler`).
        lmtp: speak LMTP (one reply per recipient) rather than SMTP.
        hostname: the name in the greeting (default: this host's name, looked up once).
        data_size_limit: the largest message accepted into memory (aiosmtpd's default is
            32 MiB; ``None`` is unlimited).
        timeout: seconds of client silence before a connection is dropped.
    """

    def __init__(
        self,
        handler: Any,
        *,
        lmtp: bool = True,
        hostname: str | None = None,
        data_size_limit: int | None = 33554432,
        timeout: float = 300,
    ) -> None:
        self.handler = handler
        self.lmtp = lmtp
        self.hostname = hostname
        self.data_size_limit = data_size_limit
        self.timeout = timeout
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[SMTP] = set()
        self._listeners: list[Listener] = []
        self._changes = asyncio.Event()

    def _protocol(self) -> SMTP:
        cls = LMTP if self.lmtp else SMTP
        proto = cls(
            self.handler,
            owner=self,
            hostname=self.hostname,
            data_size_limit=self.data_size_limit,
            timeout=self.timeout,
            loop=asyncio.get_running_loop(),
        )
        self._conns.add(proto)
        return proto

    def _forget(self, proto: SMTP) -> None:
        self._conns.discard(proto)
        self._changed()

    def _changed(self) -> None:
        self._changes.set()

    async def listen(self, address: str) -> list[str]:
        """Listen on ``HOST:PORT`` (``[::1]:24``; port 0 picks one) or ``unix:/path``.

        Returns the bound addresses, in the same notation. A Unix socket path is refused
        while another server answers on it and when it is not a socket; a stale socket is
        replaced. :meth:`shutdown` removes the socket file if it is still this one.

        Raises:
            ValueError: *address* is malformed.
            OSError: the address cannot be bound (the message names it).

        **Cancellation:** listeners already bound by this call stay open until
        :meth:`shutdown`.
        """
        listeners = bind(address)
        self._listeners.extend(listeners)
        return [a for listener in listeners for a in await self.listen_socket(listener.sock)]

    async def listen_socket(self, sock: socket.socket) -> list[str]:
        """Serve on *sock*, an already bound and listening TCP or Unix socket.

        Returns its address. The socket file of a Unix socket is never removed by this
        server: whoever bound it owns it (e.g. the parent of forked workers).

        **Cancellation:** if cancelled before serving, *sock* is left open to the caller.
        """
        loop = asyncio.get_running_loop()
        if self.hostname is None:
            self.hostname = await loop.run_in_executor(None, socket.getfqdn)
        # asyncio calls listen() again with its own backlog (100 by default): keep ours.
        if sock.family == socket.AF_UNIX:
            srv: asyncio.AbstractServer = await loop.create_unix_server(
                self._protocol, sock=sock, backlog=BACKLOG, **_KEEP_SOCKET_FILE
            )
        else:
            srv = await loop.create_server(self._protocol, sock=sock, backlog=BACKLOG)
        self._servers.append(srv)
        return _bound(srv)

    @property
    def addresses(self) -> list[str]:
        """Every address listened on, as ``HOST:PORT`` or ``unix:/path``."""
        return [a for srv in self._servers for a in _bound(srv)]

    @property
    def connections(self) -> int:
        """How many clients are connected."""
        return len(self._conns)

    async def shutdown(self, grace: float = 30.0) -> None:
        """Stop listening, finish deliveries in flight, then close every connection.

        A message still being received gets up to *grace* seconds to arrive and be
        delivered; a delivery already running is always awaited (it is bounded by the
        disk). New transactions get ``421 4.3.2``; idle connections get ``421`` and are
        closed.

        **Cancellation:** connections are closed at once; deliveries in flight are
        cancelled (nothing partial stays in ``new/``).
        """
        for srv in self._servers:
            srv.close()
        if isinstance(self.handler, MaildirHandler):
            self.handler.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        try:
            while any(c.in_data for c in self._conns) and loop.time() < deadline:
                self._changes.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changes.wait(), deadline - loop.time())
            if isinstance(self.handler, MaildirHandler):
                await self.handler.wait_idle()
        finally:
            # No await between the last check and the closes: no delivery can start.
            for conn in list(self._conns):
                conn.shut()
        for srv in self._servers:
            await srv.wait_closed()
        for listener in self._listeners:
            listener.close()  # removes a Unix socket file only if it is still ours
        self._listeners.clear()


def _bound(srv: asyncio.AbstractServer) -> list[str]:
    return [describe(sock) for sock in getattr(srv, "sockets", ())]
