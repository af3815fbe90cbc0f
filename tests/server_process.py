"""``maildrop lmtp``/``smtp`` as a real process, for tests: its log read line by line.

Fault injection reaches a server process the way it reaches the engine everywhere else,
through the syscall table: :data:`STUCK_FSYNC` runs the command with an ``fsync`` entry
that blocks its worker thread for good (after creating a marker file), as a frozen
filesystem would.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from .subprocess_coverage import measured_env

PY = [sys.executable, "-m", "maildrop"]

#: ``python -c STUCK_FSYNC MARKER ARGV...``: maildrop, with every file fsync blocked forever.
STUCK_FSYNC = """
import sys, threading
from maildrop import DEFAULT_SYSCALLS
from maildrop.cli import main

def stuck_fsync(fd):
    open(sys.argv[1], "w").close()
    threading.Event().wait()

object.__setattr__(DEFAULT_SYSCALLS, "fsync", stuck_fsync)  # frozen: patch for this process
sys.exit(main(sys.argv[2:]))
"""

#: ``python -c DEAD_WORKERS EXCEPTION ARGV...``: maildrop, with workers that raise the
#: builtin EXCEPTION (e.g. ``RuntimeError``) as they start.
DEAD_WORKERS = """
import builtins, sys
from maildrop import _serve_proc
from maildrop.cli import main

def fail(*args, **kwargs):
    raise getattr(builtins, sys.argv[1])("injected start-up failure")

_serve_proc._serve_until_signal = fail
sys.exit(main(sys.argv[2:]))
"""


class ServerProcess:
    """A server process; ``lines`` collects its stderr as it comes."""

    def __init__(
        self,
        argv: list[str],
        *,
        code: str | None = None,
        pre: Sequence[str] = (),
        own_group: bool = False,
    ) -> None:
        cmd = [sys.executable, "-c", code, *pre, *argv] if code else [*PY, *argv]
        env = measured_env()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=own_group,  # a process group of its own, as a terminal's job
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        assert self.proc.stderr is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            with self._changed:
                self.lines.append(raw.decode(errors="replace"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def log(self) -> str:
        """Everything logged so far."""
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30) -> list[re.Match[str]]:
        """Wait until *count* lines match *pattern* (a regex); return their matches."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        with self._changed:
            while True:
                found = [m for line in self.lines if (m := rx.search(line))]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                assert left > 0, f"no {count} line(s) matching {pattern!r} in:\n{self.log}"
                assert self.proc.poll() is None or self._reader.is_alive(), (
                    f"exited {self.proc.returncode} without {pattern!r}:\n{self.log}"
                )
                self._changed.wait(min(left, 0.5))

    def port(self) -> int:
        """The TCP port it announced."""
        (m,) = self.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        return int(m[1])

    def worker_pids(self, count: int) -> list[int]:
        """The pids of the first *count* workers it started."""
        return [int(m[1]) for m in self.wait_for(r"started \(pid (\d+)\)", count)]

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send *sig* to the server (the supervisor, with several workers)."""
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        """Wait for it to exit; return its status."""
        status = self.proc.wait(timeout)
        self._reader.join(10)
        return status

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def gone(pid: int) -> bool:
    """Whether process *pid* has exited (a zombie nobody reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = 10) -> bool:
    """Wait until every process of *pids* has exited."""
    deadline = time.monotonic() + timeout
    while not all(gone(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
