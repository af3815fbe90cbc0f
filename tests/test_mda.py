"""``maildrop deliver`` as an MDA: real processes for every exit status, quota and signal."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maildrop import DEFAULT_SYSCALLS
from maildrop._errors import EmptyMessageError, MessageTooLargeError
from maildrop._mda import Interrupted, _Reader, deliver_fd, from_line_length
from maildrop._steps import Steps
from maildrop._writer import Settings

from .conftest import listing

MSG = b"From: s@example.org\nSubject: hi\n\nbody\n"
PY = [sys.executable, "-m", "maildrop"]
# The child must not start coverage (its imports would fail the import guard).
ENV = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE")}


def deliver(argv: list[str], stdin: bytes = MSG) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m maildrop deliver ARGV`` with *stdin* (bounded)."""
    return subprocess.run(
        [*PY, "deliver", *argv], input=stdin, capture_output=True, timeout=60, check=False
    )


def err_line(p: subprocess.CompletedProcess[bytes]) -> str:
    """The one line the command printed on stderr (no traceback)."""
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def messages(md: Path, sub: str = "new") -> list[bytes]:
    """Contents of the messages in md/sub."""
    d = md / sub
    return [(d / n).read_bytes() for n in sorted(os.listdir(d))] if d.is_dir() else []


def maildir(path: Path) -> Path:
    """Make an empty maildir at *path*."""
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


# -- the pure part ------------------------------------------------------------------------


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_from_line_is_dropped_only_when_complete(line: bytes, rest: bytes) -> None:
    """A complete first line starting 'From ' is dropped; anything else is kept whole."""
    line = line.replace(b"\n", b"")
    head = b"From " + line + b"\n" + rest
    assert from_line_length(head) == len(line) + 6
    assert from_line_length(b"From " + line) == 0
    assert from_line_length(b"Subject: " + line + b"\n") == 0
    assert from_line_length(b"From " + b"x" * 4096 + b"\n") == 0


def pipe_with(*parts: bytes) -> int:
    """Return the read end of a closed pipe holding *parts*."""
    r, w = os.pipe()
    for part in parts:
        os.write(w, part)
    os.close(w)
    return r


@pytest.mark.parametrize(
    ("data", "head"),
    [
        (b"", b""),
        (b"From x\n", b""),
        (b"no newline", b"no newline"),
        (b"From x\nSubject: y\n", b"Subject: y\n"),
        (b"Subject: y\n\nbody", b"Subject: y\n\nbody"),
    ],
)
def test_reader_head_skips_the_from_line(data: bytes, head: bytes) -> None:
    """The first bytes of the message, after a From line, up to EOF if need be."""
    r = pipe_with(data)
    try:
        assert _Reader(r).head() == head
    finally:
        os.close(r)


def test_a_signal_between_reads_stops_the_next_read() -> None:
    """A signal while not reading (a batch being written) is acted on at the next read."""
    r = pipe_with(b"data")
    try:
        reader = _Reader(r)
        reader.on_signal(signal.SIGINT, None)
        with pytest.raises(Interrupted, match="SIGINT"):
            reader.read(10)
        reader.reading = True
        with pytest.raises(Interrupted, match="SIGTERM"):
            reader.on_signal(signal.SIGTERM, None)
    finally:
        os.close(r)


# -- deliver_fd in process -----------------------------------------------------------------


def test_deliver_fd_cleans_up_when_too_large(tmp_path: Path) -> None:
    """A pipe over max_size: MessageTooLargeError after a batch was written; nothing left."""
    md = maildir(tmp_path / "md")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only writes
        os.close(r)
        os.write(w, b"x" * (3 << 20))
        os._exit(0)
    os.close(w)
    settings = Settings(str(md), None, True, True, DEFAULT_SYSCALLS, (2 << 20) - 1)
    try:
        with pytest.raises(MessageTooLargeError, match="max_size"):
            deliver_fd(Steps(settings), r)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert listing(md) == {"tmp": [], "new": [], "cur": []}


