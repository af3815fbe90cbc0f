"""Each weakness of Twisted's append task: the stock class fails these, the shim passes.

Every scenario runs in its own process under asyncioreactor (see ``_regress.py``) with the
same code for both classes; the stock runs are strict xfails, so a Twisted that fixes one
of these shows up here as an unexpected pass.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ._util import finish, needs_twisted, start

SCENARIOS = {
    "fsync": "never fsyncs the message or new/",
    "clobber": "renames over an existing message on a name clash",
    "write_error": "leaks the tmp file and its fd when a write fails",
    "short_write": "ignores short writes (truncated message)",
    "read_error": "never fires its Deferred when the source's read fails",
    "blocking": "blocks the reactor on every write",
}
IMPLS = ["stock", "shim"]


def _run(impl: str, scenario: str, root: Path) -> Any:
    work = root / f"{impl}-{scenario}"
    work.mkdir()
    return finish(start("_regress.py", impl, scenario, str(work / "Maildir"), cwd=work), 60)


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], Any]:
    """Run every (implementation, scenario) pair once, four processes at a time."""
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(4) as pool:
        jobs = {(i, s): pool.submit(_run, i, s, Path(tmp)) for s in SCENARIOS for i in IMPLS}
        return {key: job.result() for key, job in jobs.items()}


@needs_twisted
@pytest.mark.parametrize(
    "impl",
    [
        pytest.param("stock", marks=pytest.mark.xfail(reason="Twisted's task has the bug")),
        "shim",
    ],
)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_weakness_of_twisted_task_is_fixed(
    results: dict[tuple[str, str], Any], impl: str, scenario: str
) -> None:
    """The task does not have the weakness (e.g. it fsyncs, never clobbers, never leaks)."""
    result = results[impl, scenario]
    assert "crash" not in result, result
    assert result["ok"], f"{SCENARIOS[scenario]}: {result}"
