"""Measure the io_uring floor for a lone durable delivery: the ring's ops alone against raw.

``python -m benchmarks.uring_floor [--rounds 5] [-n 1000] [--dir DIR] [--spin 20,50,...]``
delivers 2 KiB messages one at a time, with no maildrop engine, in these ways, rounds
interleaved:

- ``raw``: the synchronous steps (open ``tmp/`` and ``new/``, create, write, fsync, link,
  unlink, close, fsync ``new/``);
- ``block``: the same as two ring round trips (the create, then write with ``RWF_SYNC`` ->
  link from ``/proc/self/fd`` -> unlink -> close -> fsync ``new/``), waiting in
  ``io_uring_enter`` itself;
- ``loop2``: those round trips from an asyncio loop, through the ring's eventfd;
- ``loop3``: the same with ``tmp/`` and ``new/`` opened on the ring with the create;
- ``loop2spinN`` (one per ``--spin`` budget N, in µs): ``loop2`` on a loop whose selector,
  before it would sleep with ring ops in flight, polls the mmapped completion queue (no
  system call) for up to N µs and reaps what shows up there, so the loop does not sleep in
  ``epoll_wait`` for a completion that comes within the budget (:class:`SpinSelector`).

It prints each contender's median msg/s and the median of its per-round ratios to ``raw``
(what the engine's c=1 cannot beat with this op sequence, ``benchmarks/README.md``); per
delivery, the median delivery's time, process CPU (io-wq's workers included) and voluntary
context switches; the time the hypervisor stole from the VM in a round; for the spinning
ones, how often a poll found a completion.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import selectors
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from maildrop import _uring_abi as abi
from maildrop import _uring_ops as ops
from maildrop._uring import Ring

FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DATA = b"x" * 2048
KINDS = ("raw", "block", "loop2", "loop3")
SPINS = (20, 50, 100, 200)


class SpinSelector(selectors.EpollSelector):
    """An epoll selector that polls a ring's completion queue before it would sleep.

    The stock asyncio loop takes a selector (``SelectorEventLoop(selector)``): the loop
    calls ``select(timeout)`` with ``timeout`` 0 when callbacks are ready, so a loop with
    other work never polls. Otherwise, while the ring has ops in flight, it reads the
    completion queue's tail (mmapped: no system call) for up to *budget* seconds (or the
    timeout, if shorter); a completion found there is reaped at once, and the loop then
    only looks at its fds (``select(0)``). The eventfd the kernel writes just after
    posting that completion makes one more, empty, reap later: it never loses one.
    """

    def __init__(self, budget: float) -> None:
        super().__init__()
        self.budget = budget
        self.ring: Ring | None = None
        self.polls = self.hits = 0

    def select(self, timeout: float | None = None) -> list[Any]:
        """Poll the ring's completions first when the loop would sleep; then select."""
        ring = self.ring
        if ring is not None and (timeout is None or timeout > 0) and ring._inflight:
            budget = self.budget if timeout is None else min(self.budget, timeout)
            self.polls += 1
            if _poll(ring, budget):
                self.hits += 1
                ring.reap()
                timeout = 0
        return super().select(timeout)


def _poll(ring: Ring, budget: float) -> bool:
    """Return True once *ring*'s completion queue holds an entry, False after *budget* s."""
    # The driver's own fields (a benchmark's liberty): its reaped head, the kernel's tail.
    tail, clock = ring._cq_ktail, time.perf_counter
    head, end = ring._cq_head, clock() + budget
    while tail.value == head:
        if clock() >= end:
            return False
    return True


def _maildir(parent: str) -> str:
    path = tempfile.mkdtemp(dir=parent)
    for sub in ("tmp", "new", "cur"):
        os.mkdir(os.path.join(path, sub))
    return path


def _raw(path: str, i: int) -> None:
    tmp, new = os.open(f"{path}/tmp", DIR_FLAGS), os.open(f"{path}/new", DIR_FLAGS)
    name = f"r{i}"
    fd = os.open(name, FLAGS, 0o600, dir_fd=tmp)
    os.write(fd, DATA)
    os.fsync(fd)
    os.link(name, name, src_dir_fd=tmp, dst_dir_fd=new)
    os.unlink(name, dir_fd=tmp)
    os.close(fd)
    os.fsync(new)
    os.close(tmp)
    os.close(new)


def _chain(tmp: int, new: int, fd: int, name: bytes) -> list[ops.Op]:
    proc = b"/proc/self/fd/%d" % fd
    return [
        ops.write(fd, DATA, offset=0, rw_flags=abi.RWF_SYNC),
        ops.linkat(abi.AT_FDCWD, proc, new, name, abi.AT_SYMLINK_FOLLOW),
        ops.unlinkat(tmp, name),
        ops.close(fd),
        ops.fsync(new),
    ]


def _checked(results: list[int]) -> None:
    if min(results) < 0:
        raise OSError(-min(results), os.strerror(-min(results)))


def _block(ring: Ring, path: str, i: int) -> None:
    tmp, new = os.open(f"{path}/tmp", DIR_FLAGS), os.open(f"{path}/new", DIR_FLAGS)
    name = b"b%d" % i
    (fd,) = ring.run([ops.openat2(tmp, name, FLAGS, 0o600, resolve=abi.RESOLVE_BENEATH)])
    _checked([fd])
    _checked(ring.run(_chain(tmp, new, fd, name)))
    os.close(tmp)
    os.close(new)


