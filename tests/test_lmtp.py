"""The LMTP/SMTP server and handler: per-recipient replies, durability, errors, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import smtplib
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from maildrop import DEFAULT_SYSCALLS, Maildir, Syscalls
from maildrop._lmtp_deliver import smtp_reply
from maildrop.lmtp import MaildirHandler, MaildirServer, mailbox_name, parse_hostport

from .conftest import HeldCall, listing
from .lmtp_client import Client, wire

pytestmark = pytest.mark.asyncio

MSG = b"From: s@example.org\nTo: alice@example.org\nSubject: hi\n\nbody line\n.leading dot\n"


def users(root: Path, *names: str) -> None:
    """Make an (empty) maildir directory per user under *root*."""
    for n in names:
        (root / n).mkdir(parents=True)


def messages(md: Path) -> list[bytes]:
    """Return the contents of every message in new/ (sorted)."""
    new = md / "new"
    return sorted((new / n).read_bytes() for n in os.listdir(new)) if new.is_dir() else []


@contextlib.asynccontextmanager
async def serving(handler: Any, *, lmtp: bool = True, **kw: Any) -> AsyncIterator[int]:
    """Serve *handler* with a MaildirServer on 127.0.0.1:0; yield the port."""
    server = MaildirServer(handler, lmtp=lmtp, hostname="mx.test", **kw)
    try:
        yield await listen_local(server)
    finally:
        await server.shutdown(1)


@contextlib.asynccontextmanager
async def aio_serving(handler: Any, *, lmtp: bool = True) -> AsyncIterator[int]:
    """Serve *handler* with aiosmtpd's own LMTP/SMTP class on 127.0.0.1:0; yield the port."""
    aio_lmtp = pytest.importorskip("aiosmtpd.lmtp", reason="aiosmtpd is not installed")
    aio_smtp = pytest.importorskip("aiosmtpd.smtp", reason="aiosmtpd is not installed")
    loop = asyncio.get_running_loop()
    cls = aio_lmtp.LMTP if lmtp else aio_smtp.SMTP
    srv = await loop.create_server(
        lambda: cls(handler, hostname="mx.test", loop=loop), "127.0.0.1", 0
    )
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


async def listen_local(server: MaildirServer) -> int:
    """Make *server* listen on a free port of 127.0.0.1 and return the port."""
    (address,) = await server.listen("127.0.0.1:0")
    return int(address.rsplit(":", 1)[1])


