"""maildrop's own LMTP/SMTP connection over real sockets: streaming, limits, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from maildrop._lmtp_deliver import Transaction
from maildrop._wire import MAX_LINE
from maildrop.lmtp import MaildirHandler, MaildirServer, RetryMemory

from .conftest import listing
from .lmtp_client import Client, wire
from .test_lmtp import messages, serving, until, users

pytestmark = pytest.mark.asyncio

MSG = b"Subject: hi\r\n\r\nbody\r\n"


async def raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect without saying anything; the greeting is read already."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    greeting = await asyncio.wait_for(reader.readline(), 10)
    assert greeting.startswith(b"220 ")
    return reader, writer


async def replies(reader: asyncio.StreamReader, n: int) -> list[str]:
    """Read *n* reply lines (single-line replies only)."""
    return [(await asyncio.wait_for(reader.readline(), 20)).decode().rstrip() for _ in range(n)]


def empty(md: Path) -> bool:
    """Whether the maildir holds nothing at all in tmp/ and new/."""
    got = listing(md)
    return not got.get("tmp") and not got.get("new")


async def test_greeting_and_hello_name_maildrop_and_the_exact_size(tmp_path: Path) -> None:
    """220 names the host and maildrop; LHLO advertises every extension and SIZE max_size."""
    async with serving(MaildirHandler(tmp_path, max_size=12345)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        greeting = await reader.readline()
        writer.write(b"LHLO c\r\n")
        lines = await replies(reader, 8)
        writer.close()
    assert greeting == b"220 mx.test maildrop LMTP ready\r\n"
    assert lines == [
        "250-mx.test", "250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-8BITMIME",
        "250-SMTPUTF8", "250-BINARYMIME", "250-CHUNKING", "250 SIZE 12345",
    ]  # fmt: skip


async def test_size_at_the_limit_passes_above_is_552(tmp_path: Path) -> None:
    """MAIL SIZE=max is accepted, SIZE=max+1 gets 552 5.3.4 with its enhanced code."""
    async with serving(MaildirHandler(tmp_path, max_size=1000)) as port:
        c = await Client.connect(port)
        assert await c.command("MAIL FROM:<s@x> SIZE=1000") == "250 2.1.0 OK"
        assert (await c.command("RSET")).startswith("250 2.0.0")
        assert (await c.command("MAIL FROM:<s@x> SIZE=1001")).startswith("552 5.3.4")
        await c.quit()


async def test_utf8_envelope_is_delivered_to_the_folded_mailbox(tmp_path: Path) -> None:
    """SMTPUTF8: ÉLODIE@ lands in élodie/; the Kelvin sign never reaches kelvin/."""
    users(tmp_path, "élodie", "kelvin")
    async with serving(MaildirHandler(tmp_path)) as port:
        c = await Client.connect(port)
        assert (await c.command("MAIL FROM:<jörg@exämple.org> SMTPUTF8")).startswith("250")
        assert (await c.command("RCPT TO:<ÉLODIE@x>")).startswith("250 2.1.5")
        assert (await c.command("RCPT TO:<\u212aelvin@x>")).startswith("550 5.1.1")
        assert (await c.command("DATA")).startswith("354")
        c.writer.write(wire(b"Subject: caf\xc3\xa9\n\nbody\n"))
        assert (await c.reply()).startswith("250 2.0.0")
        await c.quit()
    (got,) = messages(tmp_path / "élodie")
    assert got.startswith("Return-Path: <jörg@exämple.org>\nDelivered-To: ÉLODIE@x\n".encode())
    assert messages(tmp_path / "kelvin") == []


async def test_nul_and_controls_in_addresses_are_refused_at_once(tmp_path: Path) -> None:
    """NUL/CR in MAIL or RCPT is 501/553 5.1.3 then and there, not a 451 at DATA."""
    users(tmp_path, "alice")
    async with serving(MaildirHandler(tmp_path)) as port:
        reader, writer = await raw(port)
        writer.write(b"LHLO c\r\nMAIL FROM:<s\x00@x>\r\nMAIL FROM:<s@x>\r\n"
                     b"RCPT TO:<alice@x\x00y>\r\nRCPT TO:<alice\x7f@x>\r\nQUIT\r\n")  # fmt: skip
        got = (await asyncio.wait_for(reader.read(), 10)).decode().split("\r\n")
        writer.close()
    assert [r[:9] for r in got[8:13]] == ["501 5.1.3", "250 2.1.0", "553 5.1.3", "553 5.1.3",
                                          "221 2.0.0"]  # fmt: skip


LINES = [b"", b"1", b"x" * 998, b"y" * 999, b"z" * 1000, b"w" * MAX_LINE, b".", b"..",
         b".x", b"a\rb", b"a\nb", b"\r", b"\n.\n", b"end"]  # fmt: skip


@pytest.mark.parametrize("segment", [1, 7, 4096, 1 << 20])
async def test_lines_of_every_shape_arrive_byte_exact(tmp_path: Path, segment: int) -> None:
    """Empty, short, 1000-byte and 64 KiB lines, dots, bare CR/LF survive any TCP split."""
    users(tmp_path, "alice")
    message = b"".join(line + b"\r\n" for line in LINES)
    data = (b"\r\n" + message).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"
    handler = MaildirHandler(tmp_path, return_path=False, delivered_to=False, crlf_to_lf=False)
    async with serving(handler) as port:
        c = await Client.connect(port)
        c.writer.write(b"MAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\nDATA\r\n")
        assert [await c.reply() for _ in range(3)][2].startswith("354")
        for i in range(0, len(data), segment):
            c.writer.write(data[i : i + segment])
            await c.writer.drain()
        assert (await c.reply()).startswith("250 2.0.0")
        await c.quit()
    assert messages(tmp_path / "alice") == [message]


async def test_line_over_64k_is_a_temporary_error_per_recipient(tmp_path: Path) -> None:
    """A line over 64 KiB: 451 4.6.0 for each recipient at the end, nothing stored."""
    users(tmp_path, "alice", "bob")
    async with serving(MaildirHandler(tmp_path)) as port:
        c = await Client.connect(port)
        t = await c.send("s@x", ["alice@x", "bob@x"], b"a\r\n" + b"x" * (MAX_LINE + 1) + b"\r\n")
        t2 = await c.send("s@x", ["alice@x"], MSG)
        await c.quit()
    assert [r[:9] for r in t.data] == ["451 4.6.0", "451 4.6.0"]
    assert t2.data[0].startswith("250")
    assert len(messages(tmp_path / "alice")) == 1
    assert listing(tmp_path / "bob")["tmp"] == []


async def test_bdat_chunks_are_delivered(tmp_path: Path) -> None:
    """BDAT (CHUNKING, BINARYMIME): raw bytes, one 250 per chunk, per-recipient at LAST."""
    users(tmp_path, "alice", "bob")
    handler = MaildirHandler(tmp_path, return_path=False, crlf_to_lf=False)
    async with serving(handler) as port:
        reader, writer = await raw(port)
        writer.write(
            b"LHLO c\r\nMAIL FROM:<s@x> BODY=BINARYMIME\r\nRCPT TO:<alice@x>\r\n"
            b"RCPT TO:<bob@x>\r\nBDAT 5\r\n.\r\n\x00\xffBDAT 4 LAST\r\n\r\n.\r"
        )
        got = await replies(reader, 14)
        writer.close()
    assert [r[:3] for r in got[8:]] == ["250"] * 6
    assert messages(tmp_path / "alice") == messages(tmp_path / "bob") == [b".\r\n\x00\xff\r\n.\r"]


async def test_pipelined_transactions_in_one_segment(tmp_path: Path) -> None:
    """Three transactions and QUIT sent at once are answered in order."""
    users(tmp_path, "alice")
    async with serving(MaildirHandler(tmp_path)) as port:
        reader, writer = await raw(port)
        one = b"MAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\nRCPT TO:<no@x>\r\nDATA\r\nx\r\n.\r\n"
        writer.write(b"LHLO c\r\n" + one * 3 + b"QUIT\r\n")
        got = (await asyncio.wait_for(reader.read(), 10)).decode().split("\r\n")[8:-1]
        writer.close()
    assert [r[:3] for r in got] == ["250", "250", "550", "354", "250"] * 3 + ["221"]
    assert len(messages(tmp_path / "alice")) == 3


@pytest.mark.parametrize(
    "sent",
    [
        b"",
        b"LHLO c\r\n",
        b"LHLO c\r\nMAIL FROM:<s@x>\r\n",
        b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\n",
        b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\nDATA\r\n",
        b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\nDATA\r\nSubject: x\r\n\r\nbo",
        b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\nDATA\r\nx\r\n.",
        b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\nDATA\r\n" + b"x" * (3 << 20),
        b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\nBDAT 10\r\nabc",
        b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\nBDAT 3\r\nabcBDAT 9 LAST\r\nab",
    ],
)
async def test_disconnect_in_every_state_leaves_nothing(tmp_path: Path, sent: bytes) -> None:
    """A client that hangs up anywhere leaves nothing in tmp/ or new/, and no connection."""
    users(tmp_path, "alice")
    server = MaildirServer(MaildirHandler(tmp_path), hostname="mx.test")
    (address,) = await server.listen("127.0.0.1:0")
    try:
        _, writer = await raw(int(address.rsplit(":", 1)[1]))
        writer.write(sent)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
        await until(lambda: server.connections == 0, "the connection to end")
        await until(lambda: server.handler.delivering == 0, "no delivery")
    finally:
        await server.shutdown(1)
    assert empty(tmp_path / "alice")


async def test_command_timeout_closes_with_421(tmp_path: Path) -> None:
    """A client silent for longer than the timeout gets 421 4.4.2 and is disconnected."""
    async with serving(MaildirHandler(tmp_path), timeout=0.2) as port:
        reader, writer = await raw(port)
        writer.write(b"LHLO c\r\n")
        await replies(reader, 8)
        rest = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert rest.startswith(b"421 4.4.2 mx.test Timeout")


async def test_slow_live_data_is_not_cut_but_a_stalled_one_is(tmp_path: Path) -> None:
    """The data timeout counts from the last byte: a trickle lives, a stall is dropped."""
    users(tmp_path, "alice")
    async with serving(MaildirHandler(tmp_path), timeout=0.3, data_timeout=0.3) as port:
        c = await Client.connect(port)
        c.writer.write(b"MAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\nDATA\r\n")
        assert [await c.reply() for _ in range(3)][2].startswith("354")
        for _ in range(8):  # 0.8 s in all, well past both timeouts
            c.writer.write(b"line\r\n")
            await asyncio.sleep(0.1)
        c.writer.write(b".\r\n")
        assert (await c.reply()).startswith("250 2.0.0")
        c.writer.write(b"MAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\nDATA\r\nstall")
        assert [await c.reply() for _ in range(3)][2].startswith("354")
        assert (await c.reply()).startswith("421 4.4.2")
        await c.close()
    assert len(messages(tmp_path / "alice")) == 1
    assert listing(tmp_path / "alice")["tmp"] == []


async def test_max_connections_refuses_with_421_then_serves_again(tmp_path: Path) -> None:
    """Beyond max_connections a client gets 421 4.3.2; once a slot frees, it is served."""
    async with serving(MaildirHandler(tmp_path), max_connections=2) as port:
        first = await raw(port)
        second = await raw(port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (
            await asyncio.wait_for(reader.read(), 5)
            == b"421 4.3.2 Too many connections, try again later\r\n"
        )
        writer.close()
        first[1].close()
        await asyncio.sleep(0.1)
        third = await raw(port)
        for _, w in (second, third):
            w.close()


async def test_max_recipients_gets_452(tmp_path: Path) -> None:
    """RCPT beyond max_recipients is 452 4.5.3 and the message goes to the others."""
    users(tmp_path, "a", "b", "c")
    async with serving(MaildirHandler(tmp_path), max_recipients=2) as port:
        c = await Client.connect(port)
        t = await c.send("s@x", ["a@x", "b@x", "c@x"], MSG)
        await c.quit()
    assert [r[:9] for r in t.rcpt] == ["250 2.1.5", "250 2.1.5", "452 4.5.3"]
    assert messages(tmp_path / "c") == []


async def test_smtp_retry_after_partial_failure_reaches_only_the_failed(tmp_path: Path) -> None:
    """SMTP: alice got it, bob failed (452, over quota); the retry delivers to bob only."""
    users(tmp_path, "alice", "bob")
    # Room for nothing more, but not over yet: RCPT passes, the end of data fails (452).
    (tmp_path / "bob" / "maildirsize").write_bytes(b"1000S\n1000 0\n")
    async with serving(MaildirHandler(tmp_path), lmtp=False, retry=RetryMemory()) as port:
        c = await Client.connect(port, lmtp=False)
        first = await c.send("s@x", ["alice@x", "bob@x"], MSG)
        (tmp_path / "bob" / "maildirsize").unlink()
        retry = await c.send("s@x", ["alice@x", "bob@x"], MSG)
        again = await c.send("s@x", ["alice@x", "bob@x"], MSG)
        await c.quit()
    assert first.data[0].startswith("452 4.2.2")
    assert retry.data == ["250 2.0.0 OK"]
    assert again.data == ["250 2.0.0 OK"]
    assert len(messages(tmp_path / "alice")) == 2  # the first and the new message
    assert len(messages(tmp_path / "bob")) == 2
    assert listing(tmp_path / "alice")["tmp"] == []


async def test_client_not_reading_replies_pauses_the_server(tmp_path: Path) -> None:
    """A client that pipelines NOOPs and never reads does not grow the server's memory."""
    async with serving(MaildirHandler(tmp_path)) as port:
        reader, writer = await raw(port)
        writer.write(b"LHLO c\r\n" + b"RSET\r\n" * 99 + b"NOOP " + b"x" * 4000 + b"\r\n")
        await writer.drain()
        got = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert got.endswith(b"421 4.7.0 Too many commands without mail\r\n")


