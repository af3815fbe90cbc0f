"""Sequential durable 2 KiB deliveries: maildrop vs the same steps as plain ``os`` calls.

Run: ``python -m benchmarks.sequential [--messages 1000] [--rounds 7]``.

Both contenders deliver the same number of messages into fresh maildirs, interleaved
(A B A B ...), and the script prints each round and the median time ratio. Each round is cut
into ``--slices`` slices (default 10): A and B alternate every ``messages / slices``
deliveries, so both see the same moments of a machine whose speed drifts by 2-5x within
seconds (a shared VM); a round's time is the sum of its slices. Nothing is
deleted between timed rounds: on ext4 without a journal a bulk delete makes file creation
~30x slower for ~30 s, which would poison the rounds that follow.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from maildrop import Maildir

from ._contenders import Handoff, raw_hop_many, raw_pool_many

MSG = b"Subject: bench\n\n" + b"x" * (2048 - 16)
_seq = itertools.count()


def raw_sync(path: Path, n: int) -> float:
    """Deliver *n* messages with plain os calls (create, write, fsync, link, unlink, fsync
    new/) one at a time; return the seconds taken."""
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    pid = os.getpid()
    t0 = time.perf_counter()
    newfd = os.open(path / "new", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(n):
            now = time.time_ns() // 1000
            name = f"{now // 1_000_000}.M{now % 1_000_000}P{pid}Q{next(_seq)}.{host}"
            tmp = f"{path}/tmp/{name}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, MSG)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, f"{path}/new/{name}")
            os.unlink(tmp)
            os.fsync(newfd)
    finally:
        os.close(newfd)
    return time.perf_counter() - t0


def maildrop_seq(runner: asyncio.Runner, path: Path, n: int) -> float:
    """Deliver *n* messages one after another with ``await Maildir.deliver``."""
    md = Maildir(path)

    async def run() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await md.deliver(MSG)
        return time.perf_counter() - t0

    return runner.run(run())


def main(argv: list[str] | None = None) -> int:
    """Run the interleaved rounds and print the median ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--slices", type=int, default=10, help="A/B alternations per round")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also time the raw steps handed to a thread one message at a time (no asyncio:"
        " the floor for any design that keeps the disk work off the event loop's thread) and"
        " through one hop of maildrop's asyncio pool (the floor on asyncio)",
    )
    ap.add_argument("--dir", default=None, help="where to make the maildirs (default: a tmp dir)")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="maildrop-bench-", dir=args.dir))
    ratios = []
    raw_t: list[float] = []
    md_t: list[float] = []
    floor_t: list[float] = []
    pool_t: list[float] = []
    handoff = Handoff() if args.floor else None
    with asyncio.Runner() as runner:
        maildrop_seq(runner, base / "warmup", 50)
        per = max(1, args.messages // max(1, args.slices))
        for r in range(args.rounds):
            a = b = f = q = 0.0
            for s in range(args.messages // per):
                if handoff is not None:
                    f += raw_hop_many(handoff, base / f"floor{r}", MSG, per)
                    q += runner.run(raw_pool_many(base / f"pool{r}", MSG, per))
                if (r + s) % 2:
                    b += maildrop_seq(runner, base / f"md{r}", per)
                    a += raw_sync(base / f"raw{r}", per)
                else:
                    a += raw_sync(base / f"raw{r}", per)
                    b += maildrop_seq(runner, base / f"md{r}", per)
            raw_t.append(a)
            md_t.append(b)
            ratios.append(b / a)
            extra = ""
            if handoff is not None:
                floor_t.append(f)
                pool_t.append(q)
                extra = f"   floors: thread {f / a:.3f}x, asyncio pool {q / a:.3f}x raw time"
            print(
                f"round {r}: raw {args.messages / a:7.0f} msg/s   maildrop "
                f"{args.messages / b:7.0f} msg/s   time ratio {b / a:.3f}{extra}"
            )
    med = statistics.median(ratios)
    print(
        f"median: raw {args.messages / statistics.median(raw_t):.0f} msg/s, maildrop "
        f"{args.messages / statistics.median(md_t):.0f} msg/s; maildrop takes {med:.3f}x "
        "the raw time (target <= 1.25x)"
    )
    if floor_t:
        fmed = statistics.median(f / a for f, a in zip(floor_t, raw_t, strict=True))
        qmed = statistics.median(q / a for q, a in zip(pool_t, raw_t, strict=True))
        print(
            f"floors: raw steps with one thread handoff per message (no asyncio) {fmed:.3f}x, "
            f"raw steps with one hop of maildrop's asyncio pool {qmed:.3f}x the raw time"
        )
    print(f"(maildirs left in {base}; not deleted, see the module docstring)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
