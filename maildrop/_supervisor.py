"""Run N worker processes on the listening sockets their parent bound; restart and stop them.

Why fork: the parent binds every socket, then forks the workers while it has no thread and no
event loop (it never starts either). Each child inherits the listening sockets and every
module already imported, and a restart is one ``fork()``. Spawning fresh interpreters would
cost each worker, and each restart, a whole interpreter start-up and import, and would need
the sockets passed explicitly. The workers share one accept queue per socket (not
``SO_REUSEPORT``, which gives each process its own queue): Unix sockets work as TCP does, and
a worker that dies takes no queued connection with it. Which worker takes the next
connection is the workers' business (``_accept.Share``: the least loaded); the supervisor
only tells them, through *on_exit*, which slot lost its worker.

Signals: SIGTERM or SIGINT to the parent stops the workers gracefully (each gets SIGTERM; a
worker treats every SIGTERM/SIGINT as the same graceful stop, so a Ctrl-C that reaches the
whole process group is still one stop); a second signal to the parent kills them (SIGKILL)
and the parent exits 130 at once, whatever a worker is blocked in. A worker also stops
gracefully when its parent is gone: it watches the read end of a "lifeline" pipe whose only
writer is the parent, which reads as end-of-file once the parent has exited.

:class:`Supervision` holds the decisions (which worker slot to start when, the restart
backoff, when to give up) without any I/O; :func:`supervise` is the thin loop around it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ._log import flush_all

__all__ = [
    "Death",
    "Supervision",
    "Worker",
    "WorkerSide",
    "cpu_count",
    "default_workers",
    "restart_delay",
    "supervise",
]

log = logging.getLogger("maildrop")

EX_UNAVAILABLE = 69
#: Workers that die before they are ready, in a row, before the supervisor gives up.
MAX_START_FAILURES = 5
#: The first restart delay of a worker that died soon after it started; doubled each time.
BASE_DELAY = 0.1
#: The longest restart delay.
MAX_DELAY = 5.0
#: A worker that lived this long is restarted at once, and its slot's backoff starts over.
STABLE_SECONDS = 10.0

_PID = struct.Struct("=i")
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_HANDLED = (*_STOP_SIGNALS, signal.SIGCHLD)


def restart_delay(streak: int, base: float = BASE_DELAY, cap: float = MAX_DELAY) -> float:
    """Return how long to wait before restarting a slot whose workers died *streak* times
    in a row soon after starting (0 for a worker that had been running for a while)."""
    if streak <= 0:
        return 0.0
    return min(cap, base * 2.0 ** min(streak - 1, 64))


@dataclass
class Worker:
    """One worker process, as the supervisor knows it."""

    slot: int
    pid: int
    started: float
    ready: bool = False


@dataclass(frozen=True)
class Death:
    """What the supervisor decided about a worker that exited."""

    worker: Worker
    #: Seconds until its slot is started again; None when it is not restarted.
    restart_in: float | None
    #: Whether workers keep dying at start and the supervisor gives up.
    give_up: bool


class Supervision:
    """The supervisor's bookkeeping and decisions; no I/O, the caller passes the clock.

    Every slot has either a live worker or a pending start time, until :meth:`stop`.
    """

    def __init__(
        self,
        count: int,
        now: float,
        *,
        max_start_failures: int = MAX_START_FAILURES,
        base_delay: float = BASE_DELAY,
        max_delay: float = MAX_DELAY,
        stable: float = STABLE_SECONDS,
    ) -> None:
        if count < 1:
            raise ValueError(f"workers must be at least 1, not {count}")
        self.count = count
        self.max_start_failures = max_start_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.stable = stable
        self.pending: dict[int, float] = dict.fromkeys(range(count), now)
        self.workers: dict[int, Worker] = {}
        self.streaks = [0] * count
        self.start_failures = 0  # workers that died before ready, in a row
        self.stopping = False

    def due(self, now: float) -> list[int]:
        """Return (and forget) the slots whose start time has come."""
        slots = sorted(s for s, at in self.pending.items() if at <= now)
        for s in slots:
            del self.pending[s]
        return slots

    def started(self, slot: int, pid: int, now: float) -> Worker:
        """Record that *slot*'s worker was started as *pid*."""
        worker = self.workers[pid] = Worker(slot, pid, now)
        return worker

    def ready(self, pid: int) -> Worker | None:
        """Record that *pid* is serving; return its worker the first time, else None."""
        worker = self.workers.get(pid)
        if worker is None or worker.ready:
            return None
        worker.ready = True
        self.start_failures = 0
        return worker

    def exited(self, pid: int, now: float) -> Death | None:
        """Record that *pid* exited and decide about its slot (None: not one of ours)."""
        worker = self.workers.pop(pid, None)
        if worker is None:
            return None
        if self.stopping:
            return Death(worker, None, False)
        if not worker.ready:
            self.start_failures += 1
            if self.start_failures >= self.max_start_failures:
                self.stop()
                return Death(worker, None, True)
        quick = now - worker.started < self.stable
        streak = self.streaks[worker.slot] = self.streaks[worker.slot] + 1 if quick else 0
        delay = restart_delay(streak, self.base_delay, self.max_delay)
        self.pending[worker.slot] = now + delay
        return Death(worker, delay, False)

    def stop(self) -> None:
        """Start no more workers."""
        self.stopping = True
        self.pending.clear()

    @property
    def all_ready(self) -> bool:
        """Whether every slot has a worker that is serving."""
        return not self.pending and all(w.ready for w in self.workers.values())

    @property
    def done(self) -> bool:
        """Whether the supervisor has stopped and every worker has exited."""
        return self.stopping and not self.workers

    def next_start(self) -> float | None:
        """When the next pending slot is due, if any."""
        return min(self.pending.values(), default=None)


