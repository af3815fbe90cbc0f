"""The io_uring prototype delivery against ``Maildir.deliver`` and the raw synchronous loop.

Run: ``python -m benchmarks.uring_proto`` (``--rounds``, ``-n``, ``--size``, ``--smoke``).

Durable 2 KiB deliveries, 1 000 per contender and round, c=1, 16 and 64 in flight:

* ``raw``: plain synchronous ``os`` calls, one message at a time (``_contenders.raw_many``);
* ``md1``/``md16``/``md64``: ``Maildir(path, backend="threads").deliver`` (the thread backend);
* ``mu1``/``mu16``/``mu64``: ``Maildir(path, backend="uring").deliver`` (the io_uring backend);
* ``ur1``/``ur16``/``ur64``: ``UringMaildir.deliver`` on one ring driven from the event loop's
  thread (``maildrop/_uring_deliver.py``).

Rounds are interleaved (every contender once per round, the first one rotating), each run gets
a fresh maildir and is checked afterwards (n files in new/, none left in tmp/), nothing is
deleted until the end. A ratio is the median of the per-round ratios; CPU is the process's
(every thread's) CPU time per delivery. The issue's targets: ur64 and ur16 >= 1.4x md64 and
md16, ur1 >= 0.85x raw.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from maildrop._uring import Ring, availability
from maildrop._uring_deliver import UringMaildir

from . import _contenders as c

CONCURRENCY = {"md1": 1, "md16": 16, "md64": 64, "ur1": 1, "ur16": 16, "ur64": 64}
CONCURRENCY.update(ur16w=16, ur64w=64, mu1=1, mu16=16, mu64=64)
NAMES = [
    "raw",
    "md1",
    "mu1",
    "ur1",
    "md16",
    "mu16",
    "ur16",
    "ur16w",
    "md64",
    "mu64",
    "ur64",
    "ur64w",
]
#: The ``w`` contenders run on a second ring allowed this many bounded io-wq workers.
WORKERS = 64
#: Per ur run: io_uring_enter calls and loop wake-ups per delivery, deliveries per fsync(new/).
PER_DELIVERY: dict[str, list[tuple[float, float, float]]] = {}
RATIOS = [("ur1", "raw"), ("ur1", "md1"), ("ur16", "md16"), ("ur64", "md64"), ("md1", "raw")]
RATIOS += [("ur16w", "md16"), ("ur64w", "md64")]
RATIOS += [("mu1", "raw"), ("mu1", "md1"), ("mu16", "md16"), ("mu64", "md64"), ("mu64", "ur64")]


async def _uring_many(
    name: str, ring: Ring, path: Path, msg: bytes, n: int, concurrency: int
) -> float:
    c.make_dirs(path)
    md = UringMaildir.open(ring, path)
    enters, wakeups = ring.enters, ring.wakeups
    t0 = time.perf_counter()
    await c.concurrently(n, concurrency, lambda: md.deliver(msg))
    seconds = time.perf_counter() - t0
    md.close()
    PER_DELIVERY.setdefault(name, []).append(
        (
            (ring.enters - enters) / n,
            (ring.wakeups - wakeups) / n,
            md.group.covered / max(1, md.group.syncs),
        )
    )
    return seconds


def _check(path: Path, n: int) -> None:
    new, tmp = os.listdir(path / "new"), os.listdir(path / "tmp")
    if len(new) != n or tmp:
        raise SystemExit(f"{path}: {len(new)} in new/ (want {n}), {len(tmp)} left in tmp/")


async def _one(
    name: str, rings: dict[bool, Ring], path: Path, msg: bytes, n: int
) -> tuple[float, float]:
    """Run contender *name* once; return (deliveries per second, CPU us per delivery)."""
    cpu = time.process_time()
    run: Callable[[], Awaitable[float]]
    if name == "raw":
        seconds = c.raw_many(path, msg, n)
    else:
        conc = CONCURRENCY[name]
        if name.startswith(("md", "mu")):
            backend = "threads" if name.startswith("md") else "uring"
            run = lambda: c.maildrop_many(path, msg, n, conc, backend=backend)  # noqa: E731
        else:
            ring = rings[name.endswith("w")]
            run = lambda: _uring_many(name, ring, path, msg, n, conc)  # noqa: E731
        seconds = await run()
    cpu = time.process_time() - cpu
    _check(
        path, n + name.startswith(("md", "mu"))
    )  # maildrop_many creates its maildir with one more
    return n / seconds, cpu / n * 1e6


async def _main(args: argparse.Namespace) -> None:
    msg = c.message(args.size)
    root = Path(tempfile.mkdtemp(prefix="uring-proto-", dir=args.dir))
    rings = {False: Ring.open(256, slots=1024), True: Ring.open(256, slots=1024, workers=WORKERS)}
    for ring in rings.values():
        ring.attach(asyncio.get_running_loop())
    speed: dict[str, list[float]] = {k: [] for k in NAMES}
    cpu: dict[str, list[float]] = {k: [] for k in NAMES}
    ratios: dict[tuple[str, str], list[float]] = {k: [] for k in RATIOS}
    try:
        for r in range(args.rounds):
            names = args.names or NAMES
            order = names[r % len(names) :] + names[: r % len(names)]
            this: dict[str, float] = {}
            for name in order:
                rate, us = await _one(name, rings, root / f"{name}-{r}", msg, args.n)
                this[name] = rate
                speed[name].append(rate)
                cpu[name].append(us)
            for a, b in RATIOS:
                if a in this and b in this:
                    ratios[(a, b)].append(this[a] / this[b])
            print(
                f"round {r + 1}: " + "  ".join(f"{k} {v:.0f}" for k, v in this.items()), flush=True
            )
    finally:
        for ring in rings.values():
            ring.close()
        if not args.keep:
            shutil.rmtree(root)
    _report(args, speed, cpu, ratios)


def _report(
    args: argparse.Namespace,
    speed: dict[str, list[float]],
    cpu: dict[str, list[float]],
    ratios: dict[tuple[str, str], list[float]],
) -> None:
    med = statistics.median
    print(f"\n{args.n} x {args.size} B per run, {args.rounds} interleaved rounds, medians")
    print(f"{'contender':<10} {'msg/s':>8} {'CPU us/msg':>11}")
    for k in NAMES:
        if speed[k]:
            print(f"{k:<10} {med(speed[k]):>8.0f} {med(cpu[k]):>11.0f}")
    print(f"\n{'ratio':<12} {'median':>7}  per round")
    for (a, b), values in ratios.items():
        if not values:
            continue
        rounds = " ".join(f"{v:.2f}" for v in values)
        print(f"{a + '/' + b:<12} {med(values):>6.2f}x  {rounds}")
    for a, b in (("ur16", "md16"), ("ur64", "md64"), ("mu16", "md16"), ("mu64", "md64")):
        if cpu[a] and cpu[b]:
            print(f"CPU {a}/{b}: {med(cpu[a]) / med(cpu[b]):.2f}x")
    for name, runs in PER_DELIVERY.items():
        enters, wakeups, grouped = (med(r[i] for r in runs) for i in range(3))
        print(
            f"{name}: {enters:.2f} io_uring_enter and {wakeups:.2f} loop wake-ups per"
            f" delivery, {grouped:.1f} deliveries per shared fsync(new/)"
        )


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the comparison and return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-n", type=int, default=1000, help="deliveries per run")
    parser.add_argument("--size", type=int, default=2048, help="message size in bytes")
    parser.add_argument("--dir", default=None, help="where the maildirs go (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the maildirs")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, one round")
    parser.add_argument("--names", nargs="+", choices=NAMES, help="only these contenders")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.n = 1, 20
    state = availability()
    if not state.ok:
        raise SystemExit(f"io_uring is not available here: {state.reason}")
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
