"""The two LMTP servers of ``benchmarks/lmtp.py`` and the load generator that drives them.

Both servers run once per benchmark, each under its own directory of maildirs on the same
filesystem, and every timed run delivers to a recipient of its own whose maildir is made
just before (fresh maildirs per run, nothing deleted until the very end).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.peers import SMTP_SOURCE, free_port, maildrop_lmtp, stop, tree_cpu, wait_for_greeting

#: The unprivileged uid/gid Dovecot delivers as (it refuses uid 0); 65534 is "nobody".
MAIL_UID = 65534
DOMAIN = "bench.test"
SENDER = f"sender@{DOMAIN}"


@dataclass
class Server:
    """A running LMTP server: where it listens, its process tree, where it delivers."""

    name: str
    pid: int
    port: int
    root: Path
    uid: int

    def mailbox(self, user: str) -> Path:
        """Create and return the (empty) maildir that *user*'s mail lands in."""
        md = self.root / user
        for sub in ("", "tmp", "new", "cur"):
            (md / sub).mkdir(mode=0o700, exist_ok=True)
            os.chown(md / sub, self.uid, self.uid)
        return md

    def cpu(self) -> float:
        """Return the CPU seconds used so far by the server's whole process tree."""
        return tree_cpu(self.pid)


@contextlib.contextmanager
def maildrop_server(scratch: Path, extra: Sequence[str]) -> Iterator[Server]:
    """Run ``maildrop lmtp`` (with the *extra* flags) delivering under *scratch*/maildrop."""
    root = scratch / "maildrop"
    root.mkdir()
    with maildrop_lmtp(root, scratch / "maildrop.log", extra) as (proc, port):
        yield Server("maildrop", proc.pid, port, root, os.getuid())


@contextlib.contextmanager
def floor_server(scratch: Path, *, durable: bool = False) -> Iterator[Server]:
    """Run :mod:`benchmarks._lmtp_floor`: the exchange alone, or with raw durable stores."""
    name = "floordisk" if durable else "floor"
    root = scratch / name
    root.mkdir()
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks._lmtp_floor", str(port)]
    cmd += [str(root)] if durable else []
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, cwd=Path(__file__).parent.parent)
    try:
        wait_for_greeting(port, f"the {name} server", proc)
        yield Server(name, proc.pid, port, root, os.getuid())
    finally:
        stop(proc)


DOVECOT_CONF = """\
# Dovecot's LMTP server alone, as a contender: loopback only, its own state in {scratch}.
base_dir = {scratch}/dovecot-run
state_dir = {scratch}/dovecot-state
log_path = {scratch}/dovecot.log
protocols = lmtp
listen = 127.0.0.1
ssl = no
mail_location = maildir:{root}/%n
mail_fsync = optimized
first_valid_uid = {uid}
last_valid_uid = {uid}
passdb {{
  driver = passwd-file
  args = /dev/null
}}
userdb {{
  driver = static
  args = uid={uid} gid={uid} home={root}/%n allow_all_users=yes
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""


@contextlib.contextmanager
def dovecot_server(scratch: Path) -> Iterator[Server]:
    """Run Dovecot's LMTP server from its own config, delivering under *scratch*/dovecot."""
    root = scratch / "dovecot"
    root.mkdir()
    os.chown(root, MAIL_UID, MAIL_UID)
    port = free_port()
    conf = scratch / "dovecot.conf"
    conf.write_text(DOVECOT_CONF.format(scratch=scratch, root=root, uid=MAIL_UID, port=port))
    with open(scratch / "dovecot.out", "ab") as out:
        proc = subprocess.Popen(
            ["dovecot", "-F", "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        wait_for_greeting(port, f"dovecot (log: {scratch}/dovecot.log)", proc)
        yield Server("dovecot", proc.pid, port, root, MAIL_UID)
    finally:
        stop(proc)


@dataclass
class Run:
    """One timed run: wall seconds and the server's CPU seconds."""

    seconds: float
    cpu: float


def send(server: Server, message: Path, count: int, sessions: int, user: str) -> Run:
    """Send *count* copies of *message* to *user* over *sessions* LMTP sessions; time it.

    ``smtp-source -d`` keeps each session open for its next message, as Postfix's LMTP
    client does with its connection cache under load.
    """
    cmd = [SMTP_SOURCE, "-L", "-d", "-s", str(sessions), "-m", str(count), "-F", str(message)]
    cmd += ["-f", SENDER, "-t", f"{user}@{DOMAIN}", f"127.0.0.1:{server.port}"]
    cpu0 = server.cpu()
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, timeout=900, check=False)
    seconds = time.perf_counter() - t0
    cpu = server.cpu() - cpu0
    if done.returncode != 0:
        raise RuntimeError(
            f"{server.name}: smtp-source exited {done.returncode}: "
            f"{done.stderr.decode(errors='replace')[-500:]}"
        )
    return Run(seconds, cpu)


def _is_header_block(text: bytes) -> bool:
    """Whether *text* is empty or whole header lines (the trace headers a server adds)."""
    lines = text.split(b"\n")
    if lines.pop() != b"":
        return False
    return all(ln[:1] in (b" ", b"\t") or b":" in ln.split(b" ", 1)[0] for ln in lines)


def verify(maildir: Path, count: int, message: bytes, server: str) -> None:
    """Check that *count* messages landed in new/ (none left in tmp/) and a sample is right.

    A sampled file must be *message* (with LF line ends) after nothing but the header
    lines a server adds (Return-Path, Delivered-To, Received).
    """
    names = sorted(os.listdir(maildir / "new"))
    left = os.listdir(maildir / "tmp")
    if len(names) != count or left:
        raise RuntimeError(
            f"{server}: {len(names)} of {count} messages in {maildir}/new, {len(left)} in tmp/"
        )
    for name in {names[0], names[count // 2], names[-1]}:
        got = (maildir / "new" / name).read_bytes().replace(b"\r\n", b"\n")
        if not (got.endswith(message) and _is_header_block(got[: len(got) - len(message)])):
            raise RuntimeError(f"{server}: {maildir}/new/{name} is not the message sent")
