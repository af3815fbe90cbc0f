"""The comparison script runs end to end (at toy sizes; its own timings are not checked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import compare


def test_compare_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m benchmarks --smoke`` prints every table, the targets and the machine."""
    assert compare.main(["--smoke", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for heading in (
        "2 KiB messages",
        "100 KiB messages",
        "MiB stream",
        "### Targets",
        "### Machine",
    ):
        assert heading in out
    assert "failed" not in out
