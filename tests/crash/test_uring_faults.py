"""Fault matrix of the io_uring backend: the Nth op's result turned into an error or a short write.

The ring's hook replaces the Nth op's completion with ``-ENOSPC``, ``-EDQUOT``, ``-EIO`` or
``-EROFS`` (the op does not run: a nop takes its place, and the chain is severed where the
kernel would sever it), or makes the Nth write really write half its bytes. Each case must
end as the thread backend's does (``test_fault_matrix``): the error with its errno, builtin
class and ``outcome()``, nothing left in ``tmp/`` or ``new/``, the existing messages
untouched, no fd leaked; a short write still delivers the whole message.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest

from maildrop import Delivery
from maildrop._uring_hooks import Script

from ..conftest import open_fds as fds
from ._harness import FIGURES, check_modes
from ._msg import make, parse, scan
from ._oporder import Submit
from ._uring_harness import chunks, require_uring, traced, uring_maildir
from ._uring_trace import Recorder
from .test_fault_matrix import EXPECTED, Table, check_error

pytestmark = pytest.mark.crash

ERRNOS = [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS]
#: A small message, a stream written in one step, a stream of several ~1 MiB batches.
SOURCES = {"bytes": 2048, "chunks": 600_000, "large-chunks": 1_200_000}
#: Ops whose failure cannot lose or expose mail: releasing a slot or fd that is done with.
TOLERATED = {"close"}


def _source(kind: str, data: bytes) -> Any:
    return data if kind == "bytes" else chunks(data)


async def _settled(md: Path, before: list[str]) -> list[str]:
    """Return the message files under *md* once background cleanup had up to 2 s to run."""
    for _ in range(400):
        now = _files(md)
        if now == before:
            break
        await asyncio.sleep(0.005)
    return now


def _files(md: Path) -> list[str]:
    return sorted(
        str(p.relative_to(md)) for sub in ("tmp", "new", "cur") for p in (md / sub).glob("*")
    )


class Cases:
    """Fresh maildirs with one old message each, numbered, under *root*."""

    def __init__(self, root: Path, rec: Recorder) -> None:
        self.root, self.rec, self.n, self.mark = root, rec, 0, 0

    async def maildir(self) -> tuple[Path, Any, dict[Path, bytes]]:
        self.n += 1
        path = self.root / f"md{self.n}"
        self.rec.arm(Script())
        md = uring_maildir(path)
        old = make(f"old{self.n}", 300)
        d = await md.deliver(old)
        return path, md, {d.path: old}

    async def one(self, kind: str, script: Script) -> tuple[BaseException | None, Path]:
        """Deliver one message with *script* armed; check C3/C4, fds and modes."""
        path, md, existing = await self.maildir()
        before, before_fds = _files(path), fds()
        self.rec.arm(script)
        self.mark = len(self.rec.events)  # where this delivery's ops start in the trace
        ident = f"case{self.n}"
        try:
            got = await md.deliver(_source(kind, make(ident, SOURCES[kind])))
        except OSError as exc:
            after = await _settled(path, before)
            assert after == before, ("C3: litter left", script.inject, after)
            return exc, path
        finally:
            self.rec.arm(Script())
            for p, data in existing.items():
                assert p.read_bytes() == data, "C4: an existing message changed"
            assert fds() - before_fds == set(), ("fd leak", script.inject)
        assert scan(path).get(ident), "delivered but not in new/"
        want = sorted([*before, f"new/{got.name}"])
        assert await _settled(path, want) == want, "C3: litter left after a delivery"
        check_modes(path)
        return None, path


async def _probe(cases: Cases, kind: str) -> tuple[list[Any], int]:
    """Deliver once undisturbed; return its ops and the number of its first file-creating open.

    Skips where the delivery never created its file on the ring (the backend handed it to
    its thread pool): there is no ring fault to inject then.
    """
    assert (await cases.one(kind, Script()))[0] is None
    steps = [e.step for e in cases.rec.events[cases.mark :] if isinstance(e, Submit)]
    first = next((k for k, s in enumerate(steps) if s.kind == "open"), None)
    if first is None:
        pytest.skip("the io_uring backend hands this kind of source to its thread pool")
    return steps, first


@pytest.mark.parametrize("kind", list(SOURCES))
def test_uring_every_op_every_errno(work: Path, kind: str) -> None:
    """Any op of a delivery failing with any of four errnos: the thread backend's outcome."""
    require_uring()

    async def main() -> int:
        with traced() as rec:
            cases = Cases(work, rec)
            steps, first = await _probe(cases, kind)
            injected = 0
            for k, step in enumerate(steps):
                for err in ERRNOS:
                    exc, _ = await cases.one(kind, Script(inject={k: -err}))
                    injected += 1
                    if exc is None:
                        # Before the file exists, a failure hands the whole step to the thread
                        # pool, which does it again (and fails there if the fault is real).
                        tolerated = k < first or step.kind in TOLERATED
                        assert tolerated, f"op {k} ({step.kind}) failed but delivered"
                    else:
                        check_error(exc, Table(step.kind, k, err))
            return injected

    FIGURES["uring_faults_injected"] += asyncio.run(main())


