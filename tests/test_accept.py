"""Accepting connections: the shared connection counts and the acceptor's rules."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from maildrop import _accept
from maildrop._accept import Acceptor, Share


class Probe(asyncio.Protocol):
    """Records the connection it is given."""

    made: ClassVar[list[Probe]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        Probe.made.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        Acceptor.release()


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    """No share and no recorded connection before and after each test."""
    Probe.made = []
    _accept.SHARE = None
    yield
    _accept.SHARE = None


def listening(cls: type[socket.socket] = socket.socket) -> socket.socket:
    """A TCP socket listening on loopback, non-blocking."""
    sock = cls(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


async def connect(sock: socket.socket) -> socket.socket:
    """Connect a blocking-free client to *sock* (the kernel completes it from the queue)."""
    client = socket.socket()
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, sock.getsockname())
    return client


async def settle(seconds: float = 0.05) -> None:
    """Let the loop run its callbacks for *seconds*."""
    await asyncio.sleep(seconds)


def listening_as(share: Share, slot: int) -> None:
    """Make this process *slot*'s worker, listening (as a forked worker's first listen)."""
    share.join(slot)
    share.open()


def busier_than_sibling(held: int) -> Share:
    """Set SHARE: this process (slot 0) holds *held* connections, its sibling (slot 1) none."""
    share = _accept.SHARE = Share(2)
    listening_as(share, 1)
    listening_as(share, 0)
    share.add(held)
    return share


def accepting(cls: type[socket.socket] = socket.socket) -> tuple[Acceptor, socket.socket]:
    """An Acceptor of Probe protocols, started on a fresh listening socket."""
    sock = listening(cls)
    acceptor = Acceptor(asyncio.get_running_loop(), sock, Probe)
    acceptor.start()
    return acceptor, sock


def test_share_needs_a_worker() -> None:
    """A share for no worker is refused."""
    with pytest.raises(ValueError, match=r"^workers must be at least 1, not 0$"):
        Share(0)


def test_share_least_loaded_ignores_gone_slots() -> None:
    """Only slots with a worker count; the least loaded may take, a busier one may not."""
    share = Share(3)
    assert share.least_loaded()  # no slot joined: a lone process
    listening_as(share, 1)
    share.add(2)
    assert share.least_loaded()  # slots 0 and 2 have no worker
    listening_as(share, 0)
    assert share.least_loaded()
    assert share.held() == 0
    share.slot = 1
    assert not share.least_loaded()
    share.vacate(0)
    assert share.least_loaded()
    assert share.held() == 2


def test_a_worker_counts_from_its_first_listen_until_it_closes() -> None:
    """join() publishes nothing; open() counts the slot from 0; leave() hands it all over."""
    share = Share(2)
    listening_as(share, 1)
    share.add(2)
    share.join(0)
    share.slot = 1
    assert share.least_loaded()  # slot 0 joined but not listening: not waited for
    share.slot = 0
    share.open()
    share.open()  # a second listener: still 0
    assert share.held() == 0
    share.slot = 1
    assert not share.least_loaded()
    share.slot = 0
    share.leave()
    share.slot = 1
    assert share.least_loaded()


def test_share_is_seen_across_fork() -> None:
    """A forked child's count is what its parent reads."""
    share = Share(2)
    listening_as(share, 0)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        listening_as(share, 1)
        share.add(3)
        os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert share.least_loaded()
    share.add(4)
    assert not share.least_loaded()


@pytest.mark.asyncio
async def test_accepts_into_protocols_and_close_stops() -> None:
    """Connections reach protocols; after close the socket is closed and nothing is taken."""
    acceptor, sock = accepting()
    clients = [await connect(sock) for _ in range(3)]
    await settle()
    assert len(Probe.made) == 3
    acceptor.close()
    assert sock.fileno() == -1
    acceptor.start()  # a closed acceptor stays closed
    for c in clients:
        c.close()
    for p in Probe.made:
        p.transport.close()


