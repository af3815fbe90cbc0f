"""Measure the io_uring floor for a lone durable delivery: the ring's ops alone against raw.

``python -m benchmarks.uring_floor [--rounds 5] [-n 1000] [--dir DIR]`` delivers 2 KiB
messages one at a time, with no maildrop engine, in four ways, rounds interleaved:

- ``raw``: the synchronous steps (open ``tmp/`` and ``new/``, create, write, fsync, link,
  unlink, close, fsync ``new/``);
- ``block``: the same as two ring round trips (the create, then write with ``RWF_SYNC`` ->
  link from ``/proc/self/fd`` -> unlink -> close -> fsync ``new/``), waiting in
  ``io_uring_enter`` itself;
- ``loop2``: those round trips from an asyncio loop, through the ring's eventfd;
- ``loop3``: the same with ``tmp/`` and ``new/`` opened on the ring with the create.

It prints each contender's median msg/s and the median of its per-round ratios to ``raw``:
what the engine's c=1 cannot beat with this op sequence (``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

from maildrop import _uring_abi as abi
from maildrop import _uring_ops as ops
from maildrop._uring import Ring

FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DATA = b"x" * 2048
KINDS = ("raw", "block", "loop2", "loop3")


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


async def _loop_round(path: str, n: int, dirs_on_ring: bool) -> float:
    with Ring.open(slots=0) as ring:
        ring.attach(asyncio.get_running_loop())
        started = time.perf_counter()
        for i in range(n):
            await _on_loop(ring, path, i, dirs_on_ring)
        return n / (time.perf_counter() - started)


def one_round(kind: str, parent: str, n: int) -> float:
    """Deliver *n* messages the *kind* way into a fresh maildir under *parent*; msg/s."""
    path = _maildir(parent)
    if kind.startswith("loop"):
        return asyncio.run(_loop_round(path, n, kind == "loop3"))
    ring = Ring.open(slots=0) if kind == "block" else None
    try:
        started = time.perf_counter()
        for i in range(n):
            if ring is None:
                _raw(path, i)
            else:
                _block(ring, path, i)
        return n / (time.perf_counter() - started)
    finally:
        if ring is not None:
            ring.close()


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-n", type=int, default=1000, help="messages per round")
    parser.add_argument("--dir", default=None, help="where the maildirs go (default: /tmp)")
    args = parser.parse_args(argv)
    parent = tempfile.mkdtemp(dir=args.dir)
    speeds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(args.rounds):
        for kind in KINDS:
            speeds[kind].append(one_round(kind, parent, args.n))
    for kind, got in speeds.items():
        ratios = [a / b for a, b in zip(got, speeds["raw"], strict=True)]
        print(
            f"{kind:6s} {statistics.median(got):8.0f} msg/s"
            f"  vs raw {statistics.median(ratios):.2f}x (median of per-round ratios)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