@dataclass(frozen=True)
class WorkerSide:
    """What a worker process gets from its supervisor."""

    #: Tell the supervisor this worker is serving (call once, when it accepts connections).
    ready: Callable[[], None]
    #: A file descriptor that becomes readable (end of file) once the supervisor is gone.
    lifeline: int
    #: Which of the supervisor's slots (0 to count - 1) this worker fills.
    slot: int = 0


def supervise(
    count: int,
    run_worker: Callable[[WorkerSide], int],
    on_ready: Callable[[], None],
    on_exit: Callable[[int], None] = lambda slot: None,
) -> int:
    """Run *count* forked workers, each ``run_worker(side)``, until a signal stops them.

    Must be called from the main thread of a process with no other thread and no event loop.
    *on_ready* is called once, when every first worker is serving; *on_exit* with a worker's
    slot each time a worker has exited. Returns 0 after a
    graceful stop, 130 after a second signal, non-zero when workers keep dying at start.

    Raises:
        RuntimeError: another thread is running (a forked child would inherit its locks,
            possibly held, without the thread that would release them).
    """
    if threading.active_count() > 1:
        raise RuntimeError(
            "supervise() must run before any other thread starts: "
            f"{threading.active_count() - 1} other thread(s) are running"
        )
    ready_r, ready_w = os.pipe()
    life_r, life_w = os.pipe()
    wake_r, wake_w = os.pipe()
    for fd in (ready_r, wake_r, wake_w):
        os.set_blocking(fd, False)
    parent_only = (ready_r, life_w, wake_r, wake_w)

    def fork(slot: int) -> int:
        # Signals stay blocked until the child has dropped the parent's handlers: until then a
        # SIGTERM for the child would be written to the wakeup pipe it shares with the parent.
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
            if pid == 0:
                side = WorkerSide(lambda: _tell_ready(ready_w), life_r, slot)
                _child(run_worker, side, parent_only)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
        return pid

    saved = {sig: signal.signal(sig, _wake_only) for sig in _HANDLED}
    saved_wakeup = signal.set_wakeup_fd(wake_w)
    plan = Supervision(count, time.monotonic())
    try:
        return _loop(plan, fork, ready_r, wake_r, on_ready, on_exit)
    finally:
        signal.set_wakeup_fd(saved_wakeup)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for fd in (ready_r, ready_w, life_r, life_w, wake_r, wake_w):
            os.close(fd)  # the lifeline closes here: workers still running stop gracefully