@pytest.mark.asyncio
async def test_a_busier_worker_leaves_the_connection_to_its_sibling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Holding more than a sibling, the acceptor waits; it takes once the sibling catches up."""
    monkeypatch.setattr(_accept, "MAX_DEFER", 30.0)
    share = busier_than_sibling(1)
    acceptor, sock = accepting()
    client = await connect(sock)
    await settle(0.1)
    assert Probe.made == []  # left in the queue for the sibling
    share.slot = 1
    share.add(1)  # the sibling took one elsewhere: now even
    share.slot = 0
    await settle(0.1)
    assert len(Probe.made) == 1
    assert share.held() == 2
    Probe.made[0].transport.close()
    await settle()
    assert share.held() == 1  # released when the protocol lost it
    acceptor.close()
    client.close()


@pytest.mark.asyncio
async def test_a_deferral_ends_with_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sibling took the deferred connection: a later one is deferred afresh, not taken."""
    monkeypatch.setattr(_accept, "MAX_DEFER", 0.3)
    monkeypatch.setattr(_accept, "HOLD_BACK", 0.01)
    busier_than_sibling(1)
    acceptor, sock = accepting()
    first = await connect(sock)
    await settle(0.05)
    taken, _ = sock.accept()  # the sibling's accept
    await settle(0.4)  # longer than MAX_DEFER since the deferral began
    second = await connect(sock)
    await settle(0.05)
    assert Probe.made == []  # left for the sibling again
    await settle(0.4)
    assert len(Probe.made) == 1  # ...until MAX_DEFER of this deferral
    Probe.made[0].transport.close()
    acceptor.close()
    for s in (first, second, taken):
        s.close()


@pytest.mark.asyncio
async def test_past_max_defer_every_queued_connection_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sibling that takes nothing costs the queue one MAX_DEFER, not one per connection."""
    monkeypatch.setattr(_accept, "MAX_DEFER", 0.15)
    busier_than_sibling(3)
    acceptor, sock = accepting()
    clients = [await connect(sock) for _ in range(5)]
    await settle(0.4)
    assert len(Probe.made) == 5
    for p in Probe.made:
        p.transport.close()
    acceptor.close()
    for c in clients:
        c.close()


@pytest.mark.asyncio
async def test_a_stuck_sibling_delays_a_connection_by_max_defer_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sibling that never takes: the busier acceptor takes after MAX_DEFER."""
    monkeypatch.setattr(_accept, "MAX_DEFER", 0.3)
    busier_than_sibling(5)
    acceptor, sock = accepting()
    client = await connect(sock)
    await settle(0.1)
    assert Probe.made == []
    await settle(0.5)
    assert len(Probe.made) == 1
    Probe.made[0].transport.close()
    acceptor.close()
    client.close()


class Refusing(socket.socket):
    """A listening socket whose accept fails with the errors queued in ``errors``."""

    errors: ClassVar[list[OSError]] = []
    calls = 0

    def accept(self) -> tuple[socket.socket, object]:
        Refusing.calls += 1
        if Refusing.errors:
            raise Refusing.errors.pop(0)
        return super().accept()


@pytest.mark.asyncio
async def test_out_of_descriptors_rests_and_logs_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """EMFILE pauses the listener for RETRY_SECONDS (no accept meanwhile), one log line a
    second; then it serves."""
    monkeypatch.setattr(_accept, "RETRY_SECONDS", 0.3)
    emfile = OSError(errno.EMFILE, "Too many open files")
    Refusing.errors, Refusing.calls = [emfile, emfile], 0
    acceptor, sock = accepting(Refusing)
    client = await connect(sock)
    await settle(0.15)
    assert Refusing.calls == 1  # resting: the queued connection is not retried yet
    await settle(0.9)
    assert Refusing.calls >= 3  # two failures, each followed by a rest, then the accept
    assert len(Probe.made) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "cannot accept connections: [Errno 24] Too many open files (retrying); raise the file "
        "descriptor limit (ulimit -n) or lower --max-connections"
    ]
    Probe.made[0].transport.close()
    acceptor.close()
    client.close()


