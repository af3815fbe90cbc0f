"""A real Twisted ESMTP server streams messages into the shim; the client sees 250 or 4xx."""

from __future__ import annotations

import json
import mailbox
import os
import random
import signal
import smtplib
import string
from pathlib import Path

import pytest

from ._util import finish, needs_twisted, start


def message(size: int, seed: int) -> bytes:
    """Return a CRLF message of about *size* bytes with 76-character body lines."""
    rng = random.Random(seed)
    head = f"From: a@example.com\r\nTo: b@example.com\r\nSubject: {size}\r\n\r\n".encode()
    alphabet = string.ascii_letters + string.digits + " .,-"
    lines = []
    total = len(head)
    while total < size:
        line = "".join(rng.choices(alphabet, k=76)).encode()
        if line.startswith(b"."):
            line = b"x" + line[1:]
        lines.append(line)
        total += 78
    return head + b"\r\n".join(lines) + b"\r\n"


@needs_twisted
@pytest.mark.slow
def test_twisted_esmtp_server_delivers_through_the_shim(tmp_path: Path) -> None:
    """1 KiB, 1 MiB and 20 MiB arrive byte-exact; disk errors get 4xx, never 250."""
    md = tmp_path / "Maildir"
    proc = start("_smtp_server.py", str(md), cwd=tmp_path)
    try:
        assert proc.stdout is not None
        port = json.loads(proc.stdout.readline())["port"]
        msgs = [message(1 << 10, 1), message(1 << 20, 2), message(20 << 20, 3)]
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
            for m in msgs:
                assert client.sendmail("a@example.com", ["b@example.com"], m) == {}
            for local, code in (("eio", 451), ("enospc", 452)):
                with pytest.raises(smtplib.SMTPDataError) as info:
                    client.sendmail("a@example.com", [f"{local}@example.com"], msgs[0])
                assert info.value.smtp_code == code
            # The connection still works after a failed delivery.
            assert client.sendmail("a@example.com", ["b@example.com"], msgs[0]) == {}
    finally:
        proc.send_signal(signal.SIGTERM)
    records = finish(proc, timeout=60)
    assert [r.get("reply", "")[:3] for r in records] == ["", "", "", "451", "452", ""]
    assert all(r["fired"] for r in records)
    ok = [r for r in records if "reply" not in r]
    # The server replied 250 only after the Deferred fired with the file already in new/.
    assert all(r["in_new_at_reply"] for r in ok)
    want = [m.replace(b"\r\n", b"\n") for m in [*msgs, msgs[0]]]
    assert [Path(r["path"]).read_bytes() for r in ok] == want
    assert sorted(os.listdir(md / "new")) == sorted(Path(r["path"]).name for r in ok)
    assert os.listdir(md / "tmp") == []
    # A stdlib reader sees the same messages.
    assert len(mailbox.Maildir(md, create=False)) == 4
