"""Write once, deliver to many: ``deliver_many`` to 10 maildirs vs 10 separate deliveries.

Run: ``python -m benchmarks.many [--messages 10] [--targets 10] [--size 102400] [--rounds 7]``.

Each round delivers the same messages with both contenders, interleaved (A B, then B A in
the next round), into fresh maildirs of the same root filesystem: ``deliver_many`` streams
each message once and hard-links it into every maildir; the baseline awaits
``Maildir.deliver`` once per maildir (create, write, fsync, link, fsync new/ each time).
The script prints each round and the median time ratio (target: deliver_many >= 3x faster
for 100 KiB). Nothing is deleted between timed rounds: on ext4 without a journal a bulk
delete makes file creation ~30x slower for ~30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from maildrop import Maildir, deliver_many


def message(size: int, seed: int) -> bytes:
    """Return a message of *size* bytes that differs by *seed*."""
    head = f"Subject: bench {seed}\n\n".encode()
    return head + bytes((seed + i) % 251 for i in range(251)) * (size // 251 + 1)


async def many(mds: list[Maildir], msgs: list[bytes]) -> float:
    """Deliver every message to every maildir with deliver_many; return seconds."""
    t0 = time.perf_counter()
    for m in msgs:
        for r in await deliver_many(m, mds):
            if isinstance(r, Exception):
                raise r
    return time.perf_counter() - t0


async def separate(mds: list[Maildir], msgs: list[bytes]) -> float:
    """Deliver every message to every maildir, one Maildir.deliver per target."""
    t0 = time.perf_counter()
    for m in msgs:
        for md in mds:
            await md.deliver(m)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Run the interleaved rounds and print the median ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=10)
    ap.add_argument("--targets", type=int, default=10)
    ap.add_argument("--size", type=int, default=100 * 1024)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dir", default=None, help="where to make the maildirs (default: a tmp dir)")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="maildrop-many-", dir=args.dir))
    msgs = [message(args.size, i)[: args.size] for i in range(args.messages)]

    def boxes(tag: str) -> list[Maildir]:
        # Made before timing: both contenders measure delivery, not maildir creation.
        for i in range(args.targets):
            for sub in ("tmp", "new", "cur"):
                (base / tag / f"box{i}" / sub).mkdir(parents=True)
        return [Maildir(base / tag / f"box{i}") for i in range(args.targets)]

    ratios: list[float] = []
    many_t: list[float] = []
    sep_t: list[float] = []
    with asyncio.Runner() as runner:
        runner.run(many(boxes("warm-a"), msgs[:2]))
        runner.run(separate(boxes("warm-b"), msgs[:2]))
        for r in range(args.rounds):
            order = [("many", many), ("separate", separate)]
            if r % 2:
                order.reverse()
            got: dict[str, float] = {}
            for name, fn in order:
                got[name] = runner.run(fn(boxes(f"{name}{r}"), msgs))
            many_t.append(got["many"])
            sep_t.append(got["separate"])
            ratios.append(got["separate"] / got["many"])
            print(
                f"round {r}: deliver_many {got['many'] * 1000:8.1f} ms   separate "
                f"{got['separate'] * 1000:8.1f} ms   speed-up {ratios[-1]:.2f}x"
            )
    n = args.messages
    print(
        f"median of {args.rounds} rounds, {n} messages of {args.size} bytes to {args.targets} "
        f"maildirs: deliver_many {statistics.median(many_t) / n * 1000:.2f} ms/message, "
        f"separate {statistics.median(sep_t) / n * 1000:.2f} ms/message; deliver_many is "
        f"{statistics.median(ratios):.2f}x faster (target >= 3x)"
    )
    print(f"(maildirs left in {base}; not deleted, see the module docstring)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
