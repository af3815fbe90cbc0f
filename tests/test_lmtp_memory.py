"""The server's memory stays flat and its loop responsive, whatever the message's size or
shape (measured in a server child process: peak RSS and a ticker on its event loop)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .test_lmtp import messages

pytestmark = pytest.mark.slow

MiB = 1 << 20

SERVER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from maildrop.lmtp import MaildirHandler, MaildirServer

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))

    def reset_peak():
        # Linux >= 4.0: writing 5 resets the peak RSS (VmHWM) to the current RSS.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    async def main():
        handler = MaildirHandler(sys.argv[1], fsync=False, max_size=int(sys.argv[2]))
        server = MaildirServer(handler, hostname="mx.test")
        (address,) = await server.listen("127.0.0.1:0")
        loop = asyncio.get_running_loop()
        worst = {"wall": 0.0, "cpu": 0.0}

        async def ticker():
            # The wall gap includes the VM's scheduler; the loop thread's CPU time between
            # two ticks is what our own code blocked it for.
            while True:
                t, c = time.monotonic(), time.thread_time()
                await asyncio.sleep(0.002)
                worst["wall"] = max(worst["wall"], time.monotonic() - t - 0.002)
                worst["cpu"] = max(worst["cpu"], time.thread_time() - c)

        tick = loop.create_task(ticker())
        print(address.rsplit(":", 1)[1], flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # warmed up
        reset_peak()
        before = status("VmRSS")
        worst["wall"] = worst["cpu"] = 0.0
        await loop.run_in_executor(None, sys.stdin.readline)  # done
        print(json.dumps({"growth_mib": (status("VmHWM") - before) / 1024,
                          "stall_ms": worst["cpu"] * 1000,
                          "wall_stall_ms": worst["wall"] * 1000}), flush=True)
        tick.cancel()
        await server.shutdown(1)

    asyncio.run(main())
    """
)


@contextmanager
def server_child(root: Path, max_size: int) -> Iterator[tuple[int, Callable[[], dict[str, Any]]]]:
    """Run the server in a child; yield its port and a function that ends the measurement."""
    with subprocess.Popen(
        [sys.executable, "-c", SERVER, str(root), str(max_size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        yield from _measured(proc, proc.stdin, proc.stdout)


def _measured(
    proc: subprocess.Popen[str], stdin: Any, stdout: Any
) -> Iterator[tuple[int, Callable[[], dict[str, Any]]]]:
    try:
        port = int(stdout.readline())
        send_message(port, [b"warm-up\r\n"], ["alice@x"])
        stdin.write("\n")
        stdin.flush()

        def finish() -> dict[str, Any]:
            stdin.write("\n")
            stdin.flush()
            result: dict[str, Any] = json.loads(stdout.readline())
            return result

        yield port, finish
    finally:
        stdin.close()
        try:
            proc.wait(30)
        finally:
            proc.kill()
            proc.wait()


def send_message(port: int, blocks: Any, rcpts: list[str], end: bytes = b".\r\n") -> list[str]:
    """Send one LMTP transaction whose DATA is *blocks* (an iterable of bytes); return the
    replies after the data."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s, s.makefile("rb") as f:
        assert f.readline().startswith(b"220")
        s.sendall(b"LHLO c\r\nMAIL FROM:<s@x>\r\n" + b"".join(b"RCPT TO:<%s>\r\n" % r.encode()
                  for r in rcpts) + b"DATA\r\n")  # fmt: skip
        lines = [f.readline() for _ in range(8 + 1 + len(rcpts) + 1)]
        assert lines[-1].startswith(b"354"), lines
        for block in blocks:
            s.sendall(block)
        s.sendall(end)
        replies = [f.readline().decode().rstrip() for _ in rcpts]
        s.sendall(b"QUIT\r\n")
        return replies


def blocks(total: int, line: bytes) -> Iterator[bytes]:
    """Yield *total* bytes of repeated *line* in 1 MiB blocks."""
    block = line * (MiB // len(line))
    sent = 0
    while sent < total:
        yield block
        sent += len(block)


def check(result: dict[str, Any], limit_mib: float) -> None:
    """Assert the growth and the stall bounds of *result*."""
    assert result["growth_mib"] <= limit_mib, result
    assert result["stall_ms"] <= 20, result


def test_200_mib_message_grows_rss_by_at_most_64_mib(tmp_path: Path) -> None:
    """One 200 MiB message of empty lines streams through with RSS +64 MiB at most."""
    (tmp_path / "alice").mkdir()
    with server_child(tmp_path, 400 * MiB) as (port, finish):
        replies = send_message(port, blocks(200 * MiB, b"\r\n"), ["alice@x"])
        result = finish()
    assert replies[0].startswith("250 2.0.0"), replies
    check(result, 64)
    print(f"200 MiB message: {result}")
    for f in (tmp_path / "alice" / "new").iterdir():
        f.unlink()


def test_50_concurrent_30_mib_messages_grow_rss_by_at_most_256_mib(tmp_path: Path) -> None:
    """50 clients sending 30 MiB each at once: RSS +256 MiB at most, all delivered."""
    (tmp_path / "alice").mkdir()
    results: list[list[str]] = []
    with server_child(tmp_path, 64 * MiB) as (port, finish):
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    send_message(port, blocks(30 * MiB, b"x" * 78 + b"\r\n"), ["alice@x"])
                )
            )
            for _ in range(50)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        result = finish()
    assert len(results) == 50
    assert all(r[0].startswith("250 2.0.0") for r in results), results
    check(result, 256)
    print(f"50 x 30 MiB: {result}")
    assert len(list((tmp_path / "alice" / "new").iterdir())) == 51
    for f in (tmp_path / "alice" / "new").iterdir():
        f.unlink()


def test_endless_line_after_data_grows_rss_by_at_most_16_mib(tmp_path: Path) -> None:
    """A 256 MiB line after DATA: RSS +16 MiB at most, then a clear refusal, nothing kept."""
    (tmp_path / "alice").mkdir()
    with server_child(tmp_path, 32 * MiB) as (port, finish):
        replies = send_message(port, blocks(256 * MiB, b"x" * 1024), ["alice@x"], b"\r\n.\r\n")
        result = finish()
    assert replies[0][:9] in ("552 5.3.4", "451 4.6.0"), replies
    check(result, 16)
    print(f"endless line: {result}")
    assert len(messages(tmp_path / "alice")) == 1  # the warm-up
    assert list((tmp_path / "alice" / "tmp").iterdir()) == []