async def _on_loop(ring: Ring, path: str, i: int, dirs_on_ring: bool) -> None:
    name = b"a%d" % i
    if dirs_on_ring:
        where = path.encode()
        opened = [
            ops.openat2(abi.AT_FDCWD, where + sub, flags, mode, resolve=abi.RESOLVE_NO_SYMLINKS)
            for sub, flags, mode in (
                (b"/tmp", DIR_FLAGS, 0),
                (b"/new", DIR_FLAGS, 0),
                (b"/tmp/" + name, FLAGS, 0o600),
            )
        ]
        done: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        ring.queue(opened, done.set_result, linked=False)
        tmp, new, fd = await done
    else:
        tmp, new = os.open(f"{path}/tmp", DIR_FLAGS), os.open(f"{path}/new", DIR_FLAGS)
        (fd,) = await ring.submit(
            [ops.openat2(tmp, name, FLAGS, 0o600, resolve=abi.RESOLVE_BENEATH)]
        )
    _checked([tmp, new, fd])
    _checked(await ring.submit(_chain(tmp, new, fd, name)))
    os.close(tmp)
    os.close(new)


async def _loop_round(
    path: str, n: int, dirs_on_ring: bool, spin: SpinSelector | None, took: list[float]
) -> None:
    clock = time.perf_counter
    with Ring.open(slots=0) as ring:
        ring.attach(asyncio.get_running_loop())
        if spin is not None:
            spin.ring = ring
        for i in range(n):
            started = clock()
            await _on_loop(ring, path, i, dirs_on_ring)
            took.append(clock() - started)
        if spin is not None:
            spin.ring = None


def _on_a_loop(path: str, n: int, kind: str, took: list[float]) -> float:
    spin = SpinSelector(int(kind[9:]) / 1e6) if kind.startswith("loop2spin") else None
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(spin)) as runner:
        runner.run(_loop_round(path, n, kind == "loop3", spin, took))
    return spin.hits / max(spin.polls, 1) if spin is not None else 0.0


def _blocking(path: str, n: int, kind: str, took: list[float]) -> float:
    clock = time.perf_counter
    with contextlib.ExitStack() as stack:
        ring = stack.enter_context(Ring.open(slots=0)) if kind == "block" else None
        for i in range(n):
            started = clock()
            if ring is None:
                _raw(path, i)
            else:
                _block(ring, path, i)
            took.append(clock() - started)
    return 0.0


def _steal() -> int:
    """Return the VM's stolen time so far (``/proc/stat``, all CPUs, in clock ticks)."""
    with open("/proc/stat", encoding="ascii") as f:
        return int(f.readline().split()[8])


@dataclass
class Round:
    """One round of one contender."""

    speed: float  # msg/s
    cpu: float  # process CPU seconds per delivery
    switches: float  # voluntary context switches per delivery
    hits: float  # the share of polls that found a completion (loop2spin*)
    median: float  # the median delivery's seconds
    steal: float  # seconds the hypervisor took from the VM's CPUs


def one_round(kind: str, parent: str, n: int) -> Round:
    """Deliver *n* messages the *kind* way into a fresh maildir under *parent*."""
    path = _maildir(parent)
    took: list[float] = []
    steal, cpu = _steal(), time.process_time()
    switches = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    hits = (_on_a_loop if kind.startswith("loop") else _blocking)(path, n, kind, took)
    return Round(
        speed=n / sum(took),
        cpu=(time.process_time() - cpu) / n,
        switches=(resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - switches) / n,
        hits=hits,
        median=statistics.median(took),
        steal=(_steal() - steal) / os.sysconf("SC_CLK_TCK"),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-n", type=int, default=1000, help="messages per round")
    parser.add_argument("--dir", default=None, help="where the maildirs go (default: /tmp)")
    parser.add_argument(
        "--spin",
        default=",".join(map(str, SPINS)),
        help="loop2spin poll budgets in µs, comma-separated ('' for none)",
    )
    args = parser.parse_args(argv)
    kinds = KINDS + tuple(f"loop2spin{b}" for b in args.spin.split(",") if b)
    parent = tempfile.mkdtemp(dir=args.dir)
    got: dict[str, list[Round]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            got[kind].append(one_round(kind, parent, args.n))
    raw = [r.speed for r in got["raw"]]
    for kind, rounds in got.items():

        def median(field: str, rounds: list[Round] = rounds) -> float:
            return float(statistics.median(getattr(r, field) for r in rounds))

        ratios = [r.speed / b for r, b in zip(rounds, raw, strict=True)]
        print(
            f"{kind:13s} {median('speed'):6.0f} msg/s, {statistics.median(ratios):.2f}x raw;"
            f" per delivery: median {median('median') * 1e6:4.0f} µs,"
            f" CPU {median('cpu') * 1e6:4.0f} µs, {median('switches'):4.1f} switches;"
            f" steal {median('steal') * 1e3:3.0f} ms"
            + (f"; {median('hits'):.0%} of polls hit" if kind.startswith("loop2spin") else "")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