def test_deliver_fd_names_the_path_of_a_disk_error(tmp_path: Path) -> None:
    """A write error (no filename from the kernel) is given the tmp file's absolute path."""

    def eio(fd: int, data: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    md = maildir(tmp_path / "md")
    table = DEFAULT_SYSCALLS.replace(write=eio)
    r, w = os.pipe()
    os.write(w, MSG)
    os.close(w)
    try:
        with pytest.raises(OSError, match="Input/output") as info:
            deliver_fd(Steps(Settings(str(md), None, True, True, table)), r)
    finally:
        os.close(r)
    assert info.value.errno == errno.EIO
    assert str(info.value.filename).startswith(f"{md / 'tmp'}/")
    assert listing(md) == {"tmp": [], "new": [], "cur": []}


def test_deliver_fd_refuses_an_empty_file(tmp_path: Path) -> None:
    """A regular file holding only a From line is empty: nothing is created."""
    src = tmp_path / "msg"
    src.write_bytes(b"From x\n")
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(EmptyMessageError, match="empty message"):
            deliver_fd(
                Steps(Settings(str(tmp_path / "md"), None, True, True, DEFAULT_SYSCALLS)), fd
            )
    finally:
        os.close(fd)
    assert not (tmp_path / "md").exists()


def test_deliver_fd_outside_the_main_thread(tmp_path: Path) -> None:
    """From another thread (no signal handlers there) it still delivers."""
    md = tmp_path / "md"
    r, w = os.pipe()
    os.write(w, MSG)
    os.close(w)
    result: list[str] = []
    settings = Settings(str(md), None, True, True, DEFAULT_SYSCALLS)
    t = threading.Thread(target=lambda: result.append(deliver_fd(Steps(settings), r)))
    t.start()
    t.join(30)
    os.close(r)
    assert Path(result[0]).read_bytes() == MSG
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_sigterm_while_reading_in_process(tmp_path: Path) -> None:
    """SIGTERM during a read raises Interrupted, removes the tmp file, restores handlers."""
    md = maildir(tmp_path / "md")
    r, w = os.pipe()

    def writer() -> None:
        os.write(w, b"From x\n" + b"x" * (2 << 20))
        deadline = time.monotonic() + 30
        while not os.listdir(md / "tmp") and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    def ignore(signum: int, frame: object) -> None:
        """Stand in for SIGTERM's default (which would end pytest if the signal came late)."""

    previous = signal.signal(signal.SIGTERM, ignore)
    t = threading.Thread(target=writer)
    t.start()
    try:
        with pytest.raises(Interrupted, match="SIGTERM while reading"):
            deliver_fd(Steps(Settings(str(md), None, True, True, DEFAULT_SYSCALLS)), r)
        assert signal.getsignal(signal.SIGTERM) is ignore  # deliver_fd put it back
    finally:
        t.join(30)
        os.close(r)
        os.close(w)
        signal.signal(signal.SIGTERM, previous)
    assert listing(md) == {"tmp": [], "new": [], "cur": []}


def test_interrupted_names_the_signal() -> None:
    """The message says which signal stopped the delivery."""
    assert "SIGTERM" in str(Interrupted(signal.SIGTERM))
    assert "SIGINT" in str(Interrupted(signal.SIGINT))


# -- exit statuses (real processes) -------------------------------------------------------


def test_delivers_from_a_file_and_a_pipe(tmp_path: Path) -> None:
    """Exit 0, the path on stdout, the same bytes from a regular file and from a pipe."""
    md = tmp_path / "md"
    src = tmp_path / "msg"
    src.write_bytes(b"From s@x Mon Dec  7 10:00:00 2026\n" + MSG)
    with src.open("rb") as f:
        p = subprocess.run(
            [*PY, "deliver", str(md)], stdin=f, capture_output=True, timeout=60, check=False
        )
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.decode().strip()).read_bytes() == MSG
    p = deliver([str(md)], MSG)
    assert p.returncode == 0, p.stderr
    assert messages(md) == [MSG, MSG]
    assert listing(md)["tmp"] == []


