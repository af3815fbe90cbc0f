"""The recipients-to-maildirs handler as the server uses it: lookup, quota, refusals."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from maildrop import DEFAULT_SYSCALLS, Maildir, Quota, _lmtp_handler
from maildrop._lmtp_handler import _quota_refusal
from maildrop.lmtp import MaildirHandler

from .conftest import listing
from .lmtp_client import Client
from .test_lmtp import messages, serving, users
from .test_lmtp_protocol import MSG, empty

pytestmark = pytest.mark.asyncio


def quota(md: Path, text: str) -> None:
    """Give the maildir *md* a maildirsize with *text*."""
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True, exist_ok=True)
    (md / "maildirsize").write_text(text)


@pytest.mark.parametrize(("permanent", "code"), [(False, "452 4.2.2"), (True, "552 5.2.2")])
async def test_full_mailbox_is_refused_at_rcpt(tmp_path: Path, permanent: bool, code: str) -> None:
    """A maildirsize already at its limit refuses the recipient at RCPT."""
    users(tmp_path, "alice", "bob")
    quota(tmp_path / "alice", "1000S,2C\n500 2\n")
    handler = MaildirHandler(tmp_path, quota=Quota(permanent=permanent))
    async with serving(handler) as port:
        c = await Client.connect(port)
        t = await c.send("s@x", ["alice@x", "bob@x"], MSG)
        await c.quit()
    assert t.rcpt[0].startswith(code)
    assert t.data[0].startswith("250")
    assert empty(tmp_path / "alice")


async def test_quota_is_checked_at_end_of_data_and_maildirsize_updated(tmp_path: Path) -> None:
    """Room at RCPT but not for the message: 452 4.2.2 at the end; a fit updates the file."""
    users(tmp_path, "alice")
    quota(tmp_path / "alice", "100S,5C\n0 0\n")
    async with serving(MaildirHandler(tmp_path)) as port:
        c = await Client.connect(port)
        big = await c.send("s@x", ["alice@x"], b"x" * 200 + b"\r\n")
        small = await c.send("s@x", ["alice@x"], b"hi\r\n")
        await c.quit()
    assert big.data[0].startswith("452 4.2.2")
    assert small.data[0].startswith("250")
    (got,) = messages(tmp_path / "alice")
    lines = (tmp_path / "alice" / "maildirsize").read_text().splitlines()
    assert lines[0] == "100S,5C"
    assert sum(int(line.split()[0]) for line in lines[1:]) == len(got)
    assert listing(tmp_path / "alice")["tmp"] == []


async def test_no_quota_ignores_maildirsize(tmp_path: Path) -> None:
    """quota=None delivers into a mailbox whose maildirsize says it is full."""
    users(tmp_path, "alice")
    quota(tmp_path / "alice", "10S\n500 2\n")
    async with serving(MaildirHandler(tmp_path, quota=None)) as port:
        c = await Client.connect(port)
        t = await c.send("s@x", ["alice@x"], MSG)
        await c.quit()
    assert t.rcpt[0].startswith("250")
    assert t.data[0].startswith("250")
    assert (tmp_path / "alice" / "maildirsize").read_text() == "10S\n500 2\n"


async def test_custom_resolve_error_is_451_at_rcpt(tmp_path: Path) -> None:
    """An OSError from an overridden resolve() refuses the recipient temporarily."""

    class Broken(MaildirHandler):
        async def resolve(self, address: str) -> Any:
            raise OSError(5, "injected EIO")

    async with serving(Broken(tmp_path)) as port:
        c = await Client.connect(port)
        await c.command("MAIL FROM:<s@x>")
        assert (await c.command("RCPT TO:<a@x>")).startswith("451 4.3.0")
        await c.quit()


async def test_lookup_refuses_files_and_dangling_links(tmp_path: Path) -> None:
    """A file or a dangling symlink where a mailbox should be is not a mailbox."""
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    handler = MaildirHandler(tmp_path)
    assert handler.lookup("file@x") is None
    assert handler.lookup("dangling@x") is None
    assert handler.lookup("a/b@x") is None


async def test_unreadable_mailbox_is_451_at_rcpt(tmp_path: Path) -> None:
    """An I/O error looking the mailbox up (through the syscall table) refuses the
    recipient temporarily."""

    def eio(path: Any, **kw: Any) -> Any:
        raise OSError(5, "injected EIO")

    handler = MaildirHandler(tmp_path, syscalls=DEFAULT_SYSCALLS.replace(stat=eio))
    async with serving(handler) as port:
        c = await Client.connect(port)
        await c.command("MAIL FROM:<s@x>")
        reply = await c.command("RCPT TO:<a@x>")
        await c.quit()
    assert reply.startswith("451 4.3.0")


async def test_lookup_stats_through_the_syscall_table(tmp_path: Path) -> None:
    """lookup() and the quota-file check make their stat calls through the table; a
    symlinked mailbox is resolved to where it leads."""
    users(tmp_path, "alice")
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "linked")
    seen: list[tuple[str, bool]] = []

    def stat(path: Any, **kw: Any) -> os.stat_result:
        seen.append((os.path.basename(path), kw.get("follow_symlinks", True)))
        return os.stat(path, **kw)

    handler = MaildirHandler(tmp_path, syscalls=DEFAULT_SYSCALLS.replace(stat=stat))
    md = handler.lookup("linked@x")
    assert md is not None
    assert md.path == tmp_path / "real"
    assert seen == [("linked", False), ("linked", True)]
    seen.clear()
    now = handler.rcpt_reply_now("alice@x")
    assert now is not None
    assert now[0] == "250 2.1.5 OK"
    assert seen == [("alice", False), ("maildirsize", True)]


async def test_quota_refusal_leaves_other_problems_to_the_delivery(tmp_path: Path) -> None:
    """The RCPT quota check says nothing about a missing maildir or a missing tmp/."""
    assert _quota_refusal(Maildir(tmp_path / "missing"), Quota(100)) is None
    (tmp_path / "bare").mkdir()
    assert _quota_refusal(Maildir(tmp_path / "bare"), Quota(100)) is None
    assert not (tmp_path / "bare" / "maildirsize").exists()


def counting_lookups(handler: MaildirHandler) -> list[str]:
    """Record every address the handler really looks up."""
    seen: list[str] = []
    real = handler.lookup

    def lookup(address: str) -> Maildir | None:
        seen.append(address)
        return real(address)

    handler.lookup = lookup  # type: ignore[method-assign]
    return seen


async def test_a_recipient_found_is_reused_for_a_moment(tmp_path: Path) -> None:
    """The same recipient again within FOUND_FOR seconds costs no lookup (no stat)."""
    users(tmp_path, "alice")
    handler = MaildirHandler(tmp_path)
    seen = counting_lookups(handler)
    first = handler.rcpt_reply_now("alice@x")
    second = handler.rcpt_reply_now("alice@x")
    assert first is not None
    assert second is not None
    assert first[1] is second[1]
    assert seen == ["alice@x"]


async def test_a_removed_mailbox_is_refused_once_the_moment_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After FOUND_FOR the mailbox is looked up again: one removed meanwhile gets 550."""
    monkeypatch.setattr(_lmtp_handler, "FOUND_FOR", 0.0)
    users(tmp_path, "alice")
    handler = MaildirHandler(tmp_path)
    assert handler.rcpt_reply_now("alice@x") == ("250 2.1.5 OK", handler._found["alice@x"][1])
    (tmp_path / "alice").rmdir()
    now = handler.rcpt_reply_now("alice@x")
    assert now is not None
    assert now[0].startswith("550 5.1.1")


