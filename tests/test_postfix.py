"""Postfix as a real client of ``maildrop lmtp``: its LMTP client delivers what it queued.

A private Postfix (its own ``config_directory`` and queue in a scratch directory, listening on
127.0.0.1 only, no chroot, logging to its own ``maillog_file``) routes a virtual domain to
``maildrop lmtp`` over ``lmtp:inet``. Mail goes in through Postfix's smtpd on loopback; the
per-recipient outcome is read from the maillog (``status=sent|deferred|bounced``) and the
maildirs are compared with what was sent. Needs root (Postfix's master) and Postfix; skips
with the reason otherwise (``.ci/run`` installs it).
"""

from __future__ import annotations

import collections
import os
import random
import re
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .peers import Postfix, maildrop_lmtp, missing, postfix, wait_for_greeting

DOMAIN = "example.test"
#: Mailboxes under the server's root; "full" has a Maildir++ quota it is already over.
USERS = ("alice", "bob", "carol", "jösé", "full")
#: Accepted by Postfix's virtual map but with no maildir: maildrop refuses it (550 5.1.1).
GHOST = "ghost"
#: A full quota: 1000 bytes and 5 messages allowed, 4500 bytes in 9 messages used, and
#: those 9 messages really in cur/, so that a recalculation finds the mailbox as full.
FULL_MAILDIRSIZE = b"1000S,5C\n4500 9\n"
FULL_MESSAGES = 9
#: How long Postfix may take to reach a final status for every recipient of every message.
DELIVERY_TIMEOUT = 300.0


def skip_reason() -> str | None:
    """Return why Postfix cannot run here, or None."""
    if os.geteuid() != 0:
        return "Postfix's master must start as root"
    if missing(["postfix"]):
        return "Postfix is not installed (.ci/run installs it: apt-get install postfix)"
    version = subprocess.run(["postconf", "-h", "mail_version"], capture_output=True, check=False)
    if int(version.stdout.split(b".")[0] or 0) < 3:
        return f"Postfix {version.stdout.decode().strip()} has no SMTPUTF8 (3.0 or later needed)"
    return None


_SKIP = skip_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))]


@dataclass(frozen=True)
class Mail:
    """One message as injected: envelope, a body, and the Message-ID that tracks it."""

    seq: int
    sender: str
    rcpts: tuple[str, ...]
    body: bytes

    @property
    def message_id(self) -> str:
        """The Message-ID the maillog names it by."""
        return f"seq{self.seq}@maildrop.test"

    def wire(self) -> bytes:
        """Return the message with CRLF line ends, as smtplib's DATA wants it."""
        head = (
            f"From: <{self.sender}>\nTo: {', '.join(f'<{r}>' for r in self.rcpts)}\n"
            f"Subject: postfix test {self.seq}\nMessage-ID: <{self.message_id}>\n"
            "Date: Mon, 07 Dec 2026 12:00:00 +0000\nMIME-Version: 1.0\n"
            f"Content-Type: text/plain; charset=utf-8\nX-Seq: {self.seq}\n\n"
        )
        return (head.encode() + self.body).replace(b"\n", b"\r\n")


def mailbox(rcpt: str) -> str:
    """Return the maildir a recipient address lands in (no +tag, case-folded)."""
    return rcpt.split("@")[0].split("+")[0].casefold()


def _body(seq: int, rng: random.Random) -> bytes:
    # Lines of every shape a server must pass through: dots, empty, long (under 998).
    shapes = [b".", b"..", b".leading dot", b"", b"x" * 997, b"plain line"]
    lines = [f"message {seq}".encode(), *rng.choices(shapes, k=rng.randint(1, 12))]
    return b"\n".join(lines) + b"\n"


