"""Message sources: blocking ones are read in their own lane, never on the delivery workers."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
    with (
        open(r, "rb") as f,
        pytest.raises(MessageTooLargeError, match="exceeds max_size=100 bytes"),
    ):
        await Maildir(tmp_path / "m", max_size=100).deliver(f)
    assert len(listing(tmp_path / "m")["new"]) == 1


# -- regressions --------------------------------------------------------------------------


async def test_compressed_file_source_delivers_what_read_returns(
    tmp_path: Path, maildir_path: Path
) -> None:
    """A file object that decodes on read() delivers its decoded bytes, not its fd's bytes."""
    import gzip

    packed = tmp_path / "msg.gz"
    with gzip.open(packed, "wb") as g:
        g.write(MSG)
    with gzip.open(packed, "rb") as f:
        d = await Maildir(maildir_path).deliver(f)
    assert d.path.read_bytes() == MSG


async def test_nonblocking_file_without_data_is_not_the_end(maildir_path: Path) -> None:
    """A non-blocking file with no data available yet is never delivered truncated."""
    r, w = os.pipe()
    try:
        os.write(w, b"Subject: part one\n\n")
        os.set_blocking(r, False)
        with (
            open(r, "rb", closefd=False) as f,
            pytest.raises(BlockingIOError, match="non-blocking and had no data"),
        ):
            await Maildir(maildir_path).deliver(f)
    finally:
        os.close(r)
        os.close(w)
    assert listing(maildir_path)["new"] == []


async def test_str_chunks_never_get_through(maildir_path: Path) -> None:
    """str from any source kind is refused with TypeError and leaves nothing behind."""

    class AsyncReader:
        async def read(self, n: int) -> Any:
            return "text"

    async def agen() -> AsyncIterator[Any]:
        yield b"ok"
        yield "text"

    class SyncReader:
        def read(self, n: int = -1) -> Any:
            return "text"

    md = Maildir(maildir_path)
    for source in (AsyncReader(), agen(), SyncReader()):
        with pytest.raises(TypeError, match="not str"):
            await md.deliver(source)
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}


async def test_source_oserror_propagates_from_deliver(maildir_path: Path) -> None:
    """deliver() raises the source's OSError as the same object and leaves nothing."""
    boom = ConnectionResetError(errno.ECONNRESET, "peer went away")

    async def src() -> AsyncIterator[bytes]:
        yield b"x" * (2 * 1024 * 1024)  # a batch is in flight when the source fails
        raise boom

    with pytest.raises(ConnectionResetError, match="peer went away") as info:
        await Maildir(maildir_path).deliver(src())
    assert info.value is boom
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}
