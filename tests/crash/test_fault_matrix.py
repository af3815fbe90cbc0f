"""Fault matrix: every syscall step x every call index x six errnos, plus short writes.

Each case fails one call of the delivery through the public ``Syscalls`` table and checks:
the error surfaces with its errno and builtin class, ``outcome()`` maps it right, nothing is
left in ``tmp/``, ``new/`` or ``cur/`` (C3), the existing messages are untouched and no fd
leaks (C4). Scenarios: an existing maildir, a missing one (created on the way), a new
Maildir++ folder, and four concurrent deliveries sharing one ``fsync(new/)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from maildrop import DEFAULT_SYSCALLS, Delivery, Maildir, Syscalls, outcome

from ..conftest import open_fds as fds
from ._harness import FIGURES, check_modes
from ._msg import make, parse, scan

pytestmark = pytest.mark.crash

STEPS = [f.name for f in dataclasses.fields(Syscalls)]
ERRNOS = [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENAMETOOLONG, errno.EACCES]
#: errno -> (temporary, reply prefix, exit status). Local trouble never bounces mail.
EXPECTED = {
    errno.ENOSPC: (True, "452 4.3.1", 75),
    errno.EDQUOT: (True, "452 4.2.2", 75),
    errno.EIO: (True, "451 4.3.0", 75),
    errno.EROFS: (True, "451 4.3.0", 75),
    errno.ENAMETOOLONG: (True, "451 4.3.0", 75),
    errno.EACCES: (True, "451 4.3.0", 75),
}
#: Steps whose failure the engine may absorb: closing a directory fd cannot lose data.
TOLERATED = {"close_dir"}


class Table:
    """A syscall table that counts calls and fails (or shortens) one chosen call."""

    def __init__(self, step: str | None = None, k: int = 0, err: int = 0, short: bool = False):
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.fired = False
        self.step, self.k, self.err, self.short = step, k, err, short

    def table(self) -> Syscalls:
        return DEFAULT_SYSCALLS.replace(**{s: self._wrap(s) for s in STEPS})

    def _wrap(self, step: str) -> Callable[..., Any]:
        real = getattr(DEFAULT_SYSCALLS, step)

        def call(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                n = self.counts[step] = self.counts.get(step, 0) + 1
            if step != self.step or n != self.k:
                return real(*args, **kwargs)
            self.fired = True
            if self.short:
                return _short(step, real, args)
            if step in ("close", "close_dir"):
                real(*args, **kwargs)  # Linux releases the fd even when close() fails
            raise OSError(self.err, f"injected {errno.errorcode[self.err]} in {step}#{n}")

        return call


def _short(step: str, real: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """Perform *step* partially: at most half of what was asked, at least one byte."""
    if step == "write":
        fd, data = args
        return real(fd, memoryview(data)[: max(1, len(data) // 2)])
    if step == "writev":
        fd, bufs = args
        first = memoryview(bufs[0])
        return DEFAULT_SYSCALLS.write(fd, first[: max(1, len(first) // 2)])
    src, dst, count, offset = args
    return real(src, dst, max(1, count // 2), offset)


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 64 * 1024):
        yield data[i : i + 64 * 1024]


SOURCES = {"bytes": 2048, "chunks": 1_200_000, "file": 40_000}


def source(kind: str, data: bytes, where: Path) -> Any:
    """Return *data* as the given kind of source."""
    if kind == "bytes":
        return data
    if kind == "chunks":
        return _chunks(data)
    path = where / "source"
    path.write_bytes(data)
    return open(path, "rb")


class Scenario:
    """Where a delivery goes, prepared anew for each case."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind, self.root = kind, root
        self.existing: dict[Path, bytes] = {}

    async def prepare(self, n: int) -> Maildir:
        md = self.root / f"md{n}"
        self.existing = {}
        if self.kind != "fresh":
            for i in range(2):
                data = make(f"old{i}", 300)
                d = await Maildir(md, fsync=False).deliver(data)
                self.existing[d.path] = data
        return md

    def maildir(self, md: Path, table: Syscalls) -> Maildir:
        m = Maildir(md, syscalls=table)
        return m.folder("Lists.python") if self.kind == "folder" else m

    def target(self, md: Path) -> Path:
        return md / ".Lists.python" if self.kind == "folder" else md


def files(md: Path) -> list[str]:
    """Every message file under *md* (tmp/new/cur of the maildir and of its folders)."""
    return sorted(
        str(p.relative_to(md))
        for p in md.rglob("*")
        if p.parent.name in ("tmp", "new", "cur") and not p.is_dir()
    )


async def one_case(
    scen: Scenario, n: int, kind: str, table: Table, where: Path
) -> BaseException | None:
    """Run one faulty delivery; check C3/C4 on failure and completeness on success."""
    md = await scen.prepare(n)
    before_files = files(md) if md.exists() else []
    data = make(f"case{n}", SOURCES[kind])
    src = source(kind, data, where)
    before_fds = fds()
    try:
        await scen.maildir(md, table.table()).deliver(src)
    except OSError as exc:
        after = files(md) if md.exists() else []
        assert after == before_files, (table.step, table.k, "C3: litter left", after)
        return exc
    finally:
        if kind == "file":
            src.close()
        for path, old in scen.existing.items():
            assert path.read_bytes() == old, "C4: an existing message changed"
        assert fds() - before_fds == set(), (table.step, table.k, "fd leak")
    assert scan(scen.target(md)).get(f"case{n}"), "delivered but not in new/"
    assert not list((scen.target(md) / "tmp").iterdir()), "tmp/ not empty after success"
    check_modes(scen.target(md))
    return None


