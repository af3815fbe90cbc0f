"""Accepting connections: the shared connection counts and the acceptor's rules."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Iterator
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


def test_share_needs_a_worker() -> None:
    """A share for no worker is refused."""
    with pytest.raises(ValueError, match=r"^workers must be at least 1, not 0$"):
        Share(0)


def test_share_least_loaded_ignores_gone_slots() -> None:
    """Only slots with a worker count; the least loaded may take, a busier one may not."""
    share = Share(3)
    assert share.least_loaded()  # no slot claimed: a lone process
    share.claim(1)
    share.add(2)
    assert share.least_loaded()  # slots 0 and 2 have no worker
    share.claim(0)
    assert share.least_loaded()
    assert share.held() == 0
    share.slot = 1
    assert not share.least_loaded()
    share.vacate(0)
    assert share.least_loaded()
    assert share.held() == 2


def test_share_is_seen_across_fork() -> None:
    """A forked child's count is what its parent reads."""
    share = Share(2)
    share.claim(0)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        share.claim(1)
        share.add(3)
        os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert share.least_loaded()
    share.add(4)
    assert not share.least_loaded()


@pytest.mark.asyncio
async def test_accepts_into_protocols_and_close_stops() -> None:
    """Connections reach protocols; after close the socket is closed and nothing is taken."""
    sock = listening()
    acceptor = Acceptor(asyncio.get_running_loop(), sock, Probe)
    acceptor.start()
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
    share = _accept.SHARE = Share(2)
    share.claim(1)
    share.claim(0)
    share.add(1)  # this process holds 1, its sibling 0
    sock = listening()
    acceptor = Acceptor(asyncio.get_running_loop(), sock, Probe)
    acceptor.start()
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
async def test_a_stuck_sibling_delays_a_connection_by_max_defer_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sibling that never takes: the busier acceptor takes after MAX_DEFER."""
    monkeypatch.setattr(_accept, "MAX_DEFER", 0.3)
    share = _accept.SHARE = Share(2)
    share.claim(1)
    share.claim(0)
    share.add(5)
    sock = listening()
    acceptor = Acceptor(asyncio.get_running_loop(), sock, Probe)
    acceptor.start()
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
    """EMFILE pauses the listener for RETRY_SECONDS, one log line a second; then it serves."""
    monkeypatch.setattr(_accept, "RETRY_SECONDS", 0.05)
    emfile = OSError(errno.EMFILE, "Too many open files")
    Refusing.errors, Refusing.calls = [emfile, emfile, emfile], 0
    sock = listening(Refusing)
    acceptor = Acceptor(asyncio.get_running_loop(), sock, Probe)
    acceptor.start()
    client = await connect(sock)
    await settle(0.5)
    assert Refusing.calls >= 4  # three failures, each followed by a rest, then the accept
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
async def test_an_aborted_connection_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """ECONNABORTED (the client left while queued) moves on to the next one, unlogged."""
    Refusing.errors, Refusing.calls = [ConnectionAbortedError(errno.ECONNABORTED, "gone")], 0
    sock = listening(Refusing)
    acceptor = Acceptor(asyncio.get_running_loop(), sock, Probe)
    acceptor.start()
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
    share.claim(0)
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