def failing(step_names: tuple[str, ...], err: int) -> Syscalls:
    """A syscall table whose named steps always fail with *err*."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(err, f"injected {errno.errorcode[err]}")

    return DEFAULT_SYSCALLS.replace(**dict.fromkeys(step_names, fail))


async def until(cond: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    """Wait (bounded) until *cond()* holds."""
    for _ in range(int(seconds / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# -- recipients ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "name"),
    [
        ("alice@example.org", "alice"),
        ("Alice@Example.org", "alice"),
        ("alice+lists@example.org", "alice"),
        ("postmaster", "postmaster"),
        ('"a@b"@example.org', '"a@b"'),
        ("+tag@example.org", "+tag"),
        ("../etc@example.org", None),
        ("a/b@example.org", None),
        (".hidden@example.org", None),
        ("a..b@example.org", None),
        ("a\0b@example.org", None),
        ("a\x7fb@example.org", None),
        ("@example.org", None),
        ("x" * 256 + "@example.org", None),
        ("ÉLODIE@example.org", "élodie"),
        ("e\u0301lodie@example.org", "élodie"),
        ("\u212aelvin@example.org", None),
        ("STRASSE@example.org", "strasse"),
        ("straße@example.org", None),
        ("\u017fam@example.org", None),
        ("ﬀ@example.org", None),
        ("ΣΊΣΥΦΟΣ@example.org", "σίσυφοσ"),
        ("a\u0085b@example.org", None),
    ],
)
async def test_mailbox_name_validates_the_local_part(address: str, name: str | None) -> None:
    """Local parts map to one safe directory name (NFC, casefolded, without the +extension);
    folding that turns a non-ASCII letter into ASCII is refused, never another mailbox."""
    assert mailbox_name(address) == name


async def test_mailbox_name_without_delimiter() -> None:
    """With no recipient delimiter the whole local part is the mailbox."""
    assert mailbox_name("a+b@x", recipient_delimiter=None) == "a+b"


async def test_three_recipients_one_invalid_get_their_own_replies(tmp_path: Path) -> None:
    """LMTP: 550 5.1.1 at RCPT for the unknown one, then one 250 per accepted recipient."""
    users(tmp_path, "alice", "bob")
    handler = MaildirHandler(tmp_path)
    async with serving(handler) as port:
        c = await Client.connect(port)
        t = await c.send(
            "s@example.org", ["alice@example.org", "nobody@example.org", "bob@x"], MSG
        )
        bad = await c.command("RCPT TO:<../alice@example.org>")
        await c.quit()
    assert t.mail.startswith("250")
    assert [r[:9] for r in t.rcpt] == ["250 2.1.5", "550 5.1.1", "250 2.1.5"]
    assert bad.startswith("503")  # no transaction any more: it ended with DATA
    assert len(t.data) == 2
    assert all(r.startswith("250 2.0.0 Delivered as ") for r in t.data)
    # Two maildirs share one file: no Delivered-To (it would show each the other).
    expected = b"Return-Path: <s@example.org>\n" + MSG
    assert messages(tmp_path / "alice") == [expected]
    assert messages(tmp_path / "bob") == [expected]
    (a,) = os.listdir(tmp_path / "alice" / "new")
    (b,) = os.listdir(tmp_path / "bob" / "new")
    assert (
        os.stat(tmp_path / "alice" / "new" / a).st_ino
        == os.stat(tmp_path / "bob" / "new" / b).st_ino
    )
    assert listing(tmp_path / "alice")["tmp"] == []


async def test_smtplib_lmtp_sees_refused_recipient(tmp_path: Path) -> None:
    """The stdlib LMTP client: the invalid recipient is reported refused, the rest delivered."""
    users(tmp_path, "alice", "bob")
    async with serving(MaildirHandler(tmp_path)) as port:

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.LMTP("127.0.0.1", port, local_hostname="client.test") as s:
                refused = s.sendmail("s@x", ["alice@x", "a/b@x", "bob@x"], MSG)
                # sendmail() reads the first recipient's reply after DATA; read bob's too.
                assert s.getreply()[0] == 250
                return refused

        refused = await asyncio.to_thread(send)
    assert list(refused) == ["a/b@x"]
    assert refused["a/b@x"][0] == 550
    assert refused["a/b@x"][1].startswith(b"5.1.1")
    assert len(messages(tmp_path / "alice")) == len(messages(tmp_path / "bob")) == 1


async def test_single_recipient_gets_return_path_and_delivered_to(tmp_path: Path) -> None:
    """One recipient: the file is the message, byte for byte, after the two added headers."""
    users(tmp_path, "alice")
    async with serving(MaildirHandler(tmp_path)) as port:
        c = await Client.connect(port)
        t = await c.send("s@example.org", ["Alice+news@example.org"], MSG)
        t2 = await c.send("", ["alice@example.org"], b"Subject: bounce\n\nx\n")
        await c.quit()
    assert t.data[0].startswith("250")
    assert t2.data[0].startswith("250")
    assert messages(tmp_path / "alice") == sorted(
        [
            b"Return-Path: <s@example.org>\nDelivered-To: Alice+news@example.org\n" + MSG,
            b"Return-Path: <>\nDelivered-To: alice@example.org\nSubject: bounce\n\nx\n",
        ]
    )


async def test_headers_off_and_crlf_kept_store_the_wire_bytes(tmp_path: Path) -> None:
    """Without added headers and CRLF conversion the file is exactly the DATA content."""
    users(tmp_path, "alice")
    handler = MaildirHandler(tmp_path, return_path=False, delivered_to=False, crlf_to_lf=False)
    async with serving(handler) as port:
        c = await Client.connect(port)
        await c.send("s@x", ["alice@x"], MSG)
        await c.quit()
    assert messages(tmp_path / "alice") == [
        wire(MSG)[: -len(b".\r\n")].replace(b"\r\n..", b"\r\n.")
    ]


async def test_separate_copies_carry_each_recipient(tmp_path: Path) -> None:
    """single_copy=False: each maildir gets its own file with its own Delivered-To."""
    users(tmp_path, "alice", "bob")
    async with serving(MaildirHandler(tmp_path, single_copy=False)) as port:
        c = await Client.connect(port)
        t = await c.send("s@x", ["alice@x", "bob@x"], MSG)
        await c.quit()
    assert len(t.data) == 2
    assert messages(tmp_path / "alice") == [b"Return-Path: <s@x>\nDelivered-To: alice@x\n" + MSG]
    assert messages(tmp_path / "bob") == [b"Return-Path: <s@x>\nDelivered-To: bob@x\n" + MSG]


async def test_duplicate_recipient_is_delivered_once_and_answered_twice(tmp_path: Path) -> None:
    """The same mailbox twice in one transaction: one file, a reply per RCPT."""
    users(tmp_path, "alice")
    async with serving(MaildirHandler(tmp_path)) as port:
        c = await Client.connect(port)
        t = await c.send("s@x", ["alice@x", "ALICE@x"], MSG)
        await c.quit()
    assert len(t.data) == 2
    assert t.data[0] == t.data[1]
    assert messages(tmp_path / "alice") == [b"Return-Path: <s@x>\nDelivered-To: alice@x\n" + MSG]


async def test_symlinked_mailbox_is_followed(tmp_path: Path) -> None:
    """An operator's symlink <root>/alice -> elsewhere is resolved once, at RCPT."""
    (tmp_path / "store" / "alice").mkdir(parents=True)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "alice").symlink_to(tmp_path / "store" / "alice")
    async with serving(MaildirHandler(tmp_path / "root")) as port:
        c = await Client.connect(port)
        t = await c.send("s@x", ["alice@x"], MSG)
        await c.quit()
    assert t.data[0].startswith("250")
    assert len(messages(tmp_path / "store" / "alice")) == 1