@pytest.mark.parametrize("stdin", [b"", b"From s@x Mon Dec  7 10:00:00 2026\n"])
def test_empty_message_is_65(tmp_path: Path, stdin: bytes) -> None:
    """No message at all: 65, 'empty message', and no maildir is created."""
    p = deliver([str(tmp_path / "md")], stdin)
    assert p.returncode == 65
    assert "empty message: nothing delivered" in err_line(p)
    assert not (tmp_path / "md").exists()


def test_closed_stdin_is_66(tmp_path: Path) -> None:
    """A closed stdin says so (66), instead of a Python error."""
    cmd = " ".join([*PY, "deliver", str(tmp_path / "md")]) + " <&-"
    p = subprocess.run(["sh", "-c", cmd], capture_output=True, timeout=60, check=False)
    assert p.returncode == 66
    assert "standard input is closed" in err_line(p)


def test_a_closed_stdout_after_delivery_is_still_0(tmp_path: Path) -> None:
    """The message is durable before the path is printed: a stdout that is gone (a closed
    pipe) does not turn a delivery into a retry (75) and a duplicate."""
    read, write = os.pipe()
    os.close(read)  # writing the path now fails with EPIPE
    try:
        p = subprocess.run(
            [*PY, "deliver", str(tmp_path / "md")],
            input=MSG, stdout=write, stderr=subprocess.PIPE, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write)
    assert p.returncode == 0, p.stderr
    assert messages(tmp_path / "md") == [MSG]


def test_a_file_as_maildir_is_73_not_a_directory(tmp_path: Path) -> None:
    """A plain file where the maildir should be: 'not a directory', permanent (73)."""
    (tmp_path / "file").write_bytes(b"")
    p = deliver([str(tmp_path / "file")])
    assert p.returncode == 73
    line = err_line(p)
    assert "is not a directory" in line
    assert "permanent" in line
    assert "symbolic link" not in line


def test_a_symlinked_tmp_is_73_symbolic_link(tmp_path: Path) -> None:
    """A symlink inside the maildir is named as one (73); nothing is written through it."""
    md = maildir(tmp_path / "md")
    (md / "tmp").rmdir()
    (tmp_path / "elsewhere").mkdir()
    (md / "tmp").symlink_to(tmp_path / "elsewhere")
    p = deliver([str(md)])
    assert p.returncode == 73
    assert f"'{md / 'tmp'}' is a symbolic link" in err_line(p)
    assert os.listdir(tmp_path / "elsewhere") == []


def test_inbox_is_the_maildir_itself(tmp_path: Path) -> None:
    """--folder INBOX (any case) is the top maildir; INBOX.Lists.python is Lists.python."""
    md = maildir(tmp_path / "md")
    assert deliver(["--folder", "INBOX", str(md)]).returncode == 0
    assert deliver(["--folder", "inbox", str(md)]).returncode == 0
    p = deliver(["--folder", "INBOX.Lists.python", "--create-folder", str(md)])
    assert p.returncode == 0, p.stderr
    assert messages(md) == [MSG, MSG]
    assert messages(md / ".Lists.python") == [MSG]
    assert not (md / ".INBOX").exists()


# -- quota --------------------------------------------------------------------------------


def quota_maildir(path: Path, content: bytes) -> Path:
    """A maildir with this maildirsize."""
    md = maildir(path)
    (md / "maildirsize").write_bytes(content)
    return md


