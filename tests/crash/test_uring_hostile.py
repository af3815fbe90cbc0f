"""Hostile mailboxes on the io_uring backend: symlinked tmp/ and new/, planted names, a
swapped tmp file, played at the ring's ops as uid 65534 (the same cases as ``test_hostile``).

strace cannot see io_uring opens, so the proof is what the canary and the maildir hold
afterwards: the canary untouched, every acked message a regular file inside ``new/``, every
symlinked directory refused and every name race survived (C6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ._harness import FIGURES, require_root, serve
from ._uring_harness import require_uring
from .test_hostile import CASES, hostile_jobs, judge

pytestmark = pytest.mark.crash


SWAPS = [case for case in CASES if case[0].startswith("swapped")]


@pytest.mark.parametrize(
    "cases",
    [
        [case for case in CASES if case not in SWAPS],
        SWAPS,
    ],
    ids=["symlinks-and-planted-names", "swapped-tmp-file"],
)
def test_uring_hostile_mailboxes_as_nobody(work: Path, cases: list[Any]) -> None:
    """Symlinks, planted names and a swapped tmp file never reach the canary (C6)."""
    require_root("switching to uid 65534")
    require_uring()
    jobs, layout = hostile_jobs(work, {"backend": "uring"}, cases)
    judge(serve(jobs, parallel=1), layout)
    FIGURES["uring_hostile_cases"] += len(cases)