async def test_reply_waits_for_the_directory_fsync(tmp_path: Path) -> None:
    """The 250 is sent only after fsync(new/) returned: the delivery is durable first."""
    users(tmp_path, "alice")
    slow_fsync_dir = HeldCall(os.fsync)
    for sub in ("tmp", "new", "cur"):
        (tmp_path / "alice" / sub).mkdir()
    table = DEFAULT_SYSCALLS.replace(fsync_dir=slow_fsync_dir)
    async with serving(MaildirHandler(tmp_path, syscalls=table)) as port:
        c = await Client.connect(port)
        sending = asyncio.create_task(c.send("s@x", ["alice@x"], MSG))
        assert await asyncio.to_thread(slow_fsync_dir.entered.wait, 10)
        await asyncio.sleep(0.1)
        assert not sending.done()
        slow_fsync_dir.release.set()
        t = await sending
        await c.quit()
    assert t.data[0].startswith("250")


# -- errors -------------------------------------------------------------------------------


async def test_disk_full_is_452_and_leaves_nothing(tmp_path: Path) -> None:
    """Injected ENOSPC: 452 4.3.1 for every recipient; nothing in tmp/ or new/."""
    users(tmp_path, "alice", "bob")
    for n in ("alice", "bob"):
        for sub in ("tmp", "new", "cur"):
            (tmp_path / n / sub).mkdir()
    table = failing(("write", "writev", "fsync", "copy_file_range"), errno.ENOSPC)
    for single_copy in (True, False):
        handler = MaildirHandler(tmp_path, syscalls=table, single_copy=single_copy)
        async with serving(handler) as port:
            c = await Client.connect(port)
            t = await c.send("s@x", ["alice@x", "bob@x"], MSG)
            t1 = await c.send("s@x", ["alice@x"], MSG)
            await c.quit()
        assert [r[:9] for r in t.data + t1.data] == ["452 4.3.1"] * 3
    for n in ("alice", "bob"):
        assert listing(tmp_path / n) == {"tmp": [], "new": [], "cur": []}


async def test_disk_full_over_smtp_is_452_for_smtplib(tmp_path: Path) -> None:
    """SMTP: the stdlib client sees 452 (temporary) on a full disk, never 500."""
    users(tmp_path, "alice")
    handler = MaildirHandler(
        tmp_path, syscalls=failing(("write", "writev", "fsync"), errno.ENOSPC)
    )
    async with serving(handler, lmtp=False) as port:

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test") as s:
                s.sendmail("s@x", ["alice@x"], MSG)

        with pytest.raises(smtplib.SMTPDataError, match="Insufficient system storage") as info:
            await asyncio.to_thread(send)
    assert info.value.smtp_code == 452
    assert info.value.smtp_error.startswith(b"4.3.1")
    assert listing(tmp_path / "alice")["new"] == []


