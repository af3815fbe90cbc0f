"""Listening sockets from the command line's address notation, and the cleanup they own.

``HOST:PORT``, ``[IPv6]:PORT`` and ``unix:PATH`` become bound, listening sockets
(:func:`bind`). A Unix socket path is only ever taken over from a dead server: if another
server answers on it, binding fails; a socket nobody answers on is stale and replaced; any
other kind of file is refused. Nothing is created outside the path's directory, and every
error names the address that failed. The process that binds a socket owns it: its
:class:`Listener` removes the socket file on :meth:`~Listener.close`, and only if the file is
still the one it created (same device and inode), so a server that was replaced never deletes
its successor's socket. Processes that are handed a socket (forked workers) never remove it.

Probing, replacing and removing a socket file happen under an ``flock`` of its directory, so
two maildrop servers starting (or one stopping while another starts) on the same path cannot
interleave.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import threading
from collections.abc import Iterator

__all__ = ["BACKLOG", "Listener", "bind", "describe", "parse_address", "parse_hostport"]

#: The listen() backlog: connections the kernel queues while every worker is busy.
BACKLOG = 512

# Pins a socket file's inode without opening the socket (which open() cannot do).
_PIN_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC

_USAGE = "use HOST:PORT (e.g. 127.0.0.1:24, [::1]:24) or unix:/path/to/socket"


def parse_hostport(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (or ``[IPv6]:PORT``) into its parts.

    Raises:
        ValueError: with a message that says what a valid address looks like.
    """
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid address {address!r}: {_USAGE}")
    return host, int(port)


def parse_address(address: str) -> tuple[str, int] | str:
    """Return ``(host, port)`` for a TCP address, or the path of a ``unix:PATH`` one.

    Raises:
        ValueError: *address* is malformed (the message says what a valid one looks like).
    """
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if not path:
            raise ValueError("unix: needs a socket path, e.g. unix:/run/maildrop/lmtp")
        if "\0" in path:
            raise ValueError(f"invalid address {address!r}: a socket path cannot contain NUL")
        return path
    return parse_hostport(address)


def describe(sock: socket.socket) -> str:
    """Return the address *sock* is bound to, in the command line's notation."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{os.fsdecode(name)}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


class Listener:
    """One bound, listening socket; removes its Unix socket file on :meth:`close`.

    The socket file's inode is pinned with an ``O_PATH`` descriptor: an inode number is
    reused as soon as its file is gone, so without the pin a successor's socket created
    after ours was removed could carry our inode number and be deleted as ours.
    """

    def __init__(self, sock: socket.socket, path: str | None = None) -> None:
        self.sock = sock
        #: The address, in the command line's notation (with the port actually bound).
        self.address = describe(sock)
        self.path = path
        self._pin = -1
        self._lock = threading.Lock()  # close() may race with itself (the hard-stop thread)
        if path is not None:
            self._pin = os.open(path, _PIN_FLAGS)

    def close(self) -> None:
        """Close the socket; remove its file if it is still the one this listener bound."""
        self.sock.close()
        with self._lock:
            pin, self._pin = self._pin, -1
        if self.path is None or pin < 0:
            return
        try:
            mine = os.fstat(pin)
            with contextlib.suppress(FileNotFoundError), _locked_dir(self.path):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                    os.unlink(self.path)
        finally:
            os.close(pin)


def bind(address: str, *, backlog: int = BACKLOG) -> list[Listener]:
    """Bind and listen on *address*; return one listener per socket (a host name may
    resolve to several addresses, e.g. ``localhost:24`` to IPv4 and IPv6).

    Raises:
        ValueError: *address* is malformed.
        OSError: it cannot be bound; the message names the address (and the errno is kept).
    """
    where = parse_address(address)
    if isinstance(where, str):
        return [_bind_unix(where, backlog)]
    host, port = where
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(errno.EADDRNOTAVAIL, f"cannot listen on {address}: {exc}") from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            _bind_or_say(sock, sockaddr, address)
            sock.listen(backlog)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return [Listener(sock) for sock in socks]


def _bind_or_say(sock: socket.socket, where: str | tuple[object, ...], address: str) -> None:
    try:
        sock.bind(where)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _locked_dir(path: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the directory of *path* (it creates nothing)."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _bind_unix(path: str, backlog: int) -> Listener:
    address = f"unix:{path}"
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            errno.ENOENT,
            f"cannot listen on {address}: directory {directory} does not exist "
            "(create it first: maildrop creates nothing outside it)",
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _locked_dir(path):
            _remove_stale(path, address)
            _bind_or_say(sock, path, address)
            sock.listen(backlog)
            return Listener(sock, path)
    except BaseException:
        sock.close()
        raise


def _remove_stale(path: str, address: str) -> None:
    """Remove the socket at *path* if no server answers on it; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(
            errno.EEXIST,
            f"cannot listen on {address}: {path} exists and is not a socket "
            "(refusing to replace it; remove it or choose another path)",
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except ConnectionRefusedError:  # nobody listens: a dead server's socket
            os.unlink(path)
            return
        except FileNotFoundError:
            return
        except BlockingIOError:  # a live server whose backlog is full
            pass
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot listen on {address}: cannot probe {path}: {exc.strerror}"
            ) from None
    raise OSError(
        errno.EADDRINUSE,
        f"cannot listen on {address}: another server is listening on it "
        "(stop it first, or choose another path)",
    )
