"""Measure the Python child processes a test starts, when the tests run under coverage.

Only children that keep the test's uid: coverage's ``a1_coverage.pth`` starts measuring in
any process that sees ``COVERAGE_PROCESS_START``, and one that dropped to another uid could
not write its data file (so the variable is passed per child, never set globally).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measured_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Return *env* (default: this process's) plus what makes coverage measure the child."""
    env = dict(os.environ if env is None else env)
    coverage = sys.modules.get("coverage")
    current = None if coverage is None else coverage.Coverage.current()
    if current is not None:
        env["COVERAGE_PROCESS_START"] = str(ROOT / "pyproject.toml")
        # The child may run in another directory: its data goes next to this process's.
        env["COVERAGE_FILE"] = os.path.abspath(current.config.data_file)
    return env
