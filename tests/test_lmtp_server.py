"""MaildirServer under connection floods: 1 100 idle clients against a 1024-fd server process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .lmtp_client import Client
from .test_lmtp import messages

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

FLOOD = 1100


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


@contextlib.asynccontextmanager
async def server_process(root: Path, *args: str) -> AsyncIterator[tuple[int, Path]]:
    """Run ``maildrop lmtp`` in one process with RLIMIT_NOFILE 1024; yield its port and log."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < FLOOD + 200:
        pytest.skip(f"this process may open only {hard} files; the test needs {FLOOD + 200}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, FLOOD + 200), hard))
    log = root.parent / "server.log"
    with log.open("w") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "maildrop", "lmtp", "--listen", "127.0.0.1:0",
            "--root", str(root), "--workers", "1", *args,  # the limits are per process
            stderr=err,
            preexec_fn=_limit_fds,
        )  # fmt: skip
    try:
        for _ in range(600):  # up to 30 s: a server under coverage on a busy CI machine
            text = log.read_text()
            if "listening on " in text or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert "listening on " in text, f"server did not start (exit {proc.returncode}): {text!r}"
        port = int(text.split("listening on ")[1].split(",")[0].rsplit(":", 1)[1])
        yield port, log
    finally:
        if proc.returncode is None:
            proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0, log.read_text()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def flood(port: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """Open FLOOD connections and say nothing."""
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(FLOOD)]


async def first_line(reader: asyncio.StreamReader) -> bytes:
    """The server's first line, or b"" if it said nothing within a second."""
    try:
        return await asyncio.wait_for(reader.readline(), 1)
    except TimeoutError:
        return b""


async def test_idle_flood_beyond_max_connections_gets_421(tmp_path: Path) -> None:
    """512 idle clients hold every slot; the rest get 421 4.3.2; freed slots serve again."""
    (tmp_path / "root" / "alice").mkdir(parents=True)
    async with server_process(tmp_path / "root") as (port, _):
        conns = await flood(port)
        firsts = await asyncio.gather(*(first_line(r) for r, _ in conns))
        greeted = sum(f.startswith(b"220 ") for f in firsts)
        refused = sum(f.startswith(b"421 4.3.2") for f in firsts)
        for _, w in conns:
            w.close()
        await asyncio.sleep(0.5)
        c = await Client.connect(port)
        t = await c.send("s@x", ["alice@x"], b"Subject: still served\n\nhi\n")
        await c.quit()
    assert greeted == 512
    assert refused == FLOOD - 512
    assert t.data[0].startswith("250 2.0.0")
    assert len(messages(tmp_path / "root" / "alice")) == 1


async def test_fd_exhaustion_logs_once_a_second_and_recovers(tmp_path: Path) -> None:
    """Past the fd limit accepts fail (EMFILE): one log line a second at most, no
    traceback, and waiting clients are served once descriptors free up."""
    (tmp_path / "root" / "alice").mkdir(parents=True)
    async with server_process(tmp_path / "root", "--max-connections", "5000") as (port, log):
        start = time.monotonic()
        conns = await flood(port)
        await asyncio.sleep(2.5)
        for _, w in conns[:300]:
            w.close()
        c = await Client.connect(port)
        t = await c.send("s@x", ["alice@x"], b"Subject: after the flood\n\nhi\n")
        await c.quit()
        for _, w in conns[300:]:
            w.close()
        elapsed = time.monotonic() - start
    text = log.read_text()
    lines = [line for line in text.splitlines() if "cannot accept connections" in line]
    assert 1 <= len(lines) <= elapsed + 2, text[-2000:]
    assert "Too many open files" in lines[0]
    assert "Traceback" not in text
    assert t.data[0].startswith("250 2.0.0")
    assert os.listdir(tmp_path / "root" / "alice" / "tmp") == []
