"""Real processes around ``maildrop lmtp``: the server itself, Debian's mail packages, CPU.

Shared by ``tests/test_postfix.py`` (a private Postfix as the server's client) and
``benchmarks/lmtp.py`` (Dovecot's LMTP server as the contender). Everything here drives the
command line only (``maildrop lmtp --listen ... --root ...``), so it runs unchanged whatever
the server's insides are.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Debian packages the peers come from, and a file each one installs.
PACKAGES = {
    "postfix": "/usr/sbin/postfix",
    "dovecot-core": "/usr/sbin/dovecot",
    "dovecot-lmtpd": "/usr/lib/dovecot/lmtp",
}
SMTP_SOURCE = "/usr/sbin/smtp-source"
#: How long a server may take to answer its first connection.
START_TIMEOUT = 30.0


def missing(packages: Sequence[str]) -> list[str]:
    """Return those of *packages* (keys of :data:`PACKAGES`) that are not installed."""
    return [p for p in packages if not os.path.exists(PACKAGES[p])]


def apt_install(packages: Sequence[str]) -> str | None:
    """Install *packages* with apt-get without starting their system services.

    Returns None on success, else why not (not root, no apt-get, or apt-get's failure).
    Postfix is preseeded to "No configuration"; a temporary ``policy-rc.d`` answering 101
    keeps the packages' scripts from starting a system Postfix or Dovecot, which would
    listen on the standard ports.
    """
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "installing needs root and apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    preseed = "postfix postfix/main_mailer_type select No configuration\n"
    subprocess.run(["debconf-set-selections"], input=preseed.encode(), env=env, check=False)
    policy = Path("/usr/sbin/policy-rc.d")
    created = not policy.exists()
    if created:
        policy.write_text(
            "#!/bin/sh\n# maildrop: no services started while installing\nexit 101\n"
        )
        policy.chmod(0o755)
    try:
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
            done = subprocess.run(cmd, env=env, capture_output=True, timeout=900, check=False)
            if done.returncode != 0:
                return f"{' '.join(cmd[:2])} failed: {done.stderr.decode(errors='replace')[-300:]}"
    finally:
        if created:
            policy.unlink()
    return None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_greeting(port: int, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something on *port* greets with 220; fail at once if *proc* exits."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                if s.recv(512).startswith(b"220"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not greet on 127.0.0.1:{port} in {START_TIMEOUT} s")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM *proc*, wait at most *timeout* seconds, then SIGKILL; return its status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


@contextlib.contextmanager
def maildrop_lmtp(
    root: Path, log: Path, extra: Sequence[str] = (), port: int | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Run ``maildrop lmtp`` on 127.0.0.1 delivering under *root*; yield (process, port).

    Its stderr (one line per delivery) goes to *log*. The server is stopped on exit from the
    block whatever happened inside it.
    """
    port = free_port() if port is None else port
    cmd = [sys.executable, "-m", "maildrop", "lmtp", "--listen", f"127.0.0.1:{port}"]
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [*cmd, "--root", str(root), *extra], stdin=subprocess.DEVNULL, stderr=err
        )
    try:
        wait_for_greeting(port, f"maildrop lmtp (log: {log})", proc)
        yield proc, port
    finally:
        stop(proc)


def _stat(pid: str) -> tuple[int, float] | None:
    """Return (parent pid, CPU ticks incl. reaped children) of *pid*, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    fields = text[text.rindex(b")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return int(fields[1]), float(utime + stime + cutime + cstime)


def tree_cpu(root: int) -> float:
    """Return the CPU seconds (user + system) of *root* and all its live descendants.

    Children already reaped are in their parent's cutime/cstime; a server whose processes
    come and go (Dovecot's, or maildrop's workers) is counted whole as long as *root* lives.
    """
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _stat(p))}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats[pid][1] if pid in stats else 0.0
        todo.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.maildrop.test
mydomain = maildrop.test
mydestination =
relay_domains =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtputf8_enable = yes
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
alias_maps =
alias_database =
local_recipient_maps =
biff = no
recipient_delimiter = +
virtual_mailbox_domains = {domain}
virtual_mailbox_maps = inline:{{ {mailboxes} }}
virtual_transport = lmtp:inet:127.0.0.1:{lmtp_port}
virtual_mailbox_limit = 0
mailbox_size_limit = 0
message_size_limit = 67108864
# Bounce notices to the senders' domain are thrown away: they are not what is under test.
transport_maps = inline:{{ {discard}=discard: }}
delay_warning_time = 0
"""

MASTER_CF = """\
127.0.0.1:{smtp_port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
lmtp      unix  - - n - - lmtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


@dataclass
class Postfix:
    """A running private Postfix: its config dir, smtpd port and maillog."""

    config: Path
    smtp_port: int
    maillog: Path

    def log(self) -> str:
        """Return the maillog so far ('' before Postfix wrote it)."""
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""


def _postfix(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the ``postfix`` command on the private instance (bounded)."""
    return subprocess.run(
        ["postfix", "-c", str(config), *args], capture_output=True, timeout=60, check=False
    )


def _master_pid(d: Path) -> int | None:
    """Return the pid of the private Postfix's master, None if it has not written one."""
    try:
        return int((d / "queue" / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_postfix(d: Path, config: Path) -> None:
    """Stop the private Postfix, and kill its master if it has not gone in 30 s."""
    pid = _master_pid(d)
    _postfix(config, "stop")
    deadline = time.monotonic() + 30
    while pid is not None and time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    if pid is not None and Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def postfix(
    d: Path, lmtp_port: int, domain: str, mailboxes: Sequence[str], discard: str
) -> Iterator[Postfix]:
    """Run a private Postfix under *d*; stop it on exit from the block whatever happened.

    It accepts mail for *mailboxes* (addresses) in the virtual *domain* on its smtpd at
    127.0.0.1 and hands it to ``lmtp:inet:127.0.0.1:``*lmtp_port*; mail to the domain
    *discard* (the senders' bounce notices) is discarded.
    """
    config = d / "etc"
    config.mkdir()
    smtp_port = free_port()
    table = ", ".join(f"{m}=x" for m in mailboxes)
    (config / "main.cf").write_text(
        MAIN_CF.format(d=d, domain=domain, mailboxes=table, lmtp_port=lmtp_port, discard=discard)
    )
    (config / "master.cf").write_text(MASTER_CF.format(smtp_port=smtp_port))
    pf = Postfix(config, smtp_port, d / "maillog")
    # Postfix creates its queue's subdirectories itself, not the queue and data directories.
    (d / "queue").mkdir(mode=0o755)
    (d / "data").mkdir(mode=0o700)
    shutil.chown(d / "data", "postfix", "postfix")
    try:
        started = _postfix(config, "start")
        if started.returncode != 0:
            raise RuntimeError(f"postfix start failed: {started.stderr!r}\n{pf.log()[-2000:]}")
        if _master_pid(d) is None:
            raise RuntimeError(f"no master.pid after postfix start\n{pf.log()[-2000:]}")
        yield pf
    finally:
        _stop_postfix(d, config)
