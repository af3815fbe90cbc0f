"""``python -m benchmarks.ab``: its arithmetic, and a smoke run of two trees end to end."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from . import ab, compare

W = compare.Workload("2k", "2 KiB messages", 2048, 100)


def side(*rounds: dict[str, float]) -> ab.Side:
    """A tree's results: seconds per contender, one dict per round."""
    return ab.Side(rounds=list(rounds))


def test_paired_ratios_are_per_round_and_skip_missing_rounds() -> None:
    """head/base is taken round by round; a round without a figure on either side is left out."""
    base = side({"md1": 1.0}, {"md1": 2.0}, {})
    head = side({"md1": 2.0}, {"md1": 1.0}, {"md1": 1.0})
    assert ab.paired(base, head, "md1") == [0.5, 2.0]


def test_vs_raw_is_the_median_of_per_round_ratios() -> None:
    """A tree's "vs raw" figure is the README's: the median of contender/raw per round."""
    s = side({"raw": 1.0, "md1": 2.0}, {"raw": 1.0, "md1": 1.0}, {"raw": 2.0, "md1": 1.0})
    assert ab.vs_raw(s, "md1") == 1.0
    assert ab.vs_raw(s, "nope") is None


def test_a_row_more_than_5_percent_slower_is_flagged_with_its_spread() -> None:
    """A maildrop row whose median head/base is under 0.95 is NO and named with the noise
    band of the control rows; a control row is never flagged; the spread is min-max."""
    base = side({"raw": 1.0, "md1": 1.0}, {"raw": 1.0, "md1": 1.0}, {"raw": 1.0, "md1": 1.0})
    head = side({"raw": 1.0, "md1": 1.25}, {"raw": 1.2, "md1": 1.0}, {"raw": 1.0, "md1": 1.1})
    lines, worse = ab.table(W, ["raw", "md1"], base, head, 0.05)
    assert worse == ["2 KiB messages: md1 0.909 (control rows 1.000-1.000)"]
    assert lines[-4] == "| raw | 100.0 | 100.0 | 1.000 | 0.833-1.000 | 1.00x | 1.00x | control |"
    assert lines[-3] == "| md1 | 100.0 | 90.9 | 0.909 | 0.800-1.000 | 1.00x | 0.91x | NO |"
    assert lines[-1] == "Noise band (head/base of the control rows 1.000-1.000)."


def test_a_slower_row_inside_the_noise_band_says_so() -> None:
    """When a control row lost as much, the flagged row is marked as inside the noise band."""
    base = side({"stdlib": 1.0, "md1": 1.0})
    head = side({"stdlib": 1.2, "md1": 1.1})
    _, worse = ab.table(W, ["stdlib", "md1"], base, head, 0.05)
    assert worse == ["2 KiB messages: md1 0.909 (inside the noise band)"]


def test_a_failed_contender_is_reported_not_compared() -> None:
    """A contender that failed in either tree says so instead of a ratio, and is not flagged."""
    base = side({"raw": 1.0})
    base.errors["md1"] = "OSError: boom"
    lines, worse = ab.table(W, ["md1"], base, side({"raw": 1.0}), 0.05)
    assert lines[-3] == "| md1 | not measured: OSError: boom | | | | | | |"
    assert worse == []


def test_ab_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--smoke`` measures two trees (base from a worktree it removes again) in one report."""
    argv = ["--smoke", "--base", "HEAD", "--no-twisted", "--workloads", "2k,256m",
            "--dir", str(tmp_path)]  # fmt: skip
    assert ab.main(argv) == 0
    out = capsys.readouterr().out
    assert "- base: " in out
    assert "- head: working tree at " in out
    head = f"`{ab.REPO / 'maildrop' / '__init__.py'}` and `{ab.REPO / 'compat' / '__init__.py'}`"
    assert f"- the head imports {head}" in out
    assert "/base-tree/maildrop/__init__.py` and `" in out
    assert "/base-tree/compat/__init__.py`" in out
    for heading in ("#### 2 KiB messages (20 per round)", "#### 2 MiB stream", "### Verdict"):
        assert heading in out
    for key in ("raw", "md1", "md64", "stdlib"):
        assert f"\n| {key} | " in out
    assert "not measured" not in out
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ab.REPO, capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
    assert str(tmp_path) not in worktrees
    assert list(tmp_path.iterdir()) == []