async def test_other_local_errors_are_451(tmp_path: Path) -> None:
    """An I/O error is 451 4.3.0, temporary."""
    users(tmp_path, "alice")
    async with serving(MaildirHandler(tmp_path, syscalls=failing(("fsync",), errno.EIO))) as port:
        c = await Client.connect(port)
        t = await c.send("s@x", ["alice@x"], MSG)
        await c.quit()
    assert t.data[0].startswith("451 4.3.0")


async def test_too_large_is_552_per_recipient(tmp_path: Path) -> None:
    """max_size: 552 5.3.4 for each recipient, nothing delivered."""
    users(tmp_path, "alice", "bob")
    async with serving(MaildirHandler(tmp_path, max_size=20)) as port:
        c = await Client.connect(port)
        t = await c.send("s@x", ["alice@x", "bob@x"], MSG)
        await c.quit()
    assert [r[:9] for r in t.data] == ["552 5.3.4", "552 5.3.4"]
    assert messages(tmp_path / "alice") == messages(tmp_path / "bob") == []


async def test_resolver_error_is_temporary_at_rcpt(tmp_path: Path) -> None:
    """An OSError while resolving a recipient refuses it with 451, not 550 or 500."""

    class Flaky(MaildirHandler):
        async def resolve(self, address: str) -> Maildir | None:
            raise OSError(errno.EIO, "directory service down")

    async with serving(Flaky(tmp_path)) as port:
        c = await Client.connect(port)
        t = await c.send("s@x", ["alice@x"], MSG)
        await c.quit()
    assert t.rcpt[0].startswith("451 4.3.0")


async def test_mailbox_removed_after_rcpt_is_recreated_or_refused(tmp_path: Path) -> None:
    """aiosmtpd: a recipient unknown at DATA (re-resolved) gets 550 5.1.1 in its own reply."""
    users(tmp_path, "alice", "bob")
    handler = MaildirHandler(tmp_path)
    async with aio_serving(handler) as port:
        c = await Client.connect(port)
        assert (await c.command("MAIL FROM:<s@x>")).startswith("250")
        assert (await c.command("RCPT TO:<alice@x>")).startswith("250")
        assert (await c.command("RCPT TO:<bob@x>")).startswith("250")
        # Forget what RCPT resolved, and remove bob: DATA resolves again and refuses him.
        handler._targets.clear()
        (tmp_path / "bob").rmdir()
        assert (await c.command("DATA")).startswith("354")
        c.writer.write(wire(MSG))
        replies = [await c.reply(), await c.reply()]
        await c.quit()
    assert replies[0].startswith("250")
    assert replies[1].startswith("550 5.1.1")


async def test_unexpected_error_is_temporary(tmp_path: Path) -> None:
    """A bug in the handler gives 451 4.3.0 for every recipient, never 500."""

    class Buggy(MaildirHandler):
        def transaction(self, *args: Any, **kw: Any) -> Any:
            raise RuntimeError("bug")

    users(tmp_path, "alice", "bob")
    async with serving(Buggy(tmp_path)) as port:
        c = await Client.connect(port)
        t = await c.send("s@x", ["alice@x", "bob@x"], MSG)
        await c.quit()
    async with aio_serving(Buggy(tmp_path)) as port:
        c = await Client.connect(port)
        t2 = await c.send("s@x", ["alice@x", "bob@x"], MSG)
        await c.quit()
    assert [r[:9] for r in t.data] == ["451 4.3.0", "451 4.3.0"]
    assert [r[:9] for r in t2.data] == ["451 4.3.0", "451 4.3.0"]
    assert (await MaildirHandler(tmp_path).handle_exception(ValueError("x"))).startswith("451")


