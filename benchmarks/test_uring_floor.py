"""The ring's c=1 floor comparison runs end to end, and its polling selector keeps its bounds."""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from maildrop import _uring_ops as ops
from maildrop._uring import Ring, availability

from . import uring_floor
from .uring_floor import SpinSelector

pytestmark = pytest.mark.skipif(not availability().ok, reason=f"io_uring: {availability().reason}")


def test_uring_floor_runs_every_contender(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m benchmarks.uring_floor`` delivers with each contender and prints its ratio."""
    argv = ["--rounds", "1", "-n", "5", "--dir", str(tmp_path), "--spin", "20,1000"]
    assert uring_floor.main(argv) == 0
    out = capsys.readouterr().out
    for kind in (*uring_floor.KINDS, "loop2spin20", "loop2spin1000"):
        assert f"{kind} " in out
    assert "of polls hit" in out
    delivered = sum(len(os.listdir(d / "new")) for d in next(tmp_path.iterdir()).iterdir())
    assert delivered == 5 * (len(uring_floor.KINDS) + 2)


@pytest.fixture
def full_pipe() -> Iterator[tuple[int, int]]:
    """Yield a pipe whose buffer is full: a ring write to it stays in flight until drained."""
    r, w = os.pipe()
    size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    assert os.write(w, b"x" * size) == size
    yield r, w
    os.close(r)
    os.close(w)


def test_poll_reaps_a_completion_before_the_loop_sleeps(tmp_path: Path) -> None:
    """An fsync's completion (io-wq's, not inline) is reaped by the poll, not the eventfd."""
    spin = SpinSelector(1.0)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)

    async def one_chain() -> list[int]:
        with Ring.open(entries=8, slots=0) as ring:
            ring.attach(asyncio.get_running_loop())
            spin.ring = ring
            return await ring.submit([ops.fsync(fd)])

    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(spin)) as runner:
        assert runner.run(one_chain()) == [0]
    os.close(fd)
    assert (spin.polls, spin.hits) == (1, 1)


def test_poll_gives_up_after_its_budget(full_pipe: tuple[int, int]) -> None:
    """With an op in flight that does not complete, the poll returns empty-handed."""
    r, w = full_pipe
    spin = SpinSelector(0.002)
    with Ring.open(entries=8, slots=0) as ring:
        spin.ring = ring
        results: list[list[int]] = []
        ring.queue([ops.write(w, b"y")], results.append)
        ring._fill()
        ring._enter(0)
        assert spin.select(0.01) == []
        assert (spin.polls, spin.hits, results) == (1, 0, [])
        os.read(r, 65536)  # room in the pipe: the write completes and the ring can close
    assert results == [[1]]


def test_no_poll_without_ops_in_flight_or_when_callbacks_are_ready() -> None:
    """An idle ring, or a zero timeout (the loop has work), never makes the selector poll."""
    spin = SpinSelector(1.0)
    assert spin.select(0.001) == []  # no ring at all
    with Ring.open(entries=8, slots=0) as ring:
        spin.ring = ring
        assert spin.select(0.001) == []
        results: list[list[int]] = []
        ring.queue([ops.nop()], results.append)
        ring._fill()
        ring._enter(0)
        assert spin.select(0) == []
        assert spin.polls == 0
        ring.drain()
    assert results == [[0]]
