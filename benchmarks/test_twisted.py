"""Twisted's stock ``MaildirMailbox.appendMessage`` and maildrop's compat shim.

They run in the second process of ``_twisted.py`` (Twisted's reactor is process-global);
each round is one command to it, so the timing includes one pipe round trip (~0.1 ms).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import _contenders as c
from .compare import TwistedProcess
from .conftest import ROUNDS, SMALL


@pytest.fixture(scope="module")
def twisted_process() -> Iterator[TwistedProcess]:
    """The Twisted benchmark process (skips when Twisted is not installed)."""
    tw = TwistedProcess()
    try:
        if not tw.caps.get("twisted"):
            pytest.skip("Twisted is not installed")
        yield tw
    finally:
        tw.close()


@pytest.mark.parametrize(
    ("op", "concurrency", "fsync"),
    [("twisted", 16, False), ("compat", 1, True), ("compat", 16, False)],
    ids=["twisted-stock-c16", "compat-c1", "compat-nofsync-c16"],
)
def test_twisted_append(
    benchmark: Any, fresh: Callable[[], Path], twisted_process: TwistedProcess,
    op: str, concurrency: int, fsync: bool,
) -> None:  # fmt: skip
    """*concurrency* appends of 2 KiB messages at a time, under ``asyncioreactor``."""
    if op == "compat" and not twisted_process.caps.get("compat"):
        pytest.skip("compat has no MaildirMailbox")
    stalls: list[float] = []

    def one_round(path: Path) -> None:
        ans = twisted_process.ask({
            "op": op, "path": str(path), "size": 2 * c.KIB, "n": SMALL,
            "concurrency": concurrency, "fsync": fsync,
        })  # fmt: skip
        assert "error" not in ans, ans
        stalls.append(ans["stall"])

    benchmark.pedantic(one_round, setup=lambda: ((fresh(),), {}), rounds=ROUNDS, iterations=1)
    benchmark.extra_info["max_stall_ms"] = max(stalls) * 1000
