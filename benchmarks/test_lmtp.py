"""The LMTP contender set (``python -m benchmarks.lmtp``) at smoke size, and its checks."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest

from . import lmtp
from ._lmtp_peers import Server, verify


def test_flags_after_double_dash_go_to_maildrop() -> None:
    """Everything after ``--`` is passed to ``maildrop lmtp``; the smoke plan keeps it."""
    _, plan = lmtp.parse(["--smoke", "--", "--workers", "2"])
    assert plan.extra == ("--workers", "2")
    assert plan.count == lmtp.SMOKE.count
    _, plan = lmtp.parse(["--sizes", "2", "--sessions", "4,16", "--messages", "50"])
    assert plan.cells() == [(2048, 4), (2048, 16)]
    assert plan.count == 50


def test_message_file_is_one_byte_short_of_what_arrives(tmp_path: Path) -> None:
    """smtp-source adds an empty last line: the file plus LF is the message of that size."""
    path, arrives = lmtp.message_file(tmp_path, 2048)
    assert len(arrives) == 2048
    assert path.read_bytes() + b"\n" == arrives


def test_verify_refuses_missing_and_altered_messages(tmp_path: Path) -> None:
    """verify() fails on a missing message and on a message that is not the one sent."""
    server = Server("x", 0, 0, tmp_path, 0)
    md = server.mailbox("u")
    for i in range(3):
        (md / "new" / f"m{i}").write_bytes(b"Return-Path: <a@b>\nDelivered-To: u@x\n" + b"hi\n")
    verify(md, 3, b"hi\n", "x")
    (md / "new" / "m2").unlink()
    with pytest.raises(RuntimeError, match="2 of 3 messages"):
        verify(md, 3, b"hi\n", "x")
    (md / "new" / "m1").write_bytes(b"Return-Path: <a@b>\nnot a header\nhi\n")
    with pytest.raises(RuntimeError, match="is not the message sent"):
        verify(md, 2, b"hi\n", "x")


def test_smoke_run_measures_both_servers() -> None:
    """A smoke run delivers, counts and checks every message of both servers in each cell."""
    why = lmtp.unavailable(install=False)
    if why:
        pytest.skip(why)
    res = lmtp.benchmark(lmtp.SMOKE, Path(tempfile.gettempdir()), echo=False)
    for size, sessions in lmtp.SMOKE.cells():
        for name in ("maildrop", "dovecot"):
            assert len(res.runs[name, size, sessions]) == lmtp.SMOKE.rounds
            assert res.rate(name, size, sessions) > 0
        assert res.ratio(size, sessions) > 0
    assert len(lmtp.table(res)) == 2 + len(lmtp.SMOKE.cells())


def test_floor_flag_adds_the_bare_and_the_storing_floor() -> None:
    """``--floor`` runs both floor servers; the storing one's messages pass verify()."""
    why = lmtp.unavailable(install=False)
    if why:
        pytest.skip(why)
    _, plan = lmtp.parse(["--smoke", "--floor"])
    assert plan.floor
    plan = dataclasses.replace(plan, sessions=(8,))
    res = lmtp.benchmark(plan, Path(tempfile.gettempdir()), echo=False)
    for size, sessions in plan.cells():
        for name in ("floor", "floordisk"):
            assert len(res.runs[name, size, sessions]) == plan.rounds
            assert res.rate(name, size, sessions) > 0
    head = lmtp.table(res)[0]
    assert "asyncio floor CPU" in head
    assert "raw durable store" in head
