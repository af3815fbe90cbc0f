"""The io_uring backend's contenders and targets in ``python -m benchmarks`` (compare.py).

They run in the same interleaved rounds as the thread backend (whose contenders are pinned
to ``backend="threads"``, so "auto" can never turn them into io_uring runs) and the raw loop.
Where io_uring is missing they are left out and their targets read "not measured", with the
reason printed once.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from . import _contenders as c

#: (key, label, concurrency, fsync, kinds)
CONTENDERS = [
    ("ur1", "maildrop io_uring c=1", 1, True, {"msgs", "stream"}),
    ("ur16", "maildrop io_uring c=16", 16, True, {"msgs"}),
    ("ur64", "maildrop io_uring c=64", 64, True, {"msgs"}),
    ("ur16nofsync", "maildrop io_uring fsync=False, c=16", 16, False, {"msgs"}),
]
#: The default, ``backend="auto"``: threads for a delivery that starts alone, the ring for
#: one that starts while others are in flight (the same keys' shape).
AUTO = [
    ("au1", "maildrop auto c=1", 1, True, {"msgs"}),
    ("au16", "maildrop auto c=16", 16, True, {"msgs"}),
    ("au64", "maildrop auto c=64", 64, True, {"msgs"}),
]
Row = tuple[str, float | None, str, float, bool]


def contenders(md: Callable[..., Any], make: Callable[..., Any]) -> list[Any]:
    """Return the io_uring contenders, built with compare.py's *md* and ``Contender`` *make*."""
    if c.uring_reason() is not None:
        return []
    return [
        make(key, label, md(conc, fsync, backend=backend), frozenset(kinds))
        for backend, table in (("uring", CONTENDERS), ("auto", AUTO))
        for key, label, conc, fsync, kinds in table
    ]


def _cpu(res: dict[str, Any], key: str) -> float | None:
    """Median CPU seconds per delivery of *key*'s rounds, or None."""
    r = res.get(key)
    return statistics.median(r.cpu) if r is not None and r.cpu else None


def targets(all_res: dict[str, dict[str, Any]], paired: Callable[..., float | None]) -> list[Row]:
    """The issue's io_uring targets, from this run's results (*paired*: compare.py's)."""
    small = all_res.get("2k", {})
    stream = all_res.get("256m", {})
    cpu_ur, cpu_md = _cpu(small, "ur64"), _cpu(small, "md64")
    rows: list[Row] = [
        ("io_uring c=64 vs thread backend c=64, 2 KiB", paired(small, "ur64", "md64"), ">=",
         1.4, True),
        ("io_uring c=16 vs thread backend c=16, 2 KiB", paired(small, "ur16", "md16"), ">=",
         1.4, True),
        ("io_uring c=1 vs raw sync durable, 2 KiB", paired(small, "ur1", "raw"), ">=", 0.85,
         True),
        ("io_uring fsync=False c=16 vs Twisted stock, 16 concurrent, 2 KiB",
         paired(small, "ur16nofsync", "twisted16"), ">=", 1.0, True),
        ("CPU per durable delivery, io_uring c=64 / thread backend c=64",
         None if cpu_ur is None or cpu_md is None else cpu_ur / cpu_md, "<=", 0.75, True),
        ("auto (the default) c=1 vs raw sync durable, 2 KiB", paired(small, "au1", "raw"),
         ">=", 0.85, True),
        ("auto (the default) c=16 vs thread backend c=16, 2 KiB",
         paired(small, "au16", "md16"), ">=", 1.4, True),
        ("auto (the default) c=64 vs thread backend c=64, 2 KiB",
         paired(small, "au64", "md64"), ">=", 1.4, True),
        ("256 MiB stream, io_uring vs raw sync durable", paired(stream, "ur1", "raw"), ">=",
         0.9, True),
    ]  # fmt: skip
    mem = all_res.get("1g", {}).get("ur1")
    growth = max((p.rss_growth for p in mem.probes), default=None) if mem else None
    rows.append(("1 GiB stream on io_uring: peak RSS growth (MiB)",
                 None if growth is None else growth / c.MIB, "<=", 16.0, False))  # fmt: skip
    stalls = [p.stall for res in all_res.values() for k, r in res.items()
              if k.startswith("ur") for p in r.probes]  # fmt: skip
    rows.append(("longest event-loop stall, any io_uring run (ms)",
                 max(stalls) * 1000 if stalls else None, "<=", 5.0, False))  # fmt: skip
    return rows


def cpu_column(res: Any) -> str:
    """The table's CPU µs per delivery for one contender's results ("" if not measured)."""
    return f"{statistics.median(res.cpu) * 1e6:.0f}" if res.cpu else ""
