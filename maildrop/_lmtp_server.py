"""The sockets side of :mod:`maildrop.lmtp`: :class:`MaildirServer` listens, admits
connections up to a limit and shuts down cleanly. Import it from :mod:`maildrop.lmtp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import KW_ONLY, dataclass

import anyio

from . import _dircache
from ._accept import Acceptor
from ._listen import Listener, bind, describe, parse_hostport
from ._lmtp_flow import ReadBuffer, TurnBudget
from ._lmtp_handler import MaildirHandler
from ._lmtp_protocol import Connection
from ._lmtp_retry import RetryMemory

__all__ = ["MaildirServer", "parse_hostport"]


# A dataclass: the options are declared once, as fields (the keyword-only __init__ stores
# them); the protocol reads them off the server. eq/repr stay those of an object.
@dataclass(eq=False, repr=False)
class MaildirServer:
    """Serve LMTP (or SMTP) on sockets, delivering with a :class:`MaildirHandler`.

    maildrop's own protocol engine streams each message into its maildirs as it arrives
    (memory per connection is a small constant) and replies once it is durable: under LMTP
    once per recipient. Creating one does no I/O; :meth:`listen` binds, :meth:`shutdown`
    stops.

    Args:
        handler: the :class:`MaildirHandler` (its ``max_size`` is advertised as ``SIZE``).
        lmtp: speak LMTP (one reply per recipient) rather than SMTP.
        hostname: the name in the greeting (default: this host's name, looked up once).
        timeout: seconds without a command before a connection is closed (``421 4.4.2``).
        data_timeout: seconds without a byte of the message before it is dropped.
        max_connections: further clients get ``421 4.3.2`` and are closed.
        max_recipients: further ``RCPT`` in a transaction get ``452 4.5.3``.
        retry: SMTP only: remember there which recipients got a partly failed message, so
            the client's retry reaches only the others (``maildrop smtp`` passes a
            ``RetryMemory()``; ``None``: don't remember).
    """

    handler: MaildirHandler
    _: KW_ONLY
    lmtp: bool = True
    hostname: str | None = None
    timeout: float = 300
    data_timeout: float = 300
    max_connections: int = 512
    max_recipients: int = 1000
    retry: RetryMemory | None = None

    def __post_init__(self) -> None:
        if self.lmtp:
            self.retry = None  # LMTP replies per recipient: a retry is never partial
        self._acceptors: list[Acceptor] = []
        self._conns: set[Connection] = set()
        self._listeners: list[Listener] = []
        self._holding = False  # whether this server holds _dircache (from its first socket)
        self._changes = asyncio.Event()
        self._refused = 0
        self.budget = TurnBudget()
        self.read_buffer = ReadBuffer()

    def _admit(self, conn: Connection) -> bool:
        if len(self._conns) >= self.max_connections:
            self._refused += 1
            return False
        self._conns.add(conn)
        return True

    def _forget(self, conn: Connection) -> None:
        self._conns.discard(conn)
        self._changes.set()
        Acceptor.release()

    async def _hostname(self) -> None:
        if self.hostname is None:
            loop = asyncio.get_running_loop()
            self.hostname = await loop.run_in_executor(None, socket.getfqdn)
        # The first aborted delivery would import anyio's backend (tens of ms) on the loop.
        anyio.get_cancelled_exc_class()

    async def listen(self, address: str) -> list[str]:
        """Listen on ``HOST:PORT`` (``[::1]:24``; port 0 picks one) or ``unix:/path``.

        Binds the socket, then serves it with :meth:`listen_socket`. Returns the bound
        addresses, in the same notation. A Unix socket path is refused while another server
        answers on it and when it is not a socket; a stale socket is replaced.
        :meth:`shutdown` removes the socket file if it is still this one.

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

        Returns its address as :meth:`listen` does. :meth:`shutdown` closes *sock*, but the
        socket file of a Unix socket is never removed by this server: whoever bound it owns it
        (e.g. the parent of forked workers).

        **Cancellation:** if cancelled before serving, *sock* is left open to the caller.
        """
        await self._hostname()
        if not self._holding:  # deliveries reuse maildir directories while this one serves
            _dircache.hold()
            self._holding = True
        sock.setblocking(False)
        acceptor = Acceptor(asyncio.get_running_loop(), sock, lambda: Connection(self))
        acceptor.start()
        self._acceptors.append(acceptor)
        return [describe(sock)]

    @property
    def addresses(self) -> list[str]:
        """Every address listened on, as ``HOST:PORT`` or ``unix:/path``."""
        return [describe(a.sock) for a in self._acceptors]

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
        for acceptor in self._acceptors:
            acceptor.close()
        self.handler.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        try:
            for acceptor in self._acceptors:  # connections accepted just now get in _conns
                await acceptor.settled()
            while any(c.in_data for c in self._conns) and loop.time() < deadline:
                self._changes.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changes.wait(), deadline - loop.time())
            await self.handler.wait_idle()
        finally:
            # No await between the last check and the closes: no delivery can start.
            for conn in list(self._conns):
                conn.shut()
        for listener in self._listeners:
            listener.close()  # removes a Unix socket file only if it is still ours
        self._listeners.clear()
        if self._holding:  # the kept maildir directories are closed with the last server
            self._holding = False
            _dircache.release()