async def test_shutdown_refuses_new_mail_with_421(tmp_path: Path) -> None:
    """While shutting down, MAIL gets 421 4.3.2."""
    handler = MaildirHandler(tmp_path)
    handler.closing = True
    async with serving(handler) as port:
        c = await Client.connect(port)
        assert (await c.command("MAIL FROM:<s@x>")).startswith("421 4.3.2")
        await c.close()


async def test_large_message_to_several_recipients_streams_once(tmp_path: Path) -> None:
    """A 5 MiB message for two maildirs streams through deliver_many, byte-exact."""
    users(tmp_path, "alice", "bob")
    body = b"".join(b"line %07d\r\n" % i for i in range(400_000))
    handler = MaildirHandler(tmp_path, return_path=False, crlf_to_lf=False)
    async with serving(handler) as port:
        c = await Client.connect(port)
        t = await c.send("s@x", ["alice@x", "bob@x"], body)
        await c.quit()
    assert [r[:3] for r in t.data] == ["250", "250"]
    assert messages(tmp_path / "alice") == messages(tmp_path / "bob") == [body]


async def test_replies_wait_while_the_client_does_not_read(tmp_path: Path) -> None:
    """While the transport's write buffer is full, commands are not processed."""
    server = MaildirServer(MaildirHandler(tmp_path), hostname="mx.test")
    (address,) = await server.listen("127.0.0.1:0")
    try:
        reader, writer = await raw(int(address.rsplit(":", 1)[1]))
        (conn,) = server._conns
        conn.pause_writing()
        writer.write(b"NOOP\r\n")
        with pytest.raises(TimeoutError, match=r"^$"):
            await asyncio.wait_for(reader.readline(), 0.2)
        conn.resume_writing()
        assert await replies(reader, 1) == ["250 2.0.0 OK"]
        conn.pause_writing()
        writer.close()
        await until(lambda: server.connections == 0, "the connection to end")
    finally:
        await server.shutdown(1)


