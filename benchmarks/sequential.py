"""Sequential durable 2 KiB deliveries: maildrop vs the same steps as plain ``os`` calls.

Run: ``python -m benchmarks.sequential [--messages 1000] [--rounds 7]``.

Both contenders deliver the same number of messages into fresh maildirs, interleaved
(A B A B ...), and the script prints each round and the median time ratio. Nothing is
deleted between timed rounds: on ext4 without a journal a bulk delete makes file creation
~30x slower for ~30 s, which would poison the rounds that follow.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from maildrop import Maildir

MSG = b"Subject: bench\n\n" + b"x" * (2048 - 16)


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
        for i in range(n):
            now = time.time_ns() // 1000
            name = f"{now // 1_000_000}.M{now % 1_000_000}P{pid}Q{i}.{host}"
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
    ap.add_argument("--dir", default=None, help="where to make the maildirs (default: a tmp dir)")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="maildrop-bench-", dir=args.dir))
    ratios = []
    raw_t: list[float] = []
    md_t: list[float] = []
    with asyncio.Runner() as runner:
        maildrop_seq(runner, base / "warmup", 50)
        for r in range(args.rounds):
            a = raw_sync(base / f"raw{r}", args.messages)
            b = maildrop_seq(runner, base / f"md{r}", args.messages)
            raw_t.append(a)
            md_t.append(b)
            ratios.append(b / a)
            print(
                f"round {r}: raw {args.messages / a:7.0f} msg/s   maildrop "
                f"{args.messages / b:7.0f} msg/s   time ratio {b / a:.3f}"
            )
    med = statistics.median(ratios)
    print(
        f"median: raw {args.messages / statistics.median(raw_t):.0f} msg/s, maildrop "
        f"{args.messages / statistics.median(md_t):.0f} msg/s; maildrop takes {med:.3f}x "
        "the raw time (target <= 1.25x)"
    )
    print(f"(maildirs left in {base}; not deleted, see the module docstring)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
