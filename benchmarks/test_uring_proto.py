"""The io_uring prototype comparison runs end to end (at toy sizes; timings not checked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from maildrop._uring import availability

from . import uring_proto


@pytest.mark.skipif(not availability().ok, reason=f"io_uring: {availability().reason}")
def test_uring_proto_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m benchmarks.uring_proto --smoke`` checks every run and prints every ratio."""
    assert uring_proto.main(["--smoke", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for line in ("ur64w/md64", "CPU ur64/md64", "loop wake-ups per delivery"):
        assert line in out