async def test_smtp_single_reply_folds_partial_failures() -> None:
    """SMTP has one reply: all delivered is 250, else the (preferably temporary) failure."""
    ok = "250 2.0.0 Delivered as x"
    assert smtp_reply([ok]) == ok
    assert smtp_reply([ok, ok]) == "250 2.0.0 OK"
    assert smtp_reply([ok, "552 5.3.4 big", "452 4.3.1 full"]) == "452 4.3.1 full"
    assert smtp_reply([ok, "550 5.1.1 gone"]) == "550 5.1.1 gone"


async def test_smtp_with_several_recipients(tmp_path: Path) -> None:
    """aiosmtpd's SMTP class: several recipients, one 250 for the transaction."""
    users(tmp_path, "alice", "bob")
    async with serving(MaildirHandler(tmp_path), lmtp=False) as port:

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test") as s:
                return s.sendmail("s@x", ["alice@x", "bob@x"], MSG)

        assert await asyncio.to_thread(send) == {}
    assert len(messages(tmp_path / "alice")) == len(messages(tmp_path / "bob")) == 1


# -- disconnects --------------------------------------------------------------------------


async def test_disconnect_during_data_leaves_nothing(tmp_path: Path) -> None:
    """A client that hangs up in the middle of DATA leaves nothing in tmp/ or new/."""
    users(tmp_path, "alice")
    for sub in ("tmp", "new", "cur"):
        (tmp_path / "alice" / sub).mkdir()
    async with serving(MaildirHandler(tmp_path)) as port:
        c = await Client.connect(port)
        assert (await c.command("MAIL FROM:<s@x>")).startswith("250")
        assert (await c.command("RCPT TO:<alice@x>")).startswith("250")
        assert (await c.command("DATA")).startswith("354")
        c.writer.write(b"Subject: half\r\n\r\nsome of the bo")
        await c.writer.drain()
        await c.close()
        await asyncio.sleep(0.1)
    assert listing(tmp_path / "alice") == {"tmp": [], "new": [], "cur": []}


async def test_disconnect_while_delivering_leaves_nothing(tmp_path: Path) -> None:
    """Hanging up while the message is being fsynced cancels the delivery cleanly."""
    users(tmp_path, "alice")
    for sub in ("tmp", "new", "cur"):
        (tmp_path / "alice" / sub).mkdir()
    slow_fsync = HeldCall(os.fsync)
    handler = MaildirHandler(tmp_path, syscalls=DEFAULT_SYSCALLS.replace(fsync=slow_fsync))
    async with serving(handler) as port:
        c = await Client.connect(port)
        assert (await c.command("MAIL FROM:<s@x>")).startswith("250")
        assert (await c.command("RCPT TO:<alice@x>")).startswith("250")
        assert (await c.command("DATA")).startswith("354")
        c.writer.write(wire(MSG))
        await c.writer.drain()
        assert await asyncio.to_thread(slow_fsync.entered.wait, 10)
        await c.close()
        await asyncio.sleep(0.1)  # aiosmtpd sees the hang-up and cancels the handler
        slow_fsync.release.set()
        await until(lambda: handler.delivering == 0, "the delivery to be cancelled")
        await until(lambda: not os.listdir(tmp_path / "alice" / "tmp"), "tmp/ to be cleaned")
    assert listing(tmp_path / "alice") == {"tmp": [], "new": [], "cur": []}


# -- load ---------------------------------------------------------------------------------


async def test_200_messages_over_20_connections_land_exactly_once(tmp_path: Path) -> None:
    """20 concurrent LMTP connections x 10 messages: every message lands exactly once."""
    users(tmp_path, "alice", "bob")
    async with serving(MaildirHandler(tmp_path)) as port:

        async def conn(k: int) -> list[str]:
            c = await Client.connect(port)
            replies = []
            for i in range(10):
                n = k * 10 + i
                rcpts = ["alice@x"] if n % 2 else ["alice@x", "bob@x"]
                t = await c.send("s@x", rcpts, b"Subject: %d\n\nmessage %d\n" % (n, n))
                replies += t.data
            await c.quit()
            return replies

        results = await asyncio.gather(*(conn(k) for k in range(20)))
    assert all(r.startswith("250") for rs in results for r in rs)
    assert sum(len(rs) for rs in results) == 300
    got_alice = messages(tmp_path / "alice")
    got_bob = messages(tmp_path / "bob")
    assert len(got_alice) == 200
    assert len(got_bob) == 100
    numbers = sorted(int(m.rsplit(b"message ", 1)[1]) for m in got_alice)
    assert numbers == list(range(200))
    assert sorted(int(m.rsplit(b"message ", 1)[1]) for m in got_bob) == list(range(0, 200, 2))
    assert listing(tmp_path / "alice")["tmp"] == []


