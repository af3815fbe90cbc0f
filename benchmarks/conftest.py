"""Fixtures of the pytest-benchmark suites (``pytest benchmarks/ --benchmark-only``).

pytest-benchmark has no async support: each test is a plain function that owns one event
loop (an ``asyncio.Runner``) and hands ``benchmark.pedantic`` a sync callable running one
round on it. Each round writes into a fresh maildir under one directory per session, removed
only when the session ends: deleting many files between timed rounds would slow the next
rounds' file creation ~30x on ext4 without a journal.

``MAILDROP_BENCH_SMOKE=1`` shrinks every size (a few seconds in all): CI runs the suites that
way, with ``--benchmark-disable``, so they cannot rot.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SMOKE = os.environ.get("MAILDROP_BENCH_SMOKE") == "1"
#: Messages per round for the 2 KiB and 100 KiB workloads.
SMALL = 20 if SMOKE else 1000
MEDIUM = 5 if SMOKE else 300
#: Bytes of the streamed message, and of the one streamed for the memory check.
STREAM = (2 if SMOKE else 256) << 20
MEMORY = (4 if SMOKE else 1024) << 20
ROUNDS = 1 if SMOKE else 5


@pytest.fixture(scope="session")
def bench_dir() -> Iterator[Path]:
    """A directory for every maildir of this session, removed when the session ends."""
    path = Path(tempfile.mkdtemp(prefix="maildrop-bench-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fresh(bench_dir: Path, request: pytest.FixtureRequest) -> Callable[[], Path]:
    """Return a function giving a new, not yet existing maildir path on each call."""
    counter = itertools.count()
    safe = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)
    parent = bench_dir / safe
    parent.mkdir(exist_ok=True)
    return lambda: parent / f"r{next(counter)}"


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    """One event loop for the whole test (its worker pool stays warm between rounds)."""
    with asyncio.Runner() as r:
        yield r