@pytest.mark.asyncio
async def test_a_connections_own_error_moves_on_without_resting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """EPROTO (accept(2): retry) is logged and the next queued connection is taken at once."""
    Refusing.errors, Refusing.calls = [OSError(errno.EPROTO, "Protocol error")], 0
    acceptor, sock = accepting(Refusing)
    client = await connect(sock)
    await settle()
    assert len(Probe.made) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "cannot accept connections: [Errno 71] Protocol error (retrying)"
    ]
    Probe.made[0].transport.close()
    acceptor.close()
    client.close()


@pytest.mark.asyncio
async def test_an_aborted_connection_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """ECONNABORTED (the client left while queued) moves on to the next one, unlogged."""
    Refusing.errors, Refusing.calls = [ConnectionAbortedError(errno.ECONNABORTED, "gone")], 0
    acceptor, sock = accepting(Refusing)
    client = await connect(sock)
    await settle()
    assert len(Probe.made) == 1
    assert Refusing.calls >= 2
    assert caplog.records == []
    Probe.made[0].transport.close()
    acceptor.close()
    client.close()


@pytest.mark.asyncio
async def test_a_connection_no_protocol_got_is_closed_and_released(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Setting up the transport fails before the protocol exists: closed, uncounted, logged."""
    share = _accept.SHARE = Share(1)
    listening_as(share, 0)
    sock = listening()
    loop = asyncio.get_running_loop()

    async def broken(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOTSOCK, "not a socket")

    acceptor = Acceptor(loop, sock, Probe)
    loop.connect_accepted_socket = broken  # type: ignore[assignment,method-assign]
    try:
        acceptor.start()
        client = await connect(sock)
        await settle()
    finally:
        del loop.connect_accepted_socket  # type: ignore[attr-defined]
    assert Probe.made == []
    assert share.held() == 0
    assert client.recv(1) == b""  # the server side was closed
    assert [r.getMessage() for r in caplog.records] == [
        "cannot set up an accepted connection: [Errno 88] not a socket"
    ]
    acceptor.close()
    client.close()


@pytest.mark.asyncio
async def test_a_protocol_that_cannot_be_made_closes_and_releases(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The protocol factory raises: the socket is closed and the count released."""
    share = _accept.SHARE = Share(1)
    listening_as(share, 0)
    sock = listening()

    def refuse() -> asyncio.BaseProtocol:
        raise MemoryError("no room for a protocol")

    acceptor = Acceptor(asyncio.get_running_loop(), sock, refuse)
    acceptor.start()
    client = await connect(sock)
    await settle()
    assert share.held() == 0
    assert client.recv(1) == b""
    assert [r.getMessage() for r in caplog.records] == [
        "cannot set up an accepted connection: no room for a protocol"
    ]
    acceptor.close()
    client.close()


@pytest.mark.asyncio
async def test_shutdown_closes_a_connection_accepted_in_its_turn(tmp_path: Path) -> None:
    """A connection accepted but not yet set up when shutdown starts is closed by it too."""
    from maildrop.lmtp import MaildirHandler, MaildirServer

    server = MaildirServer(MaildirHandler(tmp_path), hostname="h")
    (address,) = await server.listen("127.0.0.1:0")
    host, port = address.rsplit(":", 1)
    client = socket.create_connection((host, int(port)))
    server._acceptors[0]._ready()  # accepted: its protocol is made on a later turn
    await server.shutdown(0)
    await settle()  # the closed transports report their loss
    assert server.connections == 0
    client.settimeout(5)
    data = b""
    while chunk := client.recv(4096):
        data += chunk
    client.close()
    assert data.startswith(b"220 ")  # greeted, then closed by the shutdown
