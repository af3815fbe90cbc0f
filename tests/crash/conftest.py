"""Fixtures of the crash suite: a tmpfs scratch area (fast, no root-fs churn) and figures."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._harness import FIGURES, is_root, umount


@pytest.fixture(scope="session")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory on a private tmpfs when root (else under tmp_path), unmounted at the end.

    Crash tests create and delete thousands of files; on the root filesystem (ext4 without
    a journal) that slows every later file creation for ~30 s. A tmpfs avoids it.
    """
    if not is_root():
        yield tmp_path_factory.mktemp("crash")
        return
    mnt = Path(tempfile.mkdtemp(prefix="maildrop-crash-"))
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1g,mode=0755", "tmpfs", str(mnt)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode or not os.path.ismount(mnt):
        mnt.rmdir()
        yield tmp_path_factory.mktemp("crash")
        return
    try:
        yield mnt
    finally:
        umount(mnt)
        mnt.rmdir()


@pytest.fixture
def work(scratch: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh directory for one test on the scratch area."""
    name = "".join(c if c.isalnum() else "_" for c in request.node.name)[:100]
    d = scratch / name
    d.mkdir(mode=0o755)
    return d


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the figures the crash tests counted (they go into the README)."""
    if FIGURES:
        line = ", ".join(f"{k}={v}" for k, v in sorted(FIGURES.items()))
        terminalreporter.write_line(f"crash suite figures: {line}")
