"""The server process: start-up failures, Unix socket takeover, and the second signal."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from maildrop import _pool, _serve_proc, cli

from .conftest import listing
from .crash._harness import loop_fs
from .lmtp_client import Client, wire
from .server_process import STUCK_FSYNC, ServerProcess, wait_gone

MSG = b"From: s@example.org\nSubject: hi\n\nbody\n"


def serve(
    sock: Path, root: Path, workers: int, *, code: str | None = None, pre: tuple[str, ...] = ()
) -> ServerProcess:
    """Start ``maildrop lmtp`` with *workers* on the Unix socket *sock*."""
    argv = ["lmtp", "--listen", f"unix:{sock}", "--root", str(root), "--workers", str(workers)]
    return ServerProcess(argv, code=code, pre=pre)


def deliver_one(sock: Path) -> str:
    """Deliver one message to alice over *sock*; return the reply."""

    async def run() -> str:
        c = await Client.connect(str(sock))
        (reply,) = (await c.send("s@x", ["alice@x"], MSG)).data
        await c.quit()
        return reply

    return asyncio.run(run())


@pytest.mark.parametrize("workers", [1, 2])
def test_takeover_of_a_live_socket_is_refused(tmp_path: Path, workers: int) -> None:
    """A second server on a live server's socket exits non-zero; the first keeps serving."""
    (tmp_path / "alice").mkdir()
    sock = tmp_path / "lmtp.sock"
    with serve(sock, tmp_path, workers) as first:
        first.wait_for("listening on unix:")
        inode = sock.lstat().st_ino
        with serve(sock, tmp_path, workers) as second:
            assert second.wait() == 75
        assert f"cannot listen on unix:{sock}: another server is listening" in second.log
        assert "Traceback" not in second.log
        assert sock.lstat().st_ino == inode
        assert deliver_one(sock).startswith("250")
        first.signal()
        assert first.wait() == 0
    assert not sock.exists()
    assert len(os.listdir(tmp_path / "alice" / "new")) == 1


def test_stale_socket_is_replaced_by_a_new_server(tmp_path: Path) -> None:
    """A socket left by a killed server is replaced; a regular file there is refused."""
    (tmp_path / "alice").mkdir()
    sock = tmp_path / "lmtp.sock"
    with serve(sock, tmp_path, 1) as dead:
        dead.wait_for("listening on unix:")
        dead.signal(signal.SIGKILL)
        dead.wait()
    assert sock.exists()
    with serve(sock, tmp_path, 1) as server:
        server.wait_for("listening on unix:")
        assert deliver_one(sock).startswith("250")
        server.signal()
        assert server.wait() == 0
    assert not sock.exists()
    sock.write_text("not a socket")
    with serve(sock, tmp_path, 2) as refused:
        assert refused.wait() == 75
    assert "is not a socket (refusing to replace it" in refused.log
    assert sock.read_text() == "not a socket"


def test_missing_socket_directory_is_named(tmp_path: Path) -> None:
    """--listen unix:/missing/dir/lmtp: one line naming the path, exit 75, nothing created."""
    (tmp_path / "root").mkdir()
    with serve(tmp_path / "run" / "maildrop" / "lmtp", tmp_path / "root", 2) as server:
        assert server.wait() == 75
    (line,) = server.log.splitlines()
    assert f"unix:{tmp_path}/run/maildrop/lmtp: directory {tmp_path}/run/maildrop does" in line
    assert os.listdir(tmp_path) == ["root"]


def test_socket_of_a_successor_survives_the_exit(tmp_path: Path) -> None:
    """A server whose socket was replaced (e.g. by hand) leaves the new one on exit."""
    (tmp_path / "alice").mkdir()
    sock = tmp_path / "lmtp.sock"
    with serve(sock, tmp_path, 2) as server:
        server.wait_for("listening on unix:")
        sock.unlink()
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(sock))
        other.listen()
        try:
            server.signal()
            assert server.wait() == 0
            assert sock.exists()
        finally:
            other.close()