def check_error(exc: BaseException, table: Table) -> None:
    """The errno, the builtin class and the mapped outcome are the injected error's."""
    err = table.err
    assert isinstance(exc, OSError), (table.step, table.k, exc)
    assert exc.errno == err, (table.step, table.k, exc)
    assert isinstance(exc, type(OSError(err, "x"))), (type(exc), err)
    o = outcome(exc)
    temporary, reply, code = EXPECTED[err]
    assert (o.temporary, o.exit_code) == (temporary, code), (err, o)
    assert o.reply.startswith(reply), o
    assert (o.smtp_code < 500) is temporary, o


@pytest.mark.parametrize("kind", list(SOURCES))
@pytest.mark.parametrize("scenario", ["existing", "fresh", "folder"])
def test_every_step_every_call_every_errno(work: Path, scenario: str, kind: str) -> None:
    """Fail each call of each step with each errno: C3, C4 and the right outcome hold."""

    async def main() -> int:
        scen = Scenario(scenario, work)
        probe = Table()
        assert await one_case(scen, 0, kind, probe, work) is None
        n = cases = 0
        for step, calls in sorted(probe.counts.items()):
            for k in range(1, calls + 1):
                for err in ERRNOS:
                    n += 1
                    table = Table(step, k, err)
                    exc = await one_case(scen, n, kind, table, work)
                    assert table.fired, (step, k)
                    cases += 1
                    if exc is None:
                        assert step in TOLERATED, f"{step}#{k} failed with {err} but delivered"
                    else:
                        check_error(exc, table)
        return cases

    FIGURES["faults_injected"] += asyncio.run(main())


@pytest.mark.parametrize("kind", list(SOURCES))
def test_short_writes_at_every_call(work: Path, kind: str) -> None:
    """Any write, writev or copy_file_range call moving only half its bytes: still complete."""

    async def main() -> int:
        scen = Scenario("existing", work)
        probe = Table()
        await one_case(scen, 0, kind, probe, work)
        cases = 0
        for step in ("write", "writev", "copy_file_range"):
            for k in range(1, probe.counts.get(step, 0) + 1):
                cases += 1
                table = Table(step, k, short=True)
                assert await one_case(scen, cases, kind, table, work) is None
                assert table.fired
        return cases

    FIGURES["short_writes_injected"] += asyncio.run(main())


def test_group_commit_faults(work: Path) -> None:
    """Four concurrent deliveries, any call failing: each fails cleanly or is complete."""

    async def batch(md: Path, table: Table, tag: str) -> list[Delivery | BaseException]:
        m = Maildir(md, syscalls=table.table())
        msgs = [make(f"{tag}-{i}", 3000 * (i + 1)) for i in range(4)]
        return await asyncio.gather(*(m.deliver(x) for x in msgs), return_exceptions=True)

    async def main() -> int:
        probe = Table()
        md0 = work / "g0"
        await Maildir(md0, fsync=False).deliver(make("old", 10))
        await batch(md0, probe, "probe")
        cases = 0
        for step, calls in sorted(probe.counts.items()):
            for k in range(1, calls + 1):
                for err in (errno.EIO, errno.ENOSPC):
                    cases += 1
                    md = work / f"g{cases}"
                    await Maildir(md, fsync=False).deliver(make("old", 10))
                    before_fds = fds()
                    table = Table(step, k, err)
                    results = await batch(md, table, f"c{cases}")
                    assert fds() - before_fds == set(), (step, k)
                    found = scan(md)
                    for i, r in enumerate(results):
                        ident = f"c{cases}-{i}"
                        if isinstance(r, BaseException):
                            check_error(r, table)
                            assert ident not in found, (step, k, "failed but visible")
                        else:
                            assert parse(r.path.read_bytes()) == ident
                    assert not list((md / "tmp").iterdir()), (step, k)
                    assert "old" in found
        return cases

    FIGURES["faults_injected"] += asyncio.run(main())


def test_dir_fsync_is_confirmed_by_fstat(work: Path) -> None:
    """Regression: fsync(new/) answering 0 on a dead filesystem (xfs after a shutdown) is
    caught by the fstat that follows it; the delivery fails and leaves nothing behind."""

    def dead_fstat(fd: int) -> os.stat_result:
        raise OSError(errno.EIO, "filesystem shut down")

    table = DEFAULT_SYSCALLS.replace(fstat=dead_fstat)

    async def main() -> list[Delivery | BaseException]:
        alone = Maildir(work / "alone", syscalls=table)
        with pytest.raises(OSError, match="filesystem shut down") as info:
            await alone.deliver(make("a", 100))
        assert info.value.errno == errno.EIO
        group = Maildir(work / "group", syscalls=table)
        return await asyncio.gather(
            *(group.deliver(make(f"g{i}", 100)) for i in range(4)), return_exceptions=True
        )

    results = asyncio.run(main())
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results), results
    for md in ("alone", "group"):
        assert os.listdir(work / md / "new") == []
        assert os.listdir(work / md / "tmp") == []
