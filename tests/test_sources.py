"""Message sources: blocking ones are read in their own lane, never on the delivery workers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest

from maildrop import Maildir, MessageTooLargeError

from .conftest import listing, settle

pytestmark = pytest.mark.anyio


def in_pipe_read() -> int:
    """Count this process's threads asleep in a pipe read (what the kernel's wchan says)."""
    count = 0
    for entry in Path("/proc/self/task").iterdir():
        try:
            count += "pipe_read" in (entry / "wchan").read_text()
        except OSError:  # the thread ended meanwhile
            continue
    return count


MSG = b"Subject: x\n\nhello\n"  # 20 bytes with the header


async def test_blocked_pipe_sources_do_not_delay_another_delivery(
    tmp_path: Path, anyio_backend: str
) -> None:
    """8 deliveries reading pipes that send nothing leave a 20-byte delivery elsewhere
    undelayed (under 100 ms) and still complete once their pipes deliver."""
    pipes = [os.pipe() for _ in range(8)]
    readers = [open(r, "rb") for r, _ in pipes]  # noqa: SIM115 - closed below
    slow, other = Maildir(tmp_path / "slow"), Maildir(tmp_path / "other")
    await slow.deliver(b"warm")
    await other.deliver(b"warm")
    took = float("inf")
    try:
        async with anyio.create_task_group() as tg:
            for f in readers:
                tg.start_soon(slow.deliver, f)
            await settle(lambda: in_pipe_read() >= 8, "8 sources blocked in read()")
            with anyio.move_on_after(5):
                start = time.monotonic()
                await other.deliver(MSG)
                took = time.monotonic() - start
            for _, w in pipes:
                os.write(w, b"Subject: piped\n\nbody\n")
                os.close(w)
    finally:
        for f in readers:
            f.close()
    assert took < 0.1
    assert len(listing(tmp_path / "slow")["new"]) == 9
    assert len(listing(tmp_path / "other")["new"]) == 2


async def test_file_object_without_data_is_refused(tmp_path: Path, anyio_backend: str) -> None:
    """A file-like object without an fd whose read() says "no data now" (None) is refused,
    not taken for the end of the message."""

    class Empty:
        def read(self, n: int) -> bytes | None:
            return None

    with pytest.raises(BlockingIOError, match="non-blocking and had no data"):
        await Maildir(tmp_path / "m").deliver(Empty())
    assert listing(tmp_path / "m") == {"tmp": [], "new": [], "cur": []}


async def test_pipe_source_with_a_header_and_a_size_limit(
    tmp_path: Path, anyio_backend: str
) -> None:
    """A pipe read in the source lane still gets the header stamps and max_size checks."""
    r, w = os.pipe()
    os.write(w, b"Subject: p\n\n" + b"x" * 100)
    os.close(w)
    with open(r, "rb") as f:
        d = await Maildir(tmp_path / "m").deliver(f, return_path="a@example.org")
    assert d.path.read_bytes().startswith(b"Return-Path: <a@example.org>\n")
    r, w = os.pipe()
    os.write(w, b"y" * 200)
    os.close(w)
    with open(r, "rb") as f, pytest.raises(MessageTooLargeError):
        await Maildir(tmp_path / "m", max_size=100).deliver(f)
    assert len(listing(tmp_path / "m")["new"]) == 1