def test_quota_is_enforced_by_default(tmp_path: Path) -> None:
    """90% used of 20000S,50C: a 3000-byte message is refused with 75, saying how full."""
    md = quota_maildir(tmp_path / "md", b"20000S,50C\n18000 45\n")
    p = deliver([str(md)], b"x" * 3000)
    assert p.returncode == 75
    line = err_line(p)
    assert "18000 of 20000 bytes (90%)" in line
    assert "45 of 50 messages (90%)" in line
    assert "temporary failure" in line
    assert listing(md) == {"tmp": [], "new": [], "cur": []}
    assert (md / "maildirsize").read_bytes() == b"20000S,50C\n18000 45\n"


def test_quota_permanent_is_73(tmp_path: Path) -> None:
    """--quota-permanent: over quota bounces (73)."""
    md = quota_maildir(tmp_path / "md", b"20000S,50C\n18000 45\n")
    p = deliver(["--quota-permanent", str(md)], b"x" * 3000)
    assert p.returncode == 73
    assert "permanent failure" in err_line(p)


def test_quota_file_is_updated(tmp_path: Path) -> None:
    """A message that fits is delivered and its line appended to maildirsize."""
    md = quota_maildir(tmp_path / "md", b"20000S,50C\n18000 45\n")
    p = deliver([str(md)], b"x" * 1000)
    assert p.returncode == 0, p.stderr
    assert (md / "maildirsize").read_bytes() == b"20000S,50C\n18000 45\n1000 1\n"


def test_quota_into_a_folder_counts_in_the_top_maildir(tmp_path: Path) -> None:
    """A folder's delivery is checked against, and recorded in, the top maildirsize."""
    md = quota_maildir(tmp_path / "md", b"20000S,50C\n18000 45\n")
    p = deliver(["--folder", "Lists", "--create-folder", str(md)], b"x" * 500)
    assert p.returncode == 0, p.stderr
    assert (md / "maildirsize").read_bytes().endswith(b"\n500 1\n")
    # Over quota by the file, which has two delta lines: recalculated (folders included),
    # the mailbox really holds 500 bytes, so the message fits.
    assert deliver(["--folder", "Lists", str(md)], b"x" * 3000).returncode == 0
    assert (md / "maildirsize").read_bytes() == b"20000S,50C\n500 1\n3000 1\n"


def test_no_quota_skips_it(tmp_path: Path) -> None:
    """--no-quota delivers over quota and leaves maildirsize alone."""
    md = quota_maildir(tmp_path / "md", b"20000S,50C\n18000 45\n")
    p = deliver(["--no-quota", str(md)], b"x" * 3000)
    assert p.returncode == 0, p.stderr
    assert (md / "maildirsize").read_bytes() == b"20000S,50C\n18000 45\n"


def test_quota_option_sets_limits(tmp_path: Path) -> None:
    """--quota SIZE,COUNT writes maildirsize with those limits and enforces them."""
    md = maildir(tmp_path / "md")
    assert deliver(["--quota", "1K,2", str(md)], b"x" * 600).returncode == 0
    assert (md / "maildirsize").read_bytes().startswith(b"1024S,2C\n")
    p = deliver(["--quota", "1K,2", str(md)], b"x" * 600)
    assert p.returncode == 75
    assert "600 of 1024 bytes" in err_line(p)
    assert deliver(["--quota", "0,5", "--no-quota", str(md)]).returncode == 64


def test_corrupt_maildirsize_does_not_stop_mail(tmp_path: Path) -> None:
    """Garbage in maildirsize: the message is still delivered (exit 0), not bounced."""
    md = quota_maildir(tmp_path / "md", b"\xff\x00garbage\nnot numbers\n-\n")
    p = deliver([str(md)])
    assert p.returncode == 0, p.stderr
    assert messages(md) == [MSG]


# -- signals ------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_reading_cleans_up_and_is_75(tmp_path: Path, signum: int) -> None:
    """A pipe that never ends: SIGINT/SIGTERM stop the delivery, tmp/ is emptied, exit 75."""
    md = maildir(tmp_path / "md")
    proc = subprocess.Popen(
        [*PY, "deliver", str(md)], stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"x" * (2 << 20))  # past one batch: a tmp file exists
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while not os.listdir(md / "tmp") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.listdir(md / "tmp"), "the delivery never started writing"
        proc.send_signal(signum)
        assert proc.wait(30) == 75
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdin.close()
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert f"interrupted by {signal.Signals(signum).name} while reading" in err
    assert listing(md) == {"tmp": [], "new": [], "cur": []}


