"""Worker processes: the supervision rules (pure) and real ``--workers N`` servers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from maildrop._supervisor import (
    MAX_DELAY,
    Supervision,
    default_workers,
    restart_delay,
    supervise,
)

from .lmtp_client import Client
from .server_process import DEAD_WORKERS, ServerProcess, wait_gone

MSG = b"From: s@example.org\nSubject: hi\n\nbody\n"

# -- the rules ------------------------------------------------------------------------------


def test_two_workers_per_usable_cpu_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default --workers counts the CPUs this process may run on, twice."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})
    assert default_workers() == 6


@given(st.integers(-5, 10_000))
def test_restart_delay_grows_and_is_capped(streak: int) -> None:
    """No delay after a worker that ran a while; then doubling, never above MAX_DELAY."""
    delay = restart_delay(streak)
    assert 0 <= delay <= MAX_DELAY
    assert (delay == 0) == (streak <= 0)
    assert restart_delay(streak + 1) >= delay


def test_supervision_needs_a_worker() -> None:
    """Zero workers is refused with a clear error."""
    with pytest.raises(ValueError, match="at least 1"):
        Supervision(0, 0.0)


def test_supervise_refuses_to_fork_with_threads_running() -> None:
    """With another thread running, supervise() raises before it forks anything."""
    release = threading.Event()
    t = threading.Thread(target=release.wait)
    t.start()
    calls: list[object] = []
    try:
        with pytest.raises(RuntimeError, match="before any other thread starts"):
            supervise(2, calls.append, lambda: calls.append("ready"))
    finally:
        release.set()
        t.join()
    assert calls == []


class SupervisionMachine(RuleBasedStateMachine):
    """Random starts, readiness, deaths and stops keep every slot accounted for."""

    SLOTS = 3
    GIVE_UP = 4

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.plan = Supervision(
            self.SLOTS, self.now, max_start_failures=self.GIVE_UP, max_delay=1.0, stable=5.0
        )
        self.pid = 100
        self.dead_before_ready = 0

    @rule()
    def start_due(self) -> None:
        at = self.plan.next_start()
        if at is None:
            return
        self.now = max(self.now, at)
        for slot in self.plan.due(self.now):
            self.pid += 1
            assert self.plan.started(slot, self.pid, self.now).slot == slot

    @rule(data=st.data())
    def ready(self, data: st.DataObject) -> None:
        if not self.plan.workers:
            return
        pid = data.draw(st.sampled_from(sorted(self.plan.workers)))
        first = not self.plan.workers[pid].ready
        assert (self.plan.ready(pid) is not None) == first
        if first:
            self.dead_before_ready = 0

    @rule(data=st.data(), lived=st.floats(0, 20))
    def dies(self, data: st.DataObject, lived: float) -> None:
        if not self.plan.workers:
            return
        pid = data.draw(st.sampled_from(sorted(self.plan.workers)))
        worker = self.plan.workers[pid]
        stopping = self.plan.stopping
        self.now += lived
        death = self.plan.exited(pid, self.now)
        assert death is not None
        assert death.worker is worker
        if stopping:
            assert death.restart_in is None
            assert not death.give_up
            return
        if not worker.ready:
            self.dead_before_ready += 1
        if self.dead_before_ready >= self.GIVE_UP:
            assert death.give_up
            assert self.plan.stopping
            return
        assert not death.give_up
        assert death.restart_in is not None
        assert 0 <= death.restart_in <= 1.0
        assert self.plan.pending[worker.slot] == self.now + death.restart_in
        if self.now - worker.started >= 5.0:
            assert death.restart_in == 0

    @rule()
    def stranger_dies(self) -> None:
        assert self.plan.exited(1, self.now) is None

    @rule()
    def stop(self) -> None:
        self.plan.stop()

    @invariant()
    def every_slot_has_a_worker_or_a_start_time(self) -> None:
        alive = [w.slot for w in self.plan.workers.values()]
        assert len(alive) == len(set(alive))
        if self.plan.stopping:
            assert not self.plan.pending
        else:
            assert sorted(alive + list(self.plan.pending)) == list(range(self.SLOTS))
        assert self.plan.done == (self.plan.stopping and not self.plan.workers)
        if self.plan.all_ready:
            assert all(w.ready for w in self.plan.workers.values())


test_supervision_rules = SupervisionMachine.TestCase


# -- real workers -----------------------------------------------------------------------------


def serve_workers(root: Path, listen: str, *extra: str) -> ServerProcess:
    """Start ``maildrop lmtp --workers 2`` on *listen* for the maildirs under *root*."""
    argv = ["lmtp", "--listen", listen, "--root", str(root), "--workers", "2", *extra]
    return ServerProcess(argv)


def deliver(where: int | str, count: int = 1) -> list[str]:
    """Deliver *count* messages to alice, one connection each; return the replies."""

    async def run() -> list[str]:
        replies = []
        for _ in range(count):
            c = await Client.connect(where)
            replies += (await c.send("s@x", ["alice@x"], MSG)).data
            await c.quit()
        return replies

    return asyncio.run(run())


def pids_in_names(md: Path) -> set[int]:
    """The pids in the names of the messages in *md*/new/."""
    return {int(re.search(r"P(\d+)Q", name)[1]) for name in os.listdir(md / "new")}  # type: ignore[index]


def deliver_until_served_by(port: int, md: Path, pids: set[int], most: int = 400) -> None:
    """Deliver one message at a time until messages were written by each of *pids* (a
    worker that is still starting, e.g. under coverage, gets up to ~20 s to take one)."""
    for _ in range(most):
        replies = deliver(port)
        assert [r[:3] for r in replies] == ["250"], replies
        if pids <= pids_in_names(md):
            return
        time.sleep(0.05)
    raise AssertionError(f"{most} messages, none written by {pids - pids_in_names(md)}")


def test_two_workers_both_serve_with_unique_names(tmp_path: Path) -> None:
    """--workers 2: both processes deliver; every name is unique and carries its pid."""
    (tmp_path / "alice").mkdir()
    with serve_workers(tmp_path, "127.0.0.1:0", "--no-fsync") as server:
        workers = set(server.worker_pids(2))
        port = server.port()
        assert "(2 workers)" in server.log
        deliver_until_served_by(port, tmp_path / "alice", workers)
        deliver(port, 10)
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    names = os.listdir(tmp_path / "alice" / "new")
    assert len(names) == len(set(names)) >= 12
    assert pids_in_names(tmp_path / "alice") == workers
    assert len(re.findall(r"maildrop\[\d+\]: stopped\n", server.log)) == 2  # each worker
    assert wait_gone(list(workers))


def test_ctrl_c_to_the_whole_group_is_one_graceful_stop(tmp_path: Path) -> None:
    """SIGINT to every process of the group (a terminal's Ctrl-C): one stop, exit 0."""
    (tmp_path / "alice").mkdir()
    argv = ["lmtp", "--listen", "127.0.0.1:0", "--root", str(tmp_path), "--workers", "2"]
    with ServerProcess(argv, own_group=True) as server:
        workers = server.worker_pids(2)
        port = server.port()
        assert [r[:3] for r in deliver(port)] == ["250"]
        os.killpg(server.proc.pid, signal.SIGINT)
        assert server.wait() == 0, server.log
    assert "second signal" not in server.log
    assert len(re.findall(r"maildrop\[\d+\]: stopped\n", server.log)) == 2
    assert "all workers stopped" in server.log
    assert wait_gone(workers)


def test_killed_worker_is_restarted(tmp_path: Path) -> None:
    """A worker killed with SIGKILL is replaced, and the replacement serves."""
    (tmp_path / "alice").mkdir()
    with serve_workers(tmp_path, "127.0.0.1:0", "--no-fsync") as server:
        first, second = server.worker_pids(2)
        port = server.port()
        os.kill(first, signal.SIGKILL)
        server.wait_for(rf"worker 1 \(pid {first}\) was killed by SIGKILL while serving")
        replacement = server.worker_pids(3)[2]
        assert replacement not in (first, second)
        deliver_until_served_by(port, tmp_path / "alice", {replacement})
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    assert wait_gone([second, replacement])


def test_sigterm_lets_workers_finish_a_message(tmp_path: Path) -> None:
    """SIGTERM to the supervisor: a message in the middle of DATA is still delivered."""
    (tmp_path / "alice").mkdir()
    sock = tmp_path / "lmtp.sock"

    async def run(server: ServerProcess) -> list[str]:
        c = await Client.connect(str(sock))
        assert (await c.command("MAIL FROM:<s@x>")).startswith("250")
        assert (await c.command("RCPT TO:<alice@x>")).startswith("250")
        assert (await c.command("DATA")).startswith("354")
        c.writer.write(b"Subject: slow\r\n")
        await c.writer.drain()
        server.signal(signal.SIGTERM)
        await asyncio.to_thread(server.wait_for, "stopping 2 worker")
        await asyncio.sleep(0.2)
        assert server.proc.poll() is None
        c.writer.write(b"\r\nbody\r\n.\r\n")
        reply = await c.reply()
        await c.close()
        return [reply]

    with serve_workers(tmp_path, f"unix:{sock}") as server:
        server.worker_pids(2)
        server.wait_for("listening on unix:")
        (reply,) = asyncio.run(run(server))
        assert reply.startswith("250"), reply
        assert server.wait() == 0
    assert len(os.listdir(tmp_path / "alice" / "new")) == 1
    assert not sock.exists()


@pytest.mark.parametrize(
    ("error", "status", "says"),
    [
        ("RuntimeError", 75, "cannot serve: injected start-up failure"),
        ("KeyboardInterrupt", 70, "crashed"),
    ],
)
def test_workers_dying_at_start_give_up(
    tmp_path: Path, error: str, status: int, says: str
) -> None:
    """Workers that keep failing as they start: the supervisor gives up, non-zero, clearly."""
    sock = tmp_path / "lmtp.sock"
    argv = ["lmtp", "--listen", f"unix:{sock}", "--root", str(tmp_path), "--workers", "2"]
    with ServerProcess(argv, code=DEAD_WORKERS, pre=(error,)) as server:
        started = time.monotonic()
        assert server.wait(60) == status, server.log
    assert says in server.log
    assert "workers keep dying at start (5 in a row): giving up" in server.log
    assert "restarting it in 0.1s" in server.log
    assert "restarting it in 0.2s" in server.log
    assert "listening on" not in server.log
    assert "second signal" not in server.log
    assert time.monotonic() - started < 30
    assert not sock.exists()


def test_workers_stop_when_the_supervisor_is_gone(tmp_path: Path) -> None:
    """Kill the supervisor with SIGKILL: its workers notice and stop by themselves."""
    (tmp_path / "alice").mkdir()
    with serve_workers(tmp_path, "127.0.0.1:0", "--no-fsync") as server:
        workers = server.worker_pids(2)
        server.port()
        server.signal(signal.SIGKILL)
        server.wait()
        assert wait_gone(workers), server.log
    assert server.log.count("the supervisor is gone: stopping") == 2
    assert len(re.findall(r"maildrop\[\d+\]: stopped\n", server.log)) == 2