def _loop(
    plan: Supervision,
    fork: Callable[[int], int],
    ready_r: int,
    wake_r: int,
    on_ready: Callable[[], None],
    on_exit: Callable[[int], None],
) -> int:
    status = 0
    announced = False
    poller = select.poll()
    for fd in (ready_r, wake_r):
        poller.register(fd, select.POLLIN)
    while not plan.done:
        now = time.monotonic()
        for slot in plan.due(now):
            pid = fork(slot)
            plan.started(slot, pid, now)
            log.info("worker %d started (pid %d)", slot + 1, pid)
        at = plan.next_start()
        poller.poll(None if at is None else max(0, int((at - time.monotonic()) * 1000) + 1))
        for pid in _read_pids(ready_r):
            if plan.ready(pid) is not None and not announced and plan.all_ready:
                announced = True
                on_ready()
        for signum in _read_signals(wake_r):
            if signum not in _STOP_SIGNALS:
                continue
            if plan.stopping:
                log.warning("second signal: killing %d worker(s) now", len(plan.workers))
                _signal_all(plan, signal.SIGKILL)
                return 130
            log.info("stopping %d worker(s): finishing deliveries in flight", len(plan.workers))
            plan.stop()
            _signal_all(plan, signal.SIGTERM)
        status = _reap(plan, status, on_exit)
    log.info("all workers stopped")
    return status


def _reap(plan: Supervision, status: int, on_exit: Callable[[int], None]) -> int:
    """Collect every exited worker, log it and decide about its slot; return the status."""
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        death = plan.exited(pid, time.monotonic())
        if death is None:  # pragma: no cover - only our workers are our children
            continue
        how = _how(wait_status)
        w = death.worker
        on_exit(w.slot)
        name = f"worker {w.slot + 1} (pid {w.pid})"
        if death.give_up:
            log.error(
                "%s %s before it was ready; workers keep dying at start (%d in a row): giving up",
                name,
                how,
                plan.max_start_failures,
            )
            code = os.waitstatus_to_exitcode(wait_status)
            status = code if code > 0 else EX_UNAVAILABLE
            _signal_all(plan, signal.SIGTERM)
        elif death.restart_in is not None:
            when = "before it was ready" if not w.ready else "while serving"
            log.error("%s %s %s; restarting it in %.1fs", name, how, when, death.restart_in)
        elif wait_status != 0:
            log.warning("%s %s while stopping", name, how)


def _how(wait_status: int) -> str:
    code = os.waitstatus_to_exitcode(wait_status)
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _signal_all(plan: Supervision, sig: int) -> None:
    for pid in plan.workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wake_only(signum: int, frame: object) -> None:
    """A Python-level handler, so the C handler writes *signum* to the wakeup fd."""


def _read_signals(fd: int) -> bytes:
    out = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 512):
            out += chunk
    return out


def _read_pids(fd: int) -> list[int]:
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 4096):  # a multiple of the record size: never splits one
            data += chunk
    return [pid for (pid,) in _PID.iter_unpack(data)]


def _tell_ready(fd: int) -> None:
    os.write(fd, _PID.pack(os.getpid()))  # one write of 4 bytes: atomic on a pipe


def _child(
    run_worker: Callable[[WorkerSide], int], side: WorkerSide, parent_only: tuple[int, ...]
) -> None:
    status = 70  # EX_SOFTWARE, unless run_worker returns
    try:
        signal.set_wakeup_fd(-1)
        for sig in _HANDLED:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
        for fd in parent_only:
            os.close(fd)
        status = run_worker(side)
    except BaseException:
        log.critical("worker (pid %d) crashed", os.getpid(), exc_info=True)
    finally:
        flush_all()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)


def cpu_count() -> int:
    """Return how many CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return os.cpu_count() or 1


def default_workers() -> int:
    """Return the default number of worker processes: two per CPU this process may use.

    A delivery spends most of its time waiting for fsyncs, not on a CPU: a second process
    per CPU serves its connections while the other's deliveries wait, for no more CPU per
    message (``benchmarks/README.md``).
    """
    return 2 * cpu_count()