# -- start-up cost ------------------------------------------------------------------------

# What the console script runs (pip's wrapper imports re and sys), then the modules that the
# delivery loaded on top of what the interpreter had already.
GUARD = """
import re, sys
before = set(sys.modules)
from maildrop.cli import main
rc = main(sys.argv[1:])
loaded = sorted(set(sys.modules) - before)
import json
print(json.dumps([rc, loaded]))
"""

# The whole import graph of a plain delivery: nothing else may load (the floor is a
# do-nothing console script; every module costs start-up CPU on every message).
PLAIN = {
    "maildrop",
    "maildrop.cli",
    "maildrop._errors",
    "maildrop._record",
    "maildrop._mda",
    "maildrop._steps",
    "maildrop._writer",
    "maildrop._unique",
    "maildrop._dirs",
    "maildrop._sys",
    "maildrop._naming",
    "__future__",
    "errno",
}
# What the options add: the quota (a maildirsize), header stamps, a folder name's encoding.
OPTIONS = {
    "maildrop._quota",
    "maildrop._quota_io",
    "maildrop._transform",
    "maildrop._folders",
    "contextlib",
    "base64",
    "binascii",
    "struct",
    "_struct",
}
# Never, with any option: the event-loop half of the engine, the servers, and stdlib modules
# that cost milliseconds each.
FORBIDDEN = {
    "asyncio",
    "anyio",
    "trio",
    "zope",
    "zope.interface",
    "logging",
    "argparse",
    "dataclasses",
    "inspect",
    "typing",
    "threading",
    "socket",
    "_socket",
    "random",
    "signal",
    "maildrop._pool",
    "maildrop._session",
    "maildrop._sources",
    "maildrop._many",
    "maildrop._maildir",
    "maildrop._cli_serve",
    "maildrop.lmtp",
}


def loaded_by(argv: list[str]) -> set[str]:
    """Run GUARD with *argv* on MSG; return the modules the delivery loaded."""
    p = subprocess.run(
        [sys.executable, "-c", GUARD, *argv],
        input=MSG, capture_output=True, timeout=60, check=False, env=ENV,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    rc, loaded = json.loads(p.stdout.decode().strip().splitlines()[-1])
    assert rc == 0, p.stderr
    return set(loaded)


def test_deliver_imports_only_its_own_path(tmp_path: Path) -> None:
    """A plain delivery loads exactly its small path: no asyncio, anyio, argparse, pool."""
    md = maildir(tmp_path / "md")  # (creating one also loads threading, for its lock)
    loaded = loaded_by(["deliver", str(md)])
    assert loaded & FORBIDDEN == set(), loaded
    assert loaded - PLAIN == set()
    assert "maildrop._mda" in loaded  # the guard did run the delivery
    assert messages(md) == [MSG]


def test_deliver_with_every_option_stays_off_the_event_loop(tmp_path: Path) -> None:
    """Quota, headers and a folder add only their own modules."""
    md = quota_maildir(tmp_path / "md", b"100000S\n0 0\n")
    maildir(md / ".Lists")  # (creating one would load threading, for its directory lock)
    argv = ["deliver", "--return-path", "s@x", "--crlf-to-lf", "--folder", "INBOX.Lists"]
    loaded = loaded_by([*argv, "--max-size", "1M", str(md)])
    assert loaded & FORBIDDEN == set()
    assert loaded - PLAIN - OPTIONS == set()
    assert {"maildrop._quota_io", "maildrop._transform"} <= loaded
    assert messages(md / ".Lists") == [b"Return-Path: <s@x>\n" + MSG]
