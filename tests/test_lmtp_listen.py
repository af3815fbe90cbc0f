"""MaildirServer's sockets: listen() binds by the takeover rules, listen_socket() serves a
socket bound elsewhere, shutdown() removes only its own socket file."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from maildrop._listen import bind
from maildrop.lmtp import MaildirHandler, MaildirServer

from .lmtp_client import Client

MSG = b"From: s@example.org\nSubject: hi\n\nbody\n"

pytestmark = pytest.mark.asyncio


async def deliver(where: int | str) -> str:
    """Deliver one message to alice; return the reply."""
    c = await Client.connect(where)
    (reply,) = (await c.send("s@x", ["alice@x"], MSG)).data
    await c.quit()
    return reply


async def test_listen_socket_serves_a_handed_socket_and_leaves_its_file(tmp_path: Path) -> None:
    """A Unix socket bound by someone else is served; shutdown() leaves its file alone."""
    (tmp_path / "alice").mkdir()
    path = tmp_path / "lmtp.sock"
    (lsn,) = bind(f"unix:{path}")
    (tcp,) = bind("127.0.0.1:0")
    server = MaildirServer(MaildirHandler(tmp_path), hostname="mx.test")
    try:
        assert await server.listen_socket(lsn.sock) == [f"unix:{path}"]
        assert await server.listen_socket(tcp.sock) == [tcp.address]
        assert server.addresses == [f"unix:{path}", tcp.address]
        assert (await deliver(str(path))).startswith("250")
        assert (await deliver(int(tcp.address.rsplit(":", 1)[1]))).startswith("250")
    finally:
        await server.shutdown(1)
    assert path.exists(), "the server removed a socket file it did not create"
    lsn.close()
    tcp.close()
    assert not path.exists()
    assert len(os.listdir(tmp_path / "alice" / "new")) == 2


async def test_listen_refuses_a_live_socket_and_replaces_a_stale_one(tmp_path: Path) -> None:
    """listen('unix:PATH') refuses a live server's path and takes a dead server's."""
    (tmp_path / "alice").mkdir()
    path = tmp_path / "lmtp.sock"
    first = MaildirServer(MaildirHandler(tmp_path), hostname="mx.test")
    await first.listen(f"unix:{path}")
    second = MaildirServer(MaildirHandler(tmp_path), hostname="mx.test")
    try:
        with pytest.raises(OSError, match=rf"unix:{path}: another server is listening"):
            await second.listen(f"unix:{path}")
        assert (await deliver(str(path))).startswith("250")
    finally:
        await second.shutdown(0)
        await first.shutdown(0)
    assert not path.exists()
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()
    third = MaildirServer(MaildirHandler(tmp_path), hostname="mx.test")
    try:
        assert await third.listen(f"unix:{path}") == [f"unix:{path}"]
        assert (await deliver(str(path))).startswith("250")
    finally:
        await third.shutdown(0)
    assert not path.exists()


async def test_shutdown_leaves_a_successors_socket(tmp_path: Path) -> None:
    """If the socket file was replaced while serving, shutdown() does not remove the new one."""
    path = tmp_path / "lmtp.sock"
    server = MaildirServer(MaildirHandler(tmp_path), hostname="mx.test")
    await server.listen(f"unix:{path}")
    path.unlink()
    successor = socket.socket(socket.AF_UNIX)
    successor.bind(str(path))
    try:
        await server.shutdown(0)
        assert path.exists()
    finally:
        successor.close()