# -- MaildirServer ------------------------------------------------------------------------


async def test_too_large_message_is_552_per_recipient_and_session_goes_on(
    tmp_path: Path,
) -> None:
    """A message over max_size: 552 5.3.4 per recipient, nothing stored, next one works."""
    users(tmp_path, "alice", "bob")
    async with serving(MaildirHandler(tmp_path, max_size=80)) as port:
        c = await Client.connect(port)
        t = await c.send("s@x", ["alice@x", "bob@x"], MSG + b"x" * 100 + b"\n")
        t1 = await c.send("s@x", ["alice@x"], b"Subject: small\n\nok\n")
        await c.quit()
    assert [r[:9] for r in t.data] == ["552 5.3.4", "552 5.3.4"]
    assert t1.data[0].startswith("250")
    assert messages(tmp_path / "bob") == []
    assert listing(tmp_path / "bob")["tmp"] == []


async def test_server_unix_socket_and_smtp(tmp_path: Path) -> None:
    """MaildirServer speaks SMTP on a Unix socket and reports its addresses."""
    users(tmp_path, "alice")
    server = MaildirServer(MaildirHandler(tmp_path), lmtp=False)
    sock = str(tmp_path / "smtp.sock")
    assert await server.listen(f"unix:{sock}") == [f"unix:{sock}"]
    assert server.addresses == [f"unix:{sock}"]
    try:
        c = await Client.connect(sock, lmtp=False)
        t = await c.send("s@x", ["alice@x"], MSG)
        assert server.connections == 1
        await c.quit()
    finally:
        await server.shutdown(1)
    assert t.data[0].startswith("250")
    assert not os.path.exists(sock)
    with pytest.raises(ValueError, match="socket path"):
        await MaildirServer(None).listen("unix:")