async def test_an_unknown_recipient_is_looked_up_every_time(tmp_path: Path) -> None:
    """A refusal is never remembered: a mailbox made right after is accepted."""
    handler = MaildirHandler(tmp_path)
    seen = counting_lookups(handler)
    refused = handler.rcpt_reply_now("carol@x")
    assert refused is not None
    assert refused[0].startswith("550 5.1.1")
    users(tmp_path, "carol")
    accepted = handler.rcpt_reply_now("carol@x")
    assert accepted is not None
    assert accepted[0] == "250 2.1.5 OK"
    assert seen == ["carol@x", "carol@x"]


async def test_a_custom_syscall_table_sees_every_lookup(tmp_path: Path) -> None:
    """With a test's or a hook's syscall table nothing is reused."""
    users(tmp_path, "alice")
    handler = MaildirHandler(tmp_path, syscalls=DEFAULT_SYSCALLS.replace(open=os.open))
    seen = counting_lookups(handler)
    handler.rcpt_reply_now("alice@x")
    handler.rcpt_reply_now("alice@x")
    assert seen == ["alice@x", "alice@x"]
    assert handler._found == {}
    assert handler._quota_files == {}


async def test_the_memory_of_recipients_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past _FOUND_MAX mailboxes the memory starts again."""
    monkeypatch.setattr(_lmtp_handler, "_FOUND_MAX", 2)
    users(tmp_path, "a", "b", "c")
    handler = MaildirHandler(tmp_path)
    for name in ("a", "b", "c"):
        handler.rcpt_reply_now(f"{name}@x")
    assert list(handler._found) == ["c@x"]
    assert list(handler._quota_files) == [str(tmp_path / "c")]


async def test_a_quota_set_just_after_rcpt_is_still_enforced(tmp_path: Path) -> None:
    """A maildirsize made while RCPT remembers "none" is still enforced by the delivery."""
    users(tmp_path, "alice")
    handler = MaildirHandler(tmp_path, quota=Quota())
    assert handler.rcpt_reply_now("alice@x") is not None  # no maildirsize: answered now
    quota(tmp_path / "alice", "10S,10C\n0 0\n")
    async with serving(handler) as port:
        c = await Client.connect(port)
        t = await c.send("s@x", ["alice@x"], MSG)
        await c.quit()
    assert t.rcpt[0].startswith("250")
    assert t.data[0].startswith("452 4.2.2")
    assert listing(tmp_path / "alice")["new"] == []


async def test_the_handler_s_maildirs_run_in_threads_unless_the_operator_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default a server's maildirs take threads; MAILDROP_BACKEND or *backend* rule."""
    monkeypatch.delenv("MAILDROP_BACKEND", raising=False)
    assert MaildirHandler(tmp_path).maildir(str(tmp_path))._settings.backend == "threads"
    picked = MaildirHandler(tmp_path, backend="auto").maildir(str(tmp_path))
    assert picked._settings.backend == "auto"
    monkeypatch.setenv("MAILDROP_BACKEND", "uring")
    assert MaildirHandler(tmp_path).maildir(str(tmp_path))._settings.backend == "uring"
    forced = MaildirHandler(tmp_path, backend="threads").maildir(str(tmp_path))
    assert forced._settings.backend == "threads"


async def test_the_handler_refuses_an_unknown_backend(tmp_path: Path) -> None:
    """A backend that is not auto, uring or threads is a clear error."""
    with pytest.raises(ValueError, match="backend must be one of auto, uring, threads"):
        MaildirHandler(tmp_path, backend="fast")


async def test_the_handler_refuses_the_ring_with_a_custom_table(tmp_path: Path) -> None:
    """backend="uring" with a fault table fails when the handler is made, not per recipient."""
    table = DEFAULT_SYSCALLS.replace(fsync=DEFAULT_SYSCALLS.fsync)
    with pytest.raises(OSError, match="cannot run a custom Syscalls table"):
        MaildirHandler(tmp_path, backend="uring", syscalls=table)
