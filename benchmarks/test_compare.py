"""The comparison script runs end to end (at toy sizes; its own timings are not checked)."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from . import _contenders, compare


def test_compare_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m benchmarks --smoke`` prints every table, the targets and the machine."""
    assert compare.main(["--smoke", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for heading in (
        "2 KiB messages",
        "100 KiB messages",
        "MiB stream",
        "### Targets",
        "### Limits of this machine",
        "### Machine",
    ):
        assert heading in out
    assert "failed" not in out


def test_a_reference_run_whose_job_fails_raises(tmp_path: Path) -> None:
    """A thread whose job failed would make a run look fast: the failure is raised instead."""
    _contenders.fsync_only_threads_many(tmp_path / "d", b"x", 40, 4)

    def boom(_: int) -> None:
        raise FileExistsError("a name was reused")

    with pytest.raises(FileExistsError, match="reused"):
        _contenders._in_threads(40, 4, boom)
    assert len(list((tmp_path / "d").iterdir())) == 40


def test_the_stall_probe_tells_garbage_collection_apart() -> None:
    """A blocked loop shows in both stall figures; a long collection only in the first."""

    async def blocked(work: Callable[[], object]) -> _contenders.Probe:
        async with _contenders.monitored() as probe:
            await asyncio.sleep(0.01)
            work()
            await asyncio.sleep(0.01)
        return probe

    heap = [[i] for i in range(1_000_000)]  # tracked objects: a full collection takes a while
    collected = asyncio.run(blocked(gc.collect))
    del heap
    assert collected.gc_pause > 0.005
    assert collected.stall >= collected.gc_pause * 0.9
    assert collected.stall_no_gc < collected.stall - collected.gc_pause * 0.8
    slept = asyncio.run(blocked(lambda: time.sleep(0.03)))
    assert slept.stall_no_gc >= 0.029
