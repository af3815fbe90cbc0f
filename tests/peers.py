"""Real processes around ``maildrop lmtp``: the server itself, Debian's mail packages, CPU.

Shared by ``tests/test_postfix.py`` (Postfix as the server's client) and
``benchmarks/lmtp.py`` (Dovecot's LMTP server as the contender). Everything here drives the
command line only (``maildrop lmtp --listen ... --root ...``), so it runs unchanged whatever
the server's insides are.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
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
