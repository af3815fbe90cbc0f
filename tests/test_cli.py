"""The ``maildrop`` command: in-process for coverage, real processes for exit statuses."""

from __future__ import annotations

import asyncio
import errno
import os
import queue
import re
import runpy
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from maildrop import DEFAULT_SYSCALLS, _cli_serve, cli

from .conftest import listing

MSG = b"From: s@example.org\nSubject: hi\n\nbody\n"
# smtplib sends bytes as they are (it only appends CRLF if missing): give it the wire form.
CRLF_MSG = MSG.replace(b"\n", b"\r\n")
PY = [sys.executable, "-m", "maildrop"]


def run_main(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], stdin: bytes = b"", *, file: bool = False
) -> int:
    """Run cli.main(argv) with *stdin* as the message, from a pipe or a regular *file*."""
    if file:
        with tempfile.TemporaryFile() as f:
            f.write(stdin)
            f.seek(0)
            fd = os.dup(f.fileno())
    else:
        fd, w = os.pipe()
        os.write(w, stdin)
        os.close(w)
    monkeypatch.setattr(cli, "_stdin_fd", lambda: fd)
    try:
        return cli.main(argv)
    finally:
        os.close(fd)


def one_line_error(err: str) -> str:
    """Assert *err* is exactly one line without a traceback; return it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def new_files(md: Path) -> list[bytes]:
    """Contents of the messages in new/."""
    d = md / "new"
    return [(d / n).read_bytes() for n in sorted(os.listdir(d))] if d.is_dir() else []


# -- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("1000", 1000), ("512K", 512 << 10), ("10M", 10 << 20), ("1g", 1 << 30), ("2MiB", 2 << 20)],
)
def test_parse_size(text: str, value: int) -> None:
    """Sizes take binary K/M/G/T multiples."""
    assert cli.parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "value"), [("36h", 129600.0), ("90m", 5400.0), ("2d", 172800.0), ("15", 15.0)]
)
def test_parse_duration(text: str, value: float) -> None:
    """Durations take s/m/h/d/w; a bare number is seconds."""
    assert cli.parse_duration(text) == value


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["deliver"],
        ["deliver", "--max-size", "lots", "md"],
        ["deliver", "--bogus", "md"],
        ["clean-tmp", "--older-than", "soon", "md"],
        ["lmtp", "--root", "/"],
        ["lmtp", "--listen", "127.0.0.1:0", "--root", "/", "--quota", "lots"],
        ["lmtp", "--listen", "127.0.0.1:0", "--root", "/", "--quota", "1M,x"],
        ["lmtp", "--listen", "127.0.0.1:0", "--root", "/", "--quota", "0"],
        ["lmtp", "--listen", "127.0.0.1:0", "--root", "/", "--max-connections", "0"],
        ["lmtp", "--listen", "127.0.0.1:0", "--root", "/", "--no-quota", "--quota", "1M"],
        ["smtp", "--listen", "127.0.0.1:0", "--root", "/", "--retry-memory", "soon"],
    ],
)
def test_usage_errors_are_one_line_and_64(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad arguments: exit 64 and a one-line error (plus the usage line with no command)."""
    assert run_main(monkeypatch, argv) == 64
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("maildrop")
    if argv:
        one_line_error(err)