@pytest.mark.parametrize("kind", list(SOURCES))
def test_uring_short_write_at_every_write(work: Path, kind: str) -> None:
    """Any write of the ring moving only half its bytes: the message still lands whole."""
    require_uring()

    async def main() -> int:
        with traced() as rec:
            cases = Cases(work, rec)
            steps, _ = await _probe(cases, kind)
            writes = [(k, s.length) for k, s in enumerate(steps) if s.kind == "write"]
            assert writes, steps
            for k, length in writes:
                exc, _ = await cases.one(kind, Script(inject={k: max(1, length // 2)}))
                assert exc is None, (k, exc)
            return len(writes)

    FIGURES["uring_short_writes_injected"] += asyncio.run(main())


def test_uring_group_commit_faults(work: Path) -> None:
    """Four concurrent deliveries, any op failing: each fails cleanly or is complete."""
    require_uring()

    async def batch(md: Any, tag: str) -> list[Delivery | BaseException]:
        msgs = [make(f"{tag}-{i}", 3000 * (i + 1)) for i in range(4)]
        return await asyncio.gather(*(md.deliver(x) for x in msgs), return_exceptions=True)

    async def main() -> int:
        with traced() as rec:
            cases = Cases(work, rec)
            _, md, _ = await cases.maildir()
            rec.arm(Script())
            assert not any(isinstance(r, BaseException) for r in await batch(md, "probe"))
            ops, injected = rec.ops, 0
            for k in range(ops):
                for err in (errno.EIO, errno.ENOSPC):
                    path, md, _ = await cases.maildir()
                    before_fds = fds()
                    rec.arm(Script(inject={k: -err}))
                    results = await batch(md, f"c{cases.n}")
                    rec.arm(Script())
                    injected += 1
                    found = scan(path)
                    for i, r in enumerate(results):
                        ident = f"c{cases.n}-{i}"
                        if isinstance(r, BaseException):
                            check_error(r, Table("op", k, err))
                            assert ident not in found, (k, "failed but visible")
                        else:
                            assert parse(r.path.read_bytes()) == ident
                    tmp = await _settled(path, [f for f in _files(path) if f[:4] != "tmp/"])
                    assert not [f for f in tmp if f.startswith("tmp/")], (k, err, tmp)
                    assert fds() - before_fds == set(), (k, "fd leak")
            return injected

    FIGURES["uring_faults_injected"] += asyncio.run(main())


def test_expected_outcomes_cover_every_injected_errno() -> None:
    """Every errno the io_uring matrix injects has the thread matrix's expected outcome."""
    assert set(ERRNOS) <= set(EXPECTED)
