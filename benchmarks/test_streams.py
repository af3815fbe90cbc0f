"""One large message streamed from 64 KiB chunks; and a 1 GiB one for memory."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _contenders as c
from .conftest import MEMORY, ROUNDS, STREAM


def test_raw_sync_stream(benchmark: Any, fresh: Callable[[], Path]) -> None:
    """The baseline: a sync loop writing the chunks, then fsync, link, fsync new/."""
    benchmark.pedantic(
        lambda p: c.raw_stream(p, STREAM), setup=lambda: ((fresh(),), {}),
        rounds=ROUNDS, iterations=1,
    )  # fmt: skip


def test_naive_aiofiles_stream(
    benchmark: Any, fresh: Callable[[], Path], runner: asyncio.Runner
) -> None:
    """One awaited aiofiles write per 64 KiB chunk."""
    benchmark.pedantic(
        lambda p: runner.run(c.aiofiles_stream(p, STREAM)), setup=lambda: ((fresh(),), {}),
        rounds=ROUNDS, iterations=1,
    )  # fmt: skip


def test_maildrop_stream(
    benchmark: Any, fresh: Callable[[], Path], runner: asyncio.Runner
) -> None:
    """``Maildir.deliver`` of an async iterator of 64 KiB chunks; records the probes."""
    probes: list[c.Probe] = []

    async def one_round(path: Path) -> None:
        async with c.monitored() as probe:
            await c.maildrop_stream(path, STREAM)
        probes.append(probe)

    benchmark.pedantic(
        lambda p: runner.run(one_round(p)), setup=lambda: ((fresh(),), {}),
        rounds=ROUNDS, iterations=1,
    )  # fmt: skip
    benchmark.extra_info.update(
        max_stall_ms=max(p.stall for p in probes) * 1000,
        peak_rss_growth_mib=max(p.rss_growth for p in probes) / c.MIB,
    )


def test_maildrop_memory(fresh: Callable[[], Path], runner: asyncio.Runner) -> None:
    """Streaming 1 GiB raises the peak RSS by at most 16 MiB (not a timing: always runs)."""

    async def one_round(path: Path) -> c.Probe:
        async with c.monitored() as probe:
            await c.maildrop_stream(path, MEMORY)
        return probe

    probe = runner.run(one_round(fresh()))
    if not c.reset_peak_rss():  # pragma: no cover - /proc/self/clear_refs refused
        return
    assert probe.rss_growth <= 16 * c.MIB, probe
