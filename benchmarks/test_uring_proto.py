"""The io_uring prototype comparison runs end to end (at toy sizes; timings not checked)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from maildrop._uring import availability

from . import uring_floor, uring_proto


@pytest.mark.skipif(not availability().ok, reason=f"io_uring: {availability().reason}")
def test_uring_proto_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m benchmarks.uring_proto --smoke`` checks every run and prints every ratio."""
    assert uring_proto.main(["--smoke", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for line in ("ur64w/md64", "CPU ur64/md64", "loop wake-ups per delivery"):
        assert line in out


@pytest.mark.skipif(not availability().ok, reason=f"io_uring: {availability().reason}")
def test_uring_floor_runs_every_contender(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m benchmarks.uring_floor`` delivers with each contender and prints its ratio."""
    assert uring_floor.main(["--rounds", "1", "-n", "5", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for kind in uring_floor.KINDS:
        assert f"{kind} " in out
    assert sum(len(os.listdir(d / "new")) for d in next(tmp_path.iterdir()).iterdir()) == 20