async def test_server_ipv6(tmp_path: Path) -> None:
    """[::1]:0 binds on IPv6 loopback and is reported in bracket notation."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support in this Python")
    server = MaildirServer(MaildirHandler(tmp_path), hostname="mx.test")
    try:
        (address,) = await server.listen("[::1]:0")
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    await server.shutdown(0)
    assert address.startswith("[::1]:")


@pytest.mark.parametrize("bad", ["nohost", "host:", "host:port", ":24", "h:70000"])
async def test_parse_hostport_rejects_bad_addresses(bad: str) -> None:
    """Malformed addresses raise ValueError saying what a good one looks like."""
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_hostport(bad)


async def test_shutdown_finishes_deliveries_in_flight(tmp_path: Path) -> None:
    """shutdown(): stop listening, finish the running delivery (250), 421 to idle clients."""
    users(tmp_path, "alice")
    slow_fsync = HeldCall(os.fsync)
    handler = MaildirHandler(tmp_path, syscalls=DEFAULT_SYSCALLS.replace(fsync=slow_fsync))
    server = MaildirServer(handler, hostname="mx.test")
    port = await listen_local(server)
    busy = await Client.connect(port)
    idle = await Client.connect(port)
    late = await Client.connect(port)
    sending = asyncio.create_task(busy.send("s@x", ["alice@x"], MSG))
    assert await asyncio.to_thread(slow_fsync.entered.wait, 10)
    stopping = asyncio.create_task(server.shutdown(grace=5))
    await until(lambda: handler.closing, "shutdown to begin")
    # A new transaction during shutdown is refused with 421.
    assert (await late.command("MAIL FROM:<s@x>")).startswith("421 4.3.2")
    with pytest.raises(OSError, match="Connect call failed"):
        await asyncio.open_connection("127.0.0.1", port)
    assert not stopping.done()
    slow_fsync.release.set()
    t = await sending
    await asyncio.wait_for(stopping, 10)
    assert t.data[0].startswith("250")
    assert len(messages(tmp_path / "alice")) == 1
    assert (await idle.reply()).startswith("421 4.3.2")
    for c in (busy, idle, late):
        await c.close()
    assert server.connections == 0


async def test_shutdown_grace_expires_for_slow_senders(tmp_path: Path) -> None:
    """A client still sending its message when the grace period ends is disconnected."""
    users(tmp_path, "alice")
    server = MaildirServer(MaildirHandler(tmp_path), hostname="mx.test")
    c = await Client.connect(await listen_local(server))
    assert (await c.command("MAIL FROM:<s@x>")).startswith("250")
    assert (await c.command("RCPT TO:<alice@x>")).startswith("250")
    assert (await c.command("DATA")).startswith("354")
    c.writer.write(b"Subject: slow\r\n")
    await c.writer.drain()
    await until(lambda: any(p.in_data for p in server._conns), "DATA to start")
    await asyncio.wait_for(server.shutdown(grace=0.2), 5)
    assert await c.reader.read() == b""
    await c.close()
    assert messages(tmp_path / "alice") == []


async def test_shutdown_always_waits_for_running_deliveries(tmp_path: Path) -> None:
    """Even with no grace left, a delivery already running completes and is answered."""
    users(tmp_path, "alice")
    slow_fsync = HeldCall(os.fsync)
    handler = MaildirHandler(tmp_path, syscalls=DEFAULT_SYSCALLS.replace(fsync=slow_fsync))
    server = MaildirServer(handler, hostname="mx.test")
    c = await Client.connect(await listen_local(server))
    sending = asyncio.create_task(c.send("s@x", ["alice@x"], MSG))
    assert await asyncio.to_thread(slow_fsync.entered.wait, 10)
    stopping = asyncio.create_task(server.shutdown(grace=0))
    await asyncio.sleep(0.1)
    assert not stopping.done()
    assert handler.delivering == 1
    slow_fsync.release.set()
    await asyncio.wait_for(stopping, 10)
    assert (await sending).data[0].startswith("250")
    await c.close()
    assert len(messages(tmp_path / "alice")) == 1


async def test_every_recipient_gone_at_data(tmp_path: Path) -> None:
    """aiosmtpd: if no accepted recipient resolves any more at DATA, it gets 550 5.1.1."""
    users(tmp_path, "alice")
    handler = MaildirHandler(tmp_path)
    async with aio_serving(handler) as port:
        c = await Client.connect(port)
        assert (await c.command("MAIL FROM:<s@x>")).startswith("250")
        assert (await c.command("RCPT TO:<alice@x>")).startswith("250")
        handler._targets.clear()
        (tmp_path / "alice").rmdir()
        assert (await c.command("DATA")).startswith("354")
        c.writer.write(wire(MSG))
        reply = await c.reply()
        await c.quit()
    assert reply.startswith("550 5.1.1")


async def test_server_smtp_too_much_data_has_enhanced_code(tmp_path: Path) -> None:
    """SMTP: a message over max_size is answered once, 552 5.3.4."""
    users(tmp_path, "alice")
    async with serving(MaildirHandler(tmp_path, max_size=50), lmtp=False) as port:
        c = await Client.connect(port, lmtp=False)
        t = await c.send("s@x", ["alice@x"], MSG + b"x" * 100 + b"\n")
        await c.quit()
    assert t.data == ["552 5.3.4 Message too big for system"]


async def test_aiosmtpd_smtp_folds_replies_and_refuses_mail_when_closing(tmp_path: Path) -> None:
    """Under aiosmtpd's SMTP the handler answers once; closing refuses MAIL with 421."""
    users(tmp_path, "alice", "bob")
    handler = MaildirHandler(tmp_path)
    async with aio_serving(handler, lmtp=False) as port:
        c = await Client.connect(port, lmtp=False)
        t = await c.send("s@x", ["alice@x", "bob@x"], MSG)
        handler.closing = True
        refused = await c.command("MAIL FROM:<s@x>")
        await c.quit()
    assert t.data == ["250 2.0.0 OK"]
    assert refused.startswith("421 4.3.2")
    assert len(messages(tmp_path / "bob")) == 1


async def test_server_and_cli_do_not_import_aiosmtpd() -> None:
    """maildrop.lmtp and the server commands work without aiosmtpd."""
    code = (
        "import sys, maildrop.lmtp, maildrop._cli_serve, maildrop.cli; "
        "sys.exit('aiosmtpd' in sys.modules)"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
    assert await proc.wait() == 0
