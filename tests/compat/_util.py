"""Helpers for compat tests: Twisted detection without importing it, child processes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ..subprocess_coverage import measured_env

HERE = Path(__file__).parent
HAVE_TWISTED = importlib.util.find_spec("twisted") is not None

needs_twisted = pytest.mark.skipif(not HAVE_TWISTED, reason="Twisted is not installed")


def start(script: str, *args: str, cwd: Path) -> subprocess.Popen[str]:
    """Start ``python tests/compat/<script> args...`` in *cwd* (its own reactor/process)."""
    return subprocess.Popen(
        [sys.executable, str(HERE / script), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=measured_env(),
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> Any:
    """Wait for *proc* and return the JSON it printed last; fail with its stderr otherwise."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} hung for {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    if proc.returncode != 0 or not out.strip():
        pytest.fail(f"{proc.args} exited {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}")
    return json.loads(out.strip().splitlines()[-1])