@pytest.mark.parametrize("command", [[], ["deliver"], ["lmtp"], ["smtp"], ["clean-tmp"]])
def test_help_is_clear(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """--help exits 0 and describes the command with an example."""
    assert cli.main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: maildrop" in out
    assert "xample" in out or "Exit status" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the version."""
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("maildrop ")


def test_server_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """lmtp --help names every server flag; smtp --help adds --retry-memory."""
    assert cli.main(["lmtp", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--quota", "--quota-permanent", "--no-quota", "--max-connections",
                 "--max-recipients", "--timeout", "--data-timeout", "--max-size"):  # fmt: skip
        assert flag in out
    assert "--retry-memory" not in out
    assert cli.main(["smtp", "--help"]) == 0
    assert "--retry-memory" in capsys.readouterr().out


# -- deliver (in process) -----------------------------------------------------------------


def test_deliver_prints_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message from stdin lands in new/, durable; its path is printed; exit 0."""
    md = tmp_path / "Maildir"
    assert run_main(monkeypatch, ["deliver", str(md)], MSG) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.parent == md / "new"
    assert path.read_bytes() == MSG
    assert listing(md)["tmp"] == []


def test_deliver_drops_a_leading_from_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postfix's mbox 'From ' line is dropped, from a regular file and from a pipe."""
    md = tmp_path / "md"
    from_line = b"From s@example.org  Wed Nov 25 23:00:00 2026\n"
    assert run_main(monkeypatch, ["deliver", str(md)], from_line + MSG, file=True) == 0
    assert run_main(monkeypatch, ["deliver", str(md)], from_line + MSG) == 0
    assert run_main(monkeypatch, ["deliver", str(md)], MSG) == 0
    assert run_main(monkeypatch, ["deliver", str(md)], MSG, file=True) == 0
    capsys.readouterr()
    assert new_files(md) == [MSG] * 4


def test_deliver_headers_and_crlf(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--return-path, --delivered-to and --crlf-to-lf shape the stored message."""
    md = tmp_path / "md"
    argv = ["deliver", "--return-path", "s@x", "--delivered-to", "a@x", "--crlf-to-lf", str(md)]
    assert run_main(monkeypatch, argv, MSG.replace(b"\n", b"\r\n")) == 0
    capsys.readouterr()
    assert new_files(md) == [b"Return-Path: <s@x>\nDelivered-To: a@x\n" + MSG]


def test_deliver_into_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--folder needs an existing folder (67 otherwise) unless --create-folder; bad names 64."""
    md = tmp_path / "md"
    assert run_main(monkeypatch, ["deliver", "--folder", "Spam", str(md)], MSG) == 67
    assert "no folder 'Spam'" in one_line_error(capsys.readouterr().err)
    assert run_main(monkeypatch, ["deliver", "--folder", "a/b", str(md)], MSG) == 64
    one_line_error(capsys.readouterr().err)
    assert (
        run_main(monkeypatch, ["deliver", "--create-folder", "--folder", "Spam", str(md)], MSG)
        == 0
    )
    capsys.readouterr()
    assert run_main(monkeypatch, ["deliver", "--folder", "Spam", str(md)], MSG) == 0
    assert Path(capsys.readouterr().out.strip()).parent == md / ".Spam" / "new"
    assert new_files(md / ".Spam") == [MSG, MSG]


def test_deliver_looks_up_the_folder_and_maildirsize_through_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder check and the maildirsize probe stat through the syscall table: an EIO
    there hides the folder (67), as a failing isdir() did."""
    seen: list[str] = []

    def stat(path: Any, **kw: Any) -> os.stat_result:
        seen.append(os.path.basename(str(path)))
        if str(path).endswith(".Spam"):
            raise OSError(errno.EIO, "injected EIO")
        return os.stat(path, **kw)

    table = DEFAULT_SYSCALLS.replace(stat=stat)
    monkeypatch.setattr(cli, "_syscalls", lambda: table)
    md = tmp_path / "md"
    for d in ("tmp", "new", "cur", ".Spam", ".Lists"):
        (md / d).mkdir(parents=True)
    assert run_main(monkeypatch, ["deliver", "--folder", "Lists", str(md)], MSG) == 0
    assert seen[:2] == [".Lists", "maildirsize"]
    assert run_main(monkeypatch, ["deliver", "--folder", "Spam", str(md)], MSG) == 67
    assert "no folder 'Spam'" in one_line_error(capsys.readouterr().err)


def test_deliver_too_large_is_65(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--max-size: a larger message is refused with 65 and leaves nothing."""
    md = tmp_path / "md"
    assert run_main(monkeypatch, ["deliver", "--max-size", "10", str(md)], MSG) == 65
    assert "exit status 65" in one_line_error(capsys.readouterr().err)
    assert new_files(md) == []


def test_deliver_disk_full_is_75(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC (injected through the syscall table) exits 75 and leaves nothing."""

    def enospc(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    table = DEFAULT_SYSCALLS.replace(fsync=enospc)
    monkeypatch.setattr(cli, "_syscalls", lambda: table)
    md = tmp_path / "md"
    for d in ("tmp", "new", "cur"):
        (md / d).mkdir(parents=True)
    assert run_main(monkeypatch, ["deliver", str(md)], MSG) == 75
    line = one_line_error(capsys.readouterr().err)
    assert "No space left" in line
    assert f"{md / 'tmp'}/" in line  # the directory, not only the file's name
    assert "temporary" in line
    assert listing(md) == {"tmp": [], "new": [], "cur": []}


def test_deliver_into_missing_parent_is_67(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A maildir whose parent directory is missing cannot be created: 67, one line."""
    assert run_main(monkeypatch, ["deliver", str(tmp_path / "no" / "md")], MSG) == 67
    one_line_error(capsys.readouterr().err)


# -- clean-tmp ----------------------------------------------------------------------------


def test_clean_tmp_removes_only_stale_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files older than --older-than go (maildir and folders); younger stay; each is listed."""
    md = tmp_path / "md"
    for d in ("tmp", "new", "cur", ".Spam/tmp", ".Spam/new", ".Spam/cur", ".notafolder"):
        (md / d).mkdir(parents=True)
    for path in (md / "tmp" / "a", md / ".Spam" / "tmp" / "b"):
        path.write_bytes(b"partial")
    # Staleness counts the change time too, which cannot be set back: move the clock on.
    later = time.time() + 3600
    monkeypatch.setattr(time, "time", lambda: later)
    assert run_main(monkeypatch, ["clean-tmp", str(md)]) == 0
    assert capsys.readouterr().out.strip() == f"removed 0 stale files from {md}"
    assert run_main(monkeypatch, ["clean-tmp", "--older-than", "30m", str(md)]) == 0
    out = capsys.readouterr().out
    assert f"removed {md / 'tmp' / 'a'}" in out
    assert f"removed {md / '.Spam' / 'tmp' / 'b'}" in out
    assert out.strip().splitlines()[-1] == f"removed 2 stale files from {md}"
    assert os.listdir(md / "tmp") == []


def test_clean_tmp_of_missing_maildir_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No maildir there: a one-line error, not a traceback."""
    assert run_main(monkeypatch, ["clean-tmp", str(tmp_path / "nothing")]) == 67
    assert "no maildir" in one_line_error(capsys.readouterr().err)


def test_clean_tmp_skips_a_bad_folder_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder whose tmp/ is a symlink is reported; the others are cleaned; exit 75."""
    md = tmp_path / "md"
    for d in ("tmp", "new", "cur", ".A/new", ".B/tmp", ".B/new", "elsewhere"):
        (md / d).mkdir(parents=True)
    (md / ".A" / "tmp").symlink_to(md / "elsewhere")
    (md / "elsewhere" / "keep").write_bytes(b"x")
    (md / ".B" / "tmp" / "stale").write_bytes(b"x")
    later = time.time() + 3600
    monkeypatch.setattr(time, "time", lambda: later)
    assert run_main(monkeypatch, ["clean-tmp", "--older-than", "30m", str(md)]) == 75
    captured = capsys.readouterr()
    assert f"removed {md / '.B' / 'tmp' / 'stale'}" in captured.out
    assert f"skipped {md / '.A'}:" in captured.err
    assert "1 folder could not be cleaned (exit status 75)" in captured.err
    assert os.listdir(md / "elsewhere") == ["keep"]


def test_deliver_quota_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """maildirsize enforced (75) and updated; --quota with --no-quota is 64; bad quotas 64."""
    md = tmp_path / "md"
    for d in ("tmp", "new", "cur"):
        (md / d).mkdir(parents=True)
    (md / "maildirsize").write_bytes(b"100S\n90 1\n")
    assert run_main(monkeypatch, ["deliver", str(md)], MSG) == 75
    assert "90 of 100 bytes (90%)" in one_line_error(capsys.readouterr().err)
    assert run_main(monkeypatch, ["deliver", "--quota", "1M", str(md)], MSG) == 0
    assert (md / "maildirsize").read_bytes().startswith(b"1048576S\n")
    capsys.readouterr()
    for argv in (["--quota", "1M", "--no-quota"], ["--quota", "1M,x"], ["--quota", "0"]):
        assert run_main(monkeypatch, ["deliver", *argv, str(md)], MSG) == 64
        one_line_error(capsys.readouterr().err)


def test_deliver_abbreviated_options_go_through_argparse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An abbreviation argparse accepts (--max for --max-size) still delivers."""
    md = tmp_path / "md"
    assert run_main(monkeypatch, ["deliver", "--max", "1M", str(md)], MSG) == 0
    assert Path(capsys.readouterr().out.strip()).read_bytes() == MSG


def test_deliver_closed_stdin_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A closed standard input: 66 and a clear line."""
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    monkeypatch.setattr(cli, "_stdin_fd", lambda: r)
    assert cli.main(["deliver", str(tmp_path / "md")]) == 66
    assert "standard input is closed" in one_line_error(capsys.readouterr().err)


# -- the quick deliver options ------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["md"],
        ["--folder", "Lists", "--create-folder", "md"],
        ["--max-size=10M", "--quota", "1G,100", "--quota-permanent", "md"],
        ["--return-path", "", "--delivered-to=a@x", "--crlf-to-lf", "--no-fsync", "md"],
        ["--no-quota", "--", "-odd-name"],
    ],
)
def test_quick_options_match_argparse(argv: list[str]) -> None:
    """The argparse-free reader gives exactly what argparse gives."""
    quick = cli._quick_deliver_args(argv)
    assert quick is not None
    assert vars(quick) == vars(cli._build_parser().parse_args(["deliver", *argv]))


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["a", "b"],
        ["--help"],
        ["--fold", "X", "md"],
        ["--max-size", "huge", "md"],
        ["--folder", "md"],
        ["--folder", "--no-quota", "md"],
        ["--no-fsync=yes", "md"],
    ],
)
def test_quick_options_leave_the_rest_to_argparse(argv: list[str]) -> None:
    """Help, abbreviations, bad values and missing arguments go to argparse."""
    assert cli._quick_deliver_args(argv) is None


@pytest.mark.parametrize(
    ("name", "folder"),
    [
        (None, None),
        ("INBOX", None),
        ("inbox", None),
        ("INBOX.Lists.python", "Lists.python"),
        ("Inbox.x", "x"),
        ("Lists", "Lists"),
        ("INBOXES", "INBOXES"),
    ],
)
def test_inbox_folder(name: str | None, folder: str | None) -> None:
    """INBOX is the maildir itself; INBOX.X is the folder X."""
    assert cli.inbox_folder(name) == folder


def test_deliver_help_lists_the_quota_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """--help documents the quota options and the exit statuses."""
    assert cli.main(["deliver", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--quota SIZE[,COUNT]", "--no-quota", "--quota-permanent", "INBOX"):
        assert flag in out
    assert cli.main(["--help"]) == 0
    assert "77" not in capsys.readouterr().out


# -- lmtp / smtp (in process) -------------------------------------------------------------


async def serving_in_process(argv: list[str]) -> tuple[asyncio.Task[int], asyncio.Event, int]:
    """Start ``cli.serve`` for the command line *argv* in a task; return the task, the event
    that stops it and the port it bound (waits up to 5 s for the listener)."""
    args = cli._build_parser().parse_args(argv)
    stop = asyncio.Event()
    bound: list[str] = []
    task = asyncio.create_task(_cli_serve.serve(args, stop, bound.extend))
    for _ in range(500):
        if bound or task.done():
            break
        await asyncio.sleep(0.01)
    return task, stop, int(bound[0].rsplit(":", 1)[1])


@pytest.mark.asyncio
async def test_serve_in_process_delivers_and_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The lmtp command serves until stopped, logging one line per delivery."""
    (tmp_path / "alice").mkdir()
    task, stop, port = await serving_in_process(
        ["lmtp", "--listen", "127.0.0.1:0", "--root", str(tmp_path), "--max-size", "1M"]
    )

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.LMTP("127.0.0.1", port, local_hostname="client.test") as s:
            return s.sendmail("s@x", ["alice@x", "nobody@x"], CRLF_MSG)  # one accepted: one reply

    refused = await asyncio.to_thread(send)
    stop.set()
    assert await asyncio.wait_for(task, 10) == 0
    assert list(refused) == ["nobody@x"]
    assert new_files(tmp_path / "alice") == [b"Return-Path: <s@x>\nDelivered-To: alice@x\n" + MSG]
    err = capsys.readouterr().err
    assert re.search(rf"maildrop lmtp on \S+ listening on 127\.0\.0\.1:{port},", err), err
    assert f" {socket.gethostname()} maildrop[" in err
    delivered = [line for line in err.splitlines() if " delivered to=<alice@x> " in line]
    assert len(delivered) == 1
    assert "path=" in delivered[0]
    assert "size=" in delivered[0]
    assert "time=" in delivered[0]
    assert "stopped" in err


@pytest.mark.asyncio
async def test_serve_flags_reach_the_server(tmp_path: Path) -> None:
    """--quota/--quota-permanent/--max-recipients shape the replies (SMTP, no retry memory)."""
    (tmp_path / "alice").mkdir()
    (tmp_path / "bob").mkdir()
    task, stop, port = await serving_in_process(
        ["smtp", "--listen", "127.0.0.1:0", "--root", str(tmp_path), "--quota", "100,5",
         "--quota-permanent", "--max-recipients", "1", "--retry-memory", "0",
         "--timeout", "10s", "--data-timeout", "10s", "--max-connections", "3"]
    )  # fmt: skip

    def send() -> tuple[Any, ...]:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test") as s:
            s.ehlo()
            size = s.esmtp_features["size"]
            s.mail("s@x")
            first = s.rcpt("alice@x")
            second = s.rcpt("bob@x")
            data = s.data(b"x" * 200 + b"\r\n")
            return size, first, second, data

    size, first, second, data = await asyncio.to_thread(send)
    stop.set()
    assert await asyncio.wait_for(task, 10) == 0
    assert size == str(32 * 1024 * 1024)
    assert first[0] == 250
    assert second[0] == 452
    assert data[0] == 552
    assert data[1].startswith(b"5.2.2")
    assert (tmp_path / "alice" / "maildirsize").read_text().startswith("100S,5C\n")


def test_serve_bad_listen_address_is_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A malformed --listen is a one-line usage error (64); a busy port is temporary (75)."""
    assert run_main(monkeypatch, ["smtp", "--listen", "nowhere", "--root", str(tmp_path)]) == 64
    assert "HOST:PORT" in one_line_error(capsys.readouterr().err)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["smtp", "--listen", f"127.0.0.1:{port}", "--root", str(tmp_path)]
        assert run_main(monkeypatch, argv) == 75
    assert "in use" in one_line_error(capsys.readouterr().err)


@pytest.mark.asyncio
async def test_serve_itself_reports_bad_addresses(tmp_path: Path) -> None:
    """serve() binding its own addresses: malformed is UsageError, busy is OSError."""
    args = cli._build_parser().parse_args(["lmtp", "--listen", "x", "--root", str(tmp_path)])
    with pytest.raises(cli.UsageError, match="HOST:PORT"):
        await _cli_serve.serve(args, asyncio.Event())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args.listen = [f"127.0.0.1:{busy.getsockname()[1]}"]
        with pytest.raises(OSError, match="in use"):
            await _cli_serve.serve(args, asyncio.Event())


def test_serve_root_must_be_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--root that is not a directory: one-line usage error."""
    argv = ["lmtp", "--listen", "127.0.0.1:0", "--root", str(tmp_path / "none")]
    assert run_main(monkeypatch, argv) == 64
    assert "--root" in one_line_error(capsys.readouterr().err)


# -- real processes -----------------------------------------------------------------------


def run(argv: list[str], stdin: bytes = b"", **kw: Any) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m maildrop ARGV`` (bounded)."""
    return subprocess.run(
        [*PY, *argv], input=stdin, capture_output=True, timeout=60, check=False, **kw
    )


def test_process_delivers_and_exits_0(tmp_path: Path) -> None:
    """python -m maildrop deliver: exit 0, path on stdout."""
    md = tmp_path / "md"
    p = run(["deliver", str(md)], MSG)
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.decode().strip()).read_bytes() == MSG


def test_console_script_help(tmp_path: Path) -> None:
    """The installed ``maildrop`` console script runs."""
    script = shutil.which("maildrop", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the maildrop console script is not installed next to this Python")
    p = subprocess.run([script, "deliver", "--help"], capture_output=True, timeout=60, check=False)
    assert p.returncode == 0
    assert b"MAILDIR" in p.stdout


def test_process_usage_error_is_64(tmp_path: Path) -> None:
    """Bad arguments in a real process: 64 and one line on stderr."""
    p = run(["deliver", "--max-size", "huge", str(tmp_path)])
    assert p.returncode == 64
    one_line_error(p.stderr.decode())


def test_process_too_large_is_65(tmp_path: Path) -> None:
    """A message over --max-size: 65, nothing delivered."""
    p = run(["deliver", "--max-size", "8", str(tmp_path / "md")], MSG)
    assert p.returncode == 65
    one_line_error(p.stderr.decode())
    assert new_files(tmp_path / "md") == []


def test_process_disk_full_is_75(tmp_path: Path) -> None:
    """Disk full (ENOSPC injected by strace into the fsync calls): 75, nothing left."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed: cannot inject ENOSPC into a process")
    md = tmp_path / "md"
    for d in ("tmp", "new", "cur"):
        (md / d).mkdir(parents=True)
    cmd = [strace, "-f", "-qq", "-o", os.devnull, "-e", "trace=fsync"]
    cmd += ["-e", "inject=fsync:error=ENOSPC", *PY, "deliver", str(md)]
    p = subprocess.run(cmd, input=MSG, capture_output=True, timeout=60, check=False)
    if b"ptrace" in p.stderr and p.returncode != 75:
        pytest.skip(f"strace cannot trace here: {p.stderr.decode().strip()}")
    assert p.returncode == 75, p.stderr
    assert "No space left on device" in one_line_error(p.stderr.decode())
    assert listing(md) == {"tmp": [], "new": [], "cur": []}


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory under /tmp that every user may traverse (tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="maildrop-perm-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_process_permission_denied_is_75(shared_dir: Path) -> None:
    """An unprivileged user delivering into root's 0700 maildir: 75 (the MTA retries; 77
    would bounce), one line naming the directory."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the command as an unprivileged user (uid 65534)")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    probe = subprocess.run(
        [*drop, sys.executable, "-c", "import maildrop.cli"],
        capture_output=True, timeout=60, check=False, cwd="/", env=env,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"uid 65534 cannot run this Python and maildrop: {probe.stderr[-200:]!r}")
    md = shared_dir / "md"
    for d in ("tmp", "new", "cur"):
        (md / d).mkdir(parents=True)
    md.chmod(0o700)
    cmd = [*drop, *PY, "deliver", str(md)]
    p = subprocess.run(
        cmd, input=MSG, capture_output=True, timeout=60, check=False, cwd="/", env=env
    )
    assert p.returncode == 75, p.stderr
    line = one_line_error(p.stderr.decode())
    assert "Permission denied" in line
    assert str(md) in line
    assert "temporary failure" in line
    assert listing(md) == {"tmp": [], "new": [], "cur": []}


def test_process_unknown_folder_is_one_line(tmp_path: Path) -> None:
    """An unknown folder: one line, no traceback, nothing delivered."""
    p = run(["deliver", "--folder", "Nope", str(tmp_path / "md")], MSG)
    assert p.returncode == 67
    assert "no folder 'Nope'" in one_line_error(p.stderr.decode())


def _lines(stream: Any, out: queue.Queue[str]) -> None:
    for raw in iter(stream.readline, b""):
        out.put(raw.decode(errors="replace"))


def test_lmtp_server_process(tmp_path: Path) -> None:
    """maildrop lmtp as a process: prints its port, per-recipient replies, SIGTERM exits 0."""
    for u in ("alice", "bob"):
        (tmp_path / "root" / u).mkdir(parents=True)
    cmd = [*PY, "lmtp", "--listen", "127.0.0.1:0", "--root", str(tmp_path / "root")]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_lines, args=(proc.stderr, lines), daemon=True)
    reader.start()
    log: list[str] = []
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, "".join(log)
                continue
            log.append(line)
            if "listening on " in line:
                port = int(line.split("listening on ")[1].split(",")[0].rsplit(":", 1)[1])
        assert port is not None, "".join(log)

        with smtplib.LMTP("127.0.0.1", port, local_hostname="client.test") as s:
            refused = s.sendmail("s@x", ["alice@x", "../x@x", "bob@x"], CRLF_MSG)
            assert s.getreply()[0] == 250  # bob's reply (sendmail read alice's)
        assert list(refused) == ["../x@x"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(10)
        assert proc.stderr is not None
        proc.stderr.close()
    while not lines.empty():
        log.append(lines.get())
    text = "".join(log)
    assert "Traceback" not in text
    assert sum(" delivered to=<" in line for line in log) == 2, text
    assert "stopped" in text
    for u in ("alice", "bob"):
        assert new_files(tmp_path / "root" / u) == [b"Return-Path: <s@x>\n" + MSG]


@pytest.mark.asyncio
async def test_signals_stop_the_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM stops cleanly (0); a second signal while a message is in flight stops at once."""
    (tmp_path / "alice").mkdir()
    argv = ["smtp", "--listen", "127.0.0.1:0", "--root", str(tmp_path), "--no-fsync"]
    for twice in (False, True):
        bound: list[str] = []
        task = asyncio.create_task(
            _cli_serve._serve_until_signal(cli._build_parser().parse_args(argv), bound.extend)
        )
        for _ in range(500):
            if bound or task.done():
                break
            await asyncio.sleep(0.01)
        port = int(bound[0].rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if twice:  # a client stuck in the middle of its message holds up the clean stop
            for line in (
                b"EHLO c",
                b"MAIL FROM:<s@x>",
                b"RCPT TO:<alice@x>",
                b"DATA",
                b"Subject: x",
            ):
                writer.write(line + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        if twice:
            await asyncio.sleep(0.2)
            assert not task.done()
            os.kill(os.getpid(), signal.SIGINT)
        assert await asyncio.wait_for(task, 10) == (130 if twice else 0)
        await reader.read()
        writer.close()
        await writer.wait_closed()
    err = capsys.readouterr().err
    assert "second signal" in err
    assert listing(tmp_path / "alice") == {"tmp": [], "new": [], "cur": []}


def test_python_dash_m_entry_point(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m maildrop`` runs cli.main and exits with its status."""
    monkeypatch.setattr(sys, "argv", ["maildrop", "--version"])
    with pytest.raises(SystemExit, match=r"^0$") as info:
        runpy.run_module("maildrop", run_name="__main__")
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("maildrop ")


@pytest.mark.asyncio
async def test_cancelled_serve_closes_its_listeners(tmp_path: Path) -> None:
    """Cancelling serve() shuts the server down: its port no longer accepts connections."""
    (tmp_path / "alice").mkdir()
    task, _, port = await serving_in_process(
        ["lmtp", "--listen", "127.0.0.1:0", "--root", str(tmp_path)]
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError, match=r"^$"):
        await task
    with pytest.raises(ConnectionRefusedError, match="Connection refused"):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.asyncio
async def test_serve_quota_may_be_a_count_only(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """--quota 0,1 (as `deliver` reads it): one message fits, then RCPT is 452 4.2.2."""
    (tmp_path / "alice").mkdir()
    task, stop, port = await serving_in_process(
        ["smtp", "--listen", "127.0.0.1:0", "--root", str(tmp_path), "--quota", "0,1",
         "--retry-memory", "0"]
    )  # fmt: skip

    def send() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test") as s:
            s.ehlo()
            s.mail("s@x")
            s.rcpt("alice@x")
            first = s.data(b"Subject: q\r\n\r\nbody\r\n")
            s.mail("s@x")
            return first, s.rcpt("alice@x")

    first, second = await asyncio.to_thread(send)
    stop.set()
    assert await asyncio.wait_for(task, 10) == 0
    assert first[0] == 250
    assert second[0] == 452
    assert second[1].startswith(b"4.2.2 ")
    assert (tmp_path / "alice" / "maildirsize").read_text().startswith("1C\n")
    assert len(os.listdir(tmp_path / "alice" / "new")) == 1
    err = capfd.readouterr().err
    assert "listening on 127.0.0.1:" in err
    assert " on None " not in err  # the looked-up host name is announced
