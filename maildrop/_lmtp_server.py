"""The sockets side of :mod:`maildrop.lmtp`: :class:`MaildirServer` listens, admits
connections up to a limit and shuts down cleanly. Import it from :mod:`maildrop.lmtp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat

import anyio

from ._lmtp_handler import MaildirHandler
from ._lmtp_protocol import Connection, TurnBudget
from ._lmtp_retry import RetryMemory

__all__ = ["MaildirServer", "parse_hostport"]


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

    def __init__(
        self,
        handler: MaildirHandler,
        *,
        lmtp: bool = True,
        hostname: str | None = None,
        timeout: float = 300,
        data_timeout: float = 300,
        max_connections: int = 512,
        max_recipients: int = 1000,
        retry: RetryMemory | None = None,
    ) -> None:
        self.handler = handler
        self.lmtp = lmtp
        self.hostname = hostname
        self.timeout = timeout
        self.data_timeout = data_timeout
        self.max_connections = max_connections
        self.max_recipients = max_recipients
        self.retry = None if lmtp else retry
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[Connection] = set()
        self._unix_paths: list[str] = []
        self._changes = asyncio.Event()
        self._refused = 0
        self.budget = TurnBudget()

    def _admit(self, conn: Connection) -> bool:
        if len(self._conns) >= self.max_connections:
            self._refused += 1
            return False
        self._conns.add(conn)
        return True

    def _forget(self, conn: Connection) -> None:
        self._conns.discard(conn)
        self._changes.set()

    async def _hostname(self) -> None:
        if self.hostname is None:
            loop = asyncio.get_running_loop()
            self.hostname = await loop.run_in_executor(None, socket.getfqdn)
        # The first aborted delivery would import anyio's backend (tens of ms) on the loop.
        anyio.get_cancelled_exc_class()

    async def listen(self, address: str) -> list[str]:
        """Listen on ``HOST:PORT`` (``[::1]:24``; port 0 picks one) or ``unix:/path``.

        Binds the socket, then serves it with :meth:`listen_socket`. Returns the bound
        addresses, in the same notation.

        Raises:
            ValueError: *address* is malformed.
            OSError: the address cannot be bound.

        **Cancellation:** listeners already bound by this call stay open until
        :meth:`shutdown`.
        """
        if address.startswith("unix:"):
            path = address[len("unix:") :]
            if not path:
                raise ValueError("unix: needs a socket path, e.g. unix:/run/maildrop/lmtp")
            sock = _bind_unix(path)
            self._unix_paths.append(path)
        else:
            host, port = parse_hostport(address)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=1024)
        return await self.listen_socket(sock)

    async def listen_socket(self, sock: socket.socket) -> list[str]:
        """Serve on *sock*, an already bound and listening TCP or unix socket.

        Returns its address as :meth:`listen` does. The server owns *sock* from now on
        (:meth:`shutdown` closes it).

        **Cancellation:** *sock* is served until :meth:`shutdown` once this returned.
        """
        await self._hostname()
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        srv: asyncio.AbstractServer
        if sock.family == socket.AF_UNIX:
            srv = await loop.create_unix_server(lambda: Connection(self), sock=sock)
        else:
            srv = await loop.create_server(lambda: Connection(self), sock=sock)
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
        self.handler.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        try:
            while any(c.in_data for c in self._conns) and loop.time() < deadline:
                self._changes.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changes.wait(), deadline - loop.time())
            await self.handler.wait_idle()
        finally:
            # No await between the last check and the closes: no delivery can start.
            for conn in list(self._conns):
                conn.shut()
        for srv in self._servers:
            await srv.wait_closed()
        for path in self._unix_paths:
            # asyncio leaves the socket file behind before Python 3.13.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._unix_paths.clear()


def _bind_unix(path: str) -> socket.socket:
    """Bind a unix socket at *path* (replacing a socket file left there) and listen."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock


def parse_hostport(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (or ``[IPv6]:PORT``) into its parts.

    Raises:
        ValueError: with a message that says what a valid address looks like.
    """
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(
            f"invalid address {address!r}: use HOST:PORT (e.g. 127.0.0.1:24, [::1]:24) "
            "or unix:/path/to/socket"
        )
    return host, int(port)


def _bound(srv: asyncio.AbstractServer) -> list[str]:
    out = []
    for sock in getattr(srv, "sockets", ()):
        name = sock.getsockname()
        if sock.family == socket.AF_UNIX:
            out.append(f"unix:{name}")
        elif sock.family == socket.AF_INET6:
            out.append(f"[{name[0]}]:{name[1]}")
        else:
            out.append(f"{name[0]}:{name[1]}")
    return out