def stuck_then_signalled_twice(
    server: ServerProcess, sock: Path, stuck: Callable[[], bool]
) -> tuple[socket.socket, float]:
    """Send a message over *sock*; once *stuck()* says its delivery is blocked, SIGTERM the
    server, check that it waits for the delivery, SIGTERM it again. Return the client's
    socket and when the second signal was sent."""
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(sock))
    client.sendall(b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<alice@x>\r\nDATA\r\n" + wire(MSG))
    deadline = time.monotonic() + 20
    while not stuck():
        assert time.monotonic() < deadline, server.log
        time.sleep(0.01)
    server.signal()
    server.wait_for("finishing deliveries in flight")
    time.sleep(0.3)
    assert server.proc.poll() is None, "the graceful stop did not wait for the delivery"
    server.signal()
    return client, time.monotonic()


@pytest.mark.parametrize("workers", [1, 2])
def test_second_sigterm_exits_130_at_once_while_a_worker_is_stuck(
    tmp_path: Path, workers: int
) -> None:
    """A delivery's worker thread blocked in fsync for good: SIGTERM waits for it, a second
    SIGTERM exits 130 within 5 s, removes the socket and leaves nothing in new/."""
    (tmp_path / "alice").mkdir()
    sock, marker = tmp_path / "lmtp.sock", tmp_path / "fsync-entered"
    with serve(sock, tmp_path, workers, code=STUCK_FSYNC, pre=(str(marker),)) as server:
        server.wait_for("listening on unix:")
        pids = server.worker_pids(workers) if workers > 1 else []
        client, started = stuck_then_signalled_twice(server, sock, marker.exists)
        status = server.wait(30)
        took = time.monotonic() - started
        client.close()
    assert status == 130, server.log
    assert took < 5, f"exit took {took:.1f}s after the second signal"
    assert "second signal" in server.log
    assert not sock.exists()
    assert listing(tmp_path / "alice")["new"] == []
    assert wait_gone(pids)


def stuck_in_kernel(pids: list[int]) -> bool:
    """Whether a thread of one of *pids* sleeps uninterruptibly (state D)."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:  # the thread just ended
                continue
            if state == "D":
                return True
    return False


@pytest.mark.parametrize("workers", [1, 2])
def test_second_sigterm_with_a_frozen_filesystem(tmp_path: Path, workers: int) -> None:
    """A delivery blocked in the kernel by fsfreeze: the second SIGTERM removes the socket and
    stops serving at once (a supervisor exits 130 at once); the stuck process exits 130 at
    the thaw, and nothing reaches new/."""
    if os.geteuid() != 0 or shutil.which("fsfreeze") is None:
        pytest.skip("needs root and fsfreeze (util-linux) to freeze a loop-mounted filesystem")
    sock = tmp_path / "lmtp.sock"
    with loop_fs(tmp_path, "ext4") as (_, mnt, _):
        (mnt / "alice").mkdir()
        with serve(sock, mnt, workers) as server:
            server.wait_for("listening on unix:")
            pids = server.worker_pids(workers) if workers > 1 else [server.proc.pid]
            subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)
            try:
                client, started = stuck_then_signalled_twice(
                    server, sock, lambda: stuck_in_kernel(pids)
                )
                if workers > 1:
                    assert server.wait(10) == 130, server.log
                while sock.exists():
                    assert time.monotonic() - started < 5, server.log
                    time.sleep(0.01)
                with (
                    socket.socket(socket.AF_UNIX) as late,
                    pytest.raises(FileNotFoundError, match="No such file or directory"),
                ):
                    late.connect(str(sock))
                client.close()
            finally:
                subprocess.run(["fsfreeze", "-u", str(mnt)], check=True)
            assert server.wait(30) == 130, server.log
            assert wait_gone(pids)
        assert listing(mnt / "alice")["new"] == []


# -- in process, for what a subprocess would hide ------------------------------------------


def test_run_server_alone_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--workers 1 serves in this process: announced once, SIGTERM exits 0, socket removed;
    while it serves, the worker pool starts the server's few core threads (then the
    library's default again)."""
    (tmp_path / "alice").mkdir()
    sock = tmp_path / "lmtp.sock"
    argv = ["lmtp", "--listen", f"unix:{sock}", "--root", str(tmp_path), "--workers", "1"]
    result: list[str] = []
    cores: list[int] = []

    def client() -> None:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        cores.append(_pool.CORE_THREADS)
        result.append(deliver_one(sock))
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=client)
    t.start()
    try:
        assert cli.main(argv) == 0
    finally:
        t.join(30)
    assert result[0].startswith("250")
    err = capsys.readouterr().err
    assert err.count("listening on") == 1
    assert not sock.exists()
    assert cores == [_pool.SERVER_CORE_THREADS]
    assert _pool.CORE_THREADS == _pool.THREADS


def test_hard_stop_removes_sockets_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hard stop closes the listeners (removing their sockets), then exits 130."""
    from maildrop._listen import bind

    listeners = bind(f"unix:{tmp_path}/lmtp.sock")
    exits: list[int] = []
    monkeypatch.setattr(_serve_proc, "HARD_STOP_SECONDS", 0)
    monkeypatch.setattr(_serve_proc.os, "_exit", exits.append)
    _serve_proc._HardStop(listeners)._run()
    assert exits == [130]
    assert os.listdir(tmp_path) == []


def test_a_bad_second_address_unbinds_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--listen unix:A --listen nonsense: usage error (64) and A's socket is gone again."""
    argv = ["lmtp", "--listen", f"unix:{tmp_path}/a.sock", "--listen", "nonsense"]
    assert cli.main([*argv, "--root", str(tmp_path), "--workers", "1"]) == 64
    assert "HOST:PORT" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_bad_worker_count_is_usage(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--workers 0 or a non-number: one-line usage error, 64."""
    for bad in ("0", "two", "-1"):
        argv = ["lmtp", "--listen", "127.0.0.1:0", "--root", str(tmp_path), "--workers", bad]
        assert cli.main(argv) == 64
        assert "invalid worker count" in capsys.readouterr().err


def sockets_of(pid: int) -> int:
    """How many sockets process *pid* holds open."""
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))


def test_workers_share_a_burst_of_connections_evenly(tmp_path: Path) -> None:
    """Eight clients connecting at once end up four per worker, not all in the first one."""
    sock = tmp_path / "lmtp.sock"
    with serve(sock, tmp_path, 2) as server:
        server.wait_for("listening on unix:")
        pids = server.worker_pids(2)
        before = [sockets_of(pid) for pid in pids]
        clients = []
        for _ in range(8):
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(sock))
            clients.append(client)
        for client in clients:
            assert client.recv(512).startswith(b"220 ")
        held = [sockets_of(pid) - b for pid, b in zip(pids, before, strict=True)]
        for client in clients:
            client.close()
        server.signal()
        assert server.wait() == 0
    assert held == [4, 4]