def mails() -> list[Mail]:
    """Return the 300 mixed messages, then the UTF-8 one and the 20 MiB one."""
    rng = random.Random(11)
    out = []
    for seq in range(300):
        users = rng.sample(["alice", "bob", "carol"], rng.randint(1, 3))
        local = [rng.choice([u, f"{u}+tag{seq}", u.capitalize()]) for u in users]
        local += [GHOST] * (seq % 30 == 7) + ["full"] * (seq % 50 == 3)
        rcpts = tuple(f"{x}@{DOMAIN}" for x in local)
        out.append(Mail(seq, f"sender{seq % 7}@outside.test", rcpts, _body(seq, rng)))
    out.append(Mail(300, "sénder@outside.test", (f"jösé@{DOMAIN}",), "grüße\n".encode()))
    line = b"0123456789" * 9 + b"abcdefgh\n"
    out.append(Mail(301, "big@outside.test", (f"carol@{DOMAIN}",), line * (20 * 2**20 // 99 + 1)))
    return out


def expected_status(rcpt: str) -> str:
    """Return the status Postfix must log for *rcpt*."""
    return {GHOST: "bounced", "full": "deferred"}.get(mailbox(rcpt), "sent")


def inject(pf: Postfix, batch: list[Mail]) -> None:
    """Send every mail of *batch* to Postfix's smtpd; all must be accepted."""
    with smtplib.SMTP("127.0.0.1", pf.smtp_port, local_hostname="client.test", timeout=120) as s:
        for m in batch:
            utf8 = not (m.sender + "".join(m.rcpts)).isascii()
            options = ["BODY=8BITMIME", *(["SMTPUTF8"] if utf8 else [])]
            refused = s.sendmail(m.sender, list(m.rcpts), m.wire(), mail_options=options)
            assert not refused, (m.seq, refused)


MSGID = re.compile(r" ([0-9A-F]+): message-id=<([^>]*)>")
STATUS = re.compile(r" ([0-9A-F]+): to=<([^>]*)>,.*? status=(\w+) (.*)$")


def outcomes(log: str) -> dict[tuple[str, str], tuple[str, str]]:
    """Return the first (status, reply) per (Message-ID, recipient) the maillog has."""
    ids: dict[str, str] = {}
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for line in log.splitlines():
        if m := MSGID.search(line):
            ids[m[1]] = m[2]
        elif (m := STATUS.search(line)) and m[1] in ids:
            out.setdefault((ids[m[1]], m[2].casefold()), (m[3], m[4]))
    return out


def wait_for_outcomes(pf: Postfix, batch: list[Mail]) -> dict[tuple[str, str], tuple[str, str]]:
    """Wait (bounded) until the maillog has a status for every recipient of every mail."""
    want = {(m.message_id, r.casefold()) for m in batch for r in m.rcpts}
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while True:
        got = outcomes(pf.log())
        if want <= got.keys():
            return got
        if time.monotonic() > deadline:
            left = sorted(want - got.keys())
            raise AssertionError(
                f"{len(left)} recipients without a status after {DELIVERY_TIMEOUT} s, e.g. "
                f"{left[:5]}\n{pf.log()[-3000:]}"
            )
        time.sleep(0.5)


def make_full(md: Path) -> None:
    """Make *md* a maildir already over its Maildir++ quota (500-byte messages in cur/)."""
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True)
    for i in range(FULL_MESSAGES):
        (md / "cur" / f"1796600000.M{i}P1.old,S=500:2,S").write_bytes(b"x" * 499 + b"\n")
    (md / "maildirsize").write_bytes(FULL_MAILDIRSIZE)


def quota_usage(md: Path) -> tuple[bytes, int, int]:
    """Return the limits line of *md*'s maildirsize and the bytes and messages it counts."""
    first, *usage = (md / "maildirsize").read_bytes().splitlines()
    sizes = [tuple(int(x) for x in line.split()) for line in usage]
    return first, sum(b for b, _ in sizes), sum(c for _, c in sizes)


@dataclass
class Run:
    """What one Postfix run did: the mails, their logged outcomes, the server's root."""

    mails: list[Mail]
    outcomes: dict[tuple[str, str], tuple[str, str]]
    root: Path


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    """Send every mail through Postfix into ``maildrop lmtp``; stop both before the checks."""
    d = Path(tempfile.mkdtemp(prefix="maildrop-postfix-"))
    d.chmod(0o755)  # Postfix's daemons drop to the postfix user
    try:
        root = d / "root"
        for u in USERS:
            (root / u).mkdir(parents=True)
        make_full(root / "full")
        batch = mails()
        mailboxes = [f"{u}@{DOMAIN}" for u in (*USERS, GHOST)]
        with (
            maildrop_lmtp(root, d / "maildrop.log") as (_, lmtp_port),
            postfix(d, lmtp_port, DOMAIN, mailboxes, "outside.test") as pf,
        ):
            wait_for_greeting(pf.smtp_port, f"Postfix smtpd (log: {pf.maillog})")
            inject(pf, batch)
            got = wait_for_outcomes(pf, batch)
        yield Run(batch, got, root)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def delivered(md: Path, by_seq: dict[int, Mail]) -> collections.Counter[int]:
    """Count the messages in *md* by X-Seq, checking each body is exactly the one sent."""
    assert not (md / "tmp").exists() or not os.listdir(md / "tmp"), f"{md}/tmp is not empty"
    seqs: collections.Counter[int] = collections.Counter()
    for sub in ("new", "cur"):
        for name in os.listdir(md / sub) if (md / sub).is_dir() else []:
            head, _, body = (md / sub / name).read_bytes().partition(b"\n\n")
            seq = int(re.search(rb"^X-Seq: (\d+)$", head, re.M)[1])  # type: ignore[index]
            assert body == by_seq[seq].body, f"{md}/{sub}/{name}: body of {seq} differs"
            seqs[seq] += 1
    return seqs


def wrong_statuses(run: Run, users: set[str]) -> list[str]:
    """Return a line per recipient of *users*' mailboxes whose logged status is not right."""
    out = []
    for m in run.mails:
        for r in m.rcpts:
            status, reply = run.outcomes[m.message_id, r.casefold()]
            if mailbox(r) in users and status != expected_status(r):
                out.append(f"{m.seq} <{r}>: {status} {reply} (want {expected_status(r)})")
    return out


def wanted(run: Run, user: str) -> collections.Counter[int]:
    """Return the X-Seq counts *user*'s maildir must hold: one per recipient sent to."""
    return collections.Counter(
        m.seq
        for m in run.mails
        for r in m.rcpts
        if mailbox(r) == user and expected_status(r) == "sent"
    )


def test_mixed_recipients_are_sent_or_bounced_and_land_once(run: Run) -> None:
    """300 mails to mixed, tagged and capitalised recipients: each lands once per recipient."""
    assert wrong_statuses(run, {"alice", "bob", "carol", GHOST}) == []
    by_seq = {m.seq: m for m in run.mails}
    for user in ("alice", "bob", "carol"):
        assert delivered(run.root / user, by_seq) == wanted(run, user), user
    assert not (run.root / GHOST).exists()


def test_utf8_sender_and_recipient_are_delivered(run: Run) -> None:
    """A UTF-8 envelope (SMTPUTF8) is sent, not bounced, and lands in the UTF-8 mailbox."""
    assert wrong_statuses(run, {"jösé"}) == []
    by_seq = {m.seq: m for m in run.mails}
    assert delivered(run.root / "jösé", by_seq) == collections.Counter({300: 1})
    got = next((run.root / "jösé" / "new").iterdir()).read_bytes()
    assert got.startswith("Return-Path: <sénder@outside.test>\n".encode())


def test_twenty_mib_message_is_delivered_whole(run: Run) -> None:
    """The 20 MiB message is sent and its maildir copy is byte for byte the one sent."""
    big = run.mails[301]
    assert len(big.body) > 20 * 2**20
    status, reply = run.outcomes[big.message_id, big.rcpts[0].casefold()]
    assert status == "sent", reply
    assert delivered(run.root / "carol", {m.seq: m for m in run.mails})[301] == 1


def test_over_quota_recipient_is_deferred_and_gets_nothing(run: Run) -> None:
    """A recipient over its maildirsize quota is deferred (452 4.2.2); its maildir is untouched."""
    lines = wrong_statuses(run, {"full"})
    assert lines == []
    replies = [run.outcomes[m.message_id, r] for m in run.mails for r in m.rcpts if "full@" in r]
    assert len(replies) == 6
    assert all("4.2.2" in reply for _, reply in replies), replies
    md = run.root / "full"
    assert os.listdir(md / "new") == []
    assert len(os.listdir(md / "cur")) == FULL_MESSAGES
    assert quota_usage(md) == (b"1000S,5C", 500 * FULL_MESSAGES, FULL_MESSAGES)