@pytest.mark.parametrize("where", ["rcpt_reply_now", "rcpt_reply"])
async def test_a_bug_in_the_conversation_hangs_up_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """An unexpected exception ends the connection (logged), never a wrong reply."""

    class Buggy(MaildirHandler):
        def rcpt_reply_now(self, address: str) -> Any:
            if where == "rcpt_reply_now":
                raise RuntimeError("bug")
            return None

        async def rcpt_reply(self, address: str) -> Any:
            raise RuntimeError("bug")

    async with serving(Buggy(tmp_path)) as port:
        reader, writer = await raw(port)
        writer.write(b"LHLO c\r\n")
        await replies(reader, 8)
        await asyncio.sleep(0.05)  # the connection's task waits for the client again
        writer.write(b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\n")
        got = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert got == b"250 2.1.0 OK\r\n"
    assert "connection failed: RuntimeError('bug')" in caplog.text


async def test_failing_commit_is_451_for_each_recipient(tmp_path: Path) -> None:
    """An unexpected error while finishing the delivery is 451 4.3.0 per recipient."""

    class Broken(Transaction):
        async def finish(self, skip: frozenset[str] = frozenset()) -> Any:
            raise RuntimeError("bug")

    class Handler(MaildirHandler):
        def transaction(self, sender: Any, rcpts: Any, targets: Any, **kw: Any) -> Any:
            return Broken(rcpts, targets, return_path=None, delivered_to=False,
                          crlf_to_lf=False, separate=True)  # fmt: skip

    users(tmp_path, "alice", "bob")
    async with serving(Handler(tmp_path)) as port:
        c = await Client.connect(port)
        t = await c.send("s@x", ["alice@x", "bob@x"], MSG)
        await c.quit()
    assert [r[:9] for r in t.data] == ["451 4.3.0", "451 4.3.0"]


async def test_stale_unix_socket_is_replaced_and_bind_errors_raise(tmp_path: Path) -> None:
    """A socket file left by a dead server is replaced; an unbindable path raises."""
    path = tmp_path / "lmtp.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    server = MaildirServer(MaildirHandler(tmp_path), hostname="mx.test")
    try:
        assert await server.listen(f"unix:{path}") == [f"unix:{path}"]
        with pytest.raises(
            FileNotFoundError, match=r"no/such/dir does not exist \(create it first"
        ):
            await server.listen(f"unix:{tmp_path}/no/such/dir/sock")
    finally:
        await server.shutdown(0)
    assert not path.exists()


@pytest.mark.parametrize("command", [b"RSET", b"LHLO again"])
async def test_reset_after_a_bdat_chunk_drops_the_message(tmp_path: Path, command: bytes) -> None:
    """RSET (or a new LHLO) after a non-last BDAT chunk removes what was received."""
    users(tmp_path, "alice")
    chunk = b"x" * (3 << 20)  # past the session's batch: a file exists in tmp/
    async with serving(MaildirHandler(tmp_path)) as port:
        reader, writer = await raw(port)
        writer.write(b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\n")
        writer.write(b"BDAT %d\r\n%s" % (len(chunk), chunk))
        got = await replies(reader, 11)
        assert os.listdir(tmp_path / "alice" / "tmp")
        writer.write(command + b"\r\n")
        assert (await replies(reader, 1))[0].startswith("250")
        await until(lambda: not os.listdir(tmp_path / "alice" / "tmp"), "tmp/ to be empty")
        writer.close()
    assert got[10] == f"250 2.0.0 {len(chunk)} octets received"
    assert empty(tmp_path / "alice")


async def test_without_retry_memory_an_smtp_retry_reaches_everyone(tmp_path: Path) -> None:
    """SMTP without a RetryMemory (the library's default): the retry goes to all."""
    users(tmp_path, "alice", "bob")
    # Room for nothing more, but not over yet: RCPT passes, the end of data fails (452).
    (tmp_path / "bob" / "maildirsize").write_bytes(b"1000S\n1000 0\n")
    async with serving(MaildirHandler(tmp_path), lmtp=False) as port:
        c = await Client.connect(port, lmtp=False)
        first = await c.send("s@x", ["alice@x", "bob@x"], MSG)
        (tmp_path / "bob" / "maildirsize").unlink()
        retry = await c.send("s@x", ["alice@x", "bob@x"], MSG)
        await c.quit()
    assert first.data[0].startswith("452 4.2.2")
    assert retry.data == ["250 2.0.0 OK"]
    assert len(messages(tmp_path / "alice")) == 2


@contextlib.asynccontextmanager
async def greeted(
    tmp_path: Path,
) -> AsyncIterator[tuple[MaildirServer, asyncio.StreamReader, asyncio.StreamWriter]]:
    """Serve *tmp_path*; yield the server and a raw client that said LHLO."""
    server = MaildirServer(MaildirHandler(tmp_path), hostname="mx.test")
    (address,) = await server.listen("127.0.0.1:0")
    try:
        reader, writer = await raw(int(address.rsplit(":", 1)[1]))
        writer.write(b"LHLO c\r\n")
        await replies(reader, 8)
        yield server, reader, writer
        writer.close()
    finally:
        await server.shutdown(1)


async def test_pipelined_commands_are_answered_in_one_write(tmp_path: Path) -> None:
    """MAIL, two RCPTs and DATA in one packet get their four replies in one transport write."""
    users(tmp_path, "alice", "bob")
    async with greeted(tmp_path) as (server, reader, writer):
        (conn,) = server._conns
        assert conn.transport is not None
        writes: list[bytes] = []
        real = conn.transport.write

        def record(data: bytes) -> None:
            writes.append(bytes(data))
            real(data)

        conn.transport.write = record  # type: ignore[method-assign]
        writer.write(b"MAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\nRCPT TO:<bob@x>\r\nDATA\r\n")
        got = await replies(reader, 4)
        assert [r[:3] for r in got] == ["250", "250", "250", "354"]
        assert len(writes) == 1
        writer.write(b"x\r\n.\r\nQUIT\r\n")
        assert [r[:3] for r in await replies(reader, 3)] == ["250", "250", "221"]
    assert len(messages(tmp_path / "alice")) == len(messages(tmp_path / "bob")) == 1


async def test_a_burst_of_pipelined_commands_keeps_the_connection_reading(tmp_path: Path) -> None:
    """Over 128 KiB of commands in one read (reading pauses) are answered; reading goes on."""
    async with greeted(tmp_path) as (server, reader, writer):
        await asyncio.sleep(0.05)  # the connection's task waits for the client again
        (conn,) = server._conns
        conn.data_received((b"NOOP " + b"x" * 3000 + b"\r\n") * 60)
        assert conn.transport is not None
        assert conn.transport.is_reading()
        assert await replies(reader, 60) == ["250 2.0.0 OK"] * 60
        writer.write(b"MAIL FROM:<s@x>\r\n")
        assert await replies(reader, 1) == ["250 2.1.0 OK"]


async def test_data_alone_leaves_the_task_asleep_and_a_pipelined_body_wakes_it(
    tmp_path: Path,
) -> None:
    """DATA with nothing after it is answered without waking the connection's task; a body
    that came in the same read as DATA is delivered."""
    users(tmp_path, "alice")
    async with greeted(tmp_path) as (server, reader, writer):
        await asyncio.sleep(0.05)  # the connection's task waits for the client again
        (conn,) = server._conns
        waiting = conn._wakeup
        conn.data_received(b"MAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\nDATA\r\n")
        assert [r[:3] for r in await replies(reader, 3)] == ["250", "250", "354"]
        assert waiting is not None
        assert not waiting.done()
        assert conn._wakeup is waiting
        writer.write(b"x\r\n.\r\nMAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\nDATA\r\ny\r\n.\r\n")
        got = await replies(reader, 5)
        assert [r[:3] for r in got] == ["250", "250", "250", "354", "250"]
    assert len(messages(tmp_path / "alice")) == 2


# -- regressions --------------------------------------------------------------------------


async def test_bdat_after_a_refused_long_line_is_delivered_not_skipped(tmp_path: Path) -> None:
    """A DATA refused for a long line does not make the next BDAT message read as delivered
    already (it was answered 250 and never written)."""
    users(tmp_path, "alice")
    async with greeted(tmp_path) as (_, reader, writer):
        writer.write(b"MAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\nDATA\r\n")
        assert [r[:3] for r in await replies(reader, 3)] == ["250", "250", "354"]
        writer.write(b"Subject: long\r\n\r\n" + b"x" * (MAX_LINE + 10) + b"\r\n.\r\n")
        assert (await replies(reader, 1))[0].startswith("451 4.6.0")
        body = b"Subject: second\r\n\r\nhello\r\n"
        writer.write(b"MAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\n")
        writer.write(b"BDAT %d LAST\r\n" % len(body) + body)
        got = await replies(reader, 3)
    assert got[2].startswith("250 2.0.0 Delivered as ")
    (message,) = messages(tmp_path / "alice")
    assert message.endswith(b"Subject: second\n\nhello\n")
    assert listing(tmp_path / "alice")["tmp"] == []


@pytest.mark.parametrize("before", [b"", b"MAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\n"])
async def test_a_refused_bdat_chunk_is_dropped_never_run_as_commands(
    tmp_path: Path, before: bytes
) -> None:
    """A BDAT refused for want of MAIL (here after a chunk over the size limit reset the
    transaction) still consumes its chunk: commands inside it are never run (RFC 3030)."""
    users(tmp_path, "alice", "bob")
    server = MaildirServer(MaildirHandler(tmp_path, max_size=100), hostname="mx.test")
    (address,) = await server.listen("127.0.0.1:0")
    try:
        reader, writer = await raw(int(address.rsplit(":", 1)[1]))
        writer.write(b"LHLO c\r\n")
        await replies(reader, 8)
        forged = b"MAIL FROM:<evil@x>\r\nRCPT TO:<bob@x>\r\nDATA\r\nSubject: forged\r\n\r\n.\r\n"
        first = b"BDAT 200\r\n" + b"x" * 200 if before else b""
        writer.write(before + first + b"BDAT %d LAST\r\n" % len(forged) + forged + b"QUIT\r\n")
        got = await replies(reader, 5 if before else 2)
        writer.close()
    finally:
        await server.shutdown(1)
    assert got[-2] == "503 5.5.1 Need MAIL before BDAT"
    assert got[-1].startswith("221 ")
    assert messages(tmp_path / "bob") == []
    assert empty(tmp_path / "alice")
