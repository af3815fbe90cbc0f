"""Small and medium messages: maildrop at several concurrencies against the alternatives."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from . import _contenders as c
from .conftest import MEDIUM, ROUNDS, SMALL

SIZES = [
    pytest.param((2 * c.KIB, SMALL), id="2KiB"),
    pytest.param((100 * c.KIB, MEDIUM), id="100KiB"),
]


def rounds(benchmark: Any, fresh: Callable[[], Path], one_round: Callable[[Path], object]) -> None:
    """Time ROUNDS rounds of *one_round*, each into a fresh maildir."""
    benchmark.pedantic(one_round, setup=lambda: ((fresh(),), {}), rounds=ROUNDS, iterations=1)


@pytest.mark.parametrize("work", SIZES)
def test_raw_sync_durable(
    benchmark: Any, fresh: Callable[[], Path], work: tuple[int, int]
) -> None:
    """The baseline: create, write, fsync, link, unlink, fsync new/ with plain os calls."""
    size, n = work
    msg = c.message(size)
    rounds(benchmark, fresh, lambda p: c.raw_many(p, msg, n))


@pytest.mark.parametrize("work", SIZES)
def test_raw_sync_no_fsync(
    benchmark: Any, fresh: Callable[[], Path], work: tuple[int, int]
) -> None:
    """The page-cache limit: the baseline without any fsync."""
    size, n = work
    msg = c.message(size)
    rounds(benchmark, fresh, lambda p: c.raw_many(p, msg, n, sync=False))


@pytest.mark.parametrize("work", SIZES)
def test_stdlib_maildir_add(
    benchmark: Any, fresh: Callable[[], Path], work: tuple[int, int]
) -> None:
    """``mailbox.Maildir.add``: fsyncs the file, not new/."""
    size, n = work
    msg = c.message(size)
    rounds(benchmark, fresh, lambda p: c.stdlib_many(p, msg, n))


@pytest.mark.parametrize("concurrency", [1, 64])
@pytest.mark.parametrize("work", SIZES)
def test_naive_aiofiles(
    benchmark: Any, fresh: Callable[[], Path], runner: asyncio.Runner,
    work: tuple[int, int], concurrency: int,
) -> None:  # fmt: skip
    """One awaited aiofiles call per step (open, write, flush, fsync, rename, dir fsync)."""
    size, n = work
    msg = c.message(size)
    rounds(benchmark, fresh, lambda p: runner.run(c.aiofiles_many(p, msg, n, concurrency)))


@pytest.mark.parametrize(
    ("concurrency", "fsync"), [(1, True), (16, True), (64, True), (1, False), (16, False)]
)
@pytest.mark.parametrize("work", SIZES)
def test_maildrop(
    benchmark: Any, fresh: Callable[[], Path], runner: asyncio.Runner,
    work: tuple[int, int], concurrency: int, fsync: bool,
) -> None:  # fmt: skip
    """``Maildir.deliver`` with *concurrency* deliveries in flight; records the probes."""
    size, n = work
    msg = c.message(size)
    probes: list[c.Probe] = []

    async def one_round(path: Path) -> None:
        async with c.monitored() as probe:
            await c.maildrop_many(path, msg, n, concurrency, fsync=fsync)
        probes.append(probe)

    rounds(benchmark, fresh, lambda p: runner.run(one_round(p)))
    benchmark.extra_info.update(
        max_stall_ms=max(p.stall for p in probes) * 1000,
        peak_rss_growth_mib=max(p.rss_growth for p in probes) / c.MIB,
        deliveries_per_dir_fsync=probes[-1].per_fsync if probes[-1].dir_fsyncs else None,
    )
    assert sum(p.deliveries for p in probes) >= n * len(probes)
