"""Op order of real io_uring deliveries, judged by the op-order checker from the driver's trace.

fsync(file) or a write with ``RWF_SYNC`` < link < fsync(new/) < ack, per delivery, and no
publish after a failed op: one at a time and concurrent (group commit), small and streamed.
The prototype delivery (``_uring_deliver``) is judged the same way as the backend.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from maildrop._uring import Ring, availability
from maildrop._uring_deliver import UringMaildir

from ._harness import FIGURES
from ._msg import make, scan
from ._oporder import Reap, Submit, check
from ._uring_harness import chunks, require_uring, traced, uring_maildir
from ._uring_trace import Recorder

pytestmark = [pytest.mark.crash, pytest.mark.asyncio]
AVAILABLE = availability()
#: Message sizes: one write with RWF_SYNC; a stream written in one step (one batch, fsync of
#: the file); a stream of several ~1 MiB batches.
SIZES = {"small": 2000, "streamed": 600_000, "large-streamed": 2_500_000}


def _verdict(rec: Recorder, md: Path, acked: dict[str, str], unacked: int = 0) -> None:
    assert rec.checker.violations == []
    assert rec.checker.acked == len(acked) > 0
    # Negative control: the same real trace with every write's RWF_SYNC and every fsync of
    # a file dropped breaks rule 1 for each delivery.
    opens = {e.seq for e in rec.events if isinstance(e, Submit) and e.step.kind == "open"}
    handles = {e.step.handle for e in rec.events if isinstance(e, Submit) and e.step.handle}
    handles = {h for h in handles if h[0] == "s"} | {
        f"f{e.result}" for e in rec.events if isinstance(e, Reap) and e.seq in opens
    }
    files = {e.seq for e in rec.events if isinstance(e, Submit) and e.step.kind == "fsync"
             and e.step.handle in handles}  # fmt: skip
    unsynced = [
        Submit(e.seq, e.step._replace(sync=False)) if isinstance(e, Submit) else e
        for e in rec.events
        if getattr(e, "seq", None) not in files
    ]
    assert len(check(unsynced)) >= len(acked)
    found = scan(md)
    assert len(found) == len(acked) + unacked
    assert {found[i] for i in acked} == {f"new/{n}" for n in acked.values()}
    FIGURES["uring_order_deliveries"] += len(acked)


@pytest.mark.parametrize("concurrency", [1, 16])
@pytest.mark.parametrize("kind", list(SIZES))
async def test_backend_order(tmp_path: Path, concurrency: int, kind: str) -> None:
    """Each delivery of the backend syncs, links, syncs new/ and only then returns."""
    require_uring()
    acked: dict[str, str] = {}
    with traced() as rec:
        md = uring_maildir(tmp_path / "md")
        # The delivery that creates the maildir runs in a thread (the ring never creates a
        # directory); it is not acked, so the checker does not judge it.
        await md.deliver(make("creates-the-maildir", 100))

        async def one(i: int) -> None:
            ident = f"{kind}-{i}"
            data = make(ident, SIZES[kind])
            d = await md.deliver(data if kind == "small" else chunks(data))
            rec.ack(d.name)
            acked[ident] = d.name

        count = concurrency * (3 if kind == "small" else 1)
        sem = asyncio.Semaphore(concurrency)

        async def bounded(i: int) -> None:
            async with sem:
                await one(i)

        await asyncio.gather(*(bounded(i) for i in range(count)))
        if hasattr(md, "aclose"):
            await md.aclose()
    assert rec.ops > 0, "no op went through the ring: the backend did not use io_uring"
    opens = sum(isinstance(e, Submit) and e.step.kind == "open" for e in rec.events)
    if kind != "small" and not opens:
        pytest.skip("the io_uring backend hands streamed messages to its thread pool")
    _verdict(rec, tmp_path / "md", acked, unacked=1)
    if concurrency > 1:
        assert rec.checker.dir_syncs < rec.checker.acked, "no fsync(new/) was shared"


@pytest.mark.skipif(not AVAILABLE.ok, reason=f"io_uring: {AVAILABLE.reason}")
@pytest.mark.parametrize("concurrency", [1, 16])
async def test_prototype_order(tmp_path: Path, concurrency: int) -> None:
    """The phase-1 prototype delivery keeps the same order, alone and under group commit."""
    for sub in ("tmp", "new", "cur"):
        (tmp_path / sub).mkdir(mode=0o700)
    rec = Recorder()
    ring = Ring.open(64, slots=32, hooks=rec)
    ring.attach(asyncio.get_running_loop())
    md = UringMaildir.open(ring, tmp_path)
    acked: dict[str, str] = {}

    async def one(i: int) -> None:
        name = await md.deliver(make(f"p{i}", 2000))
        rec.ack(name)
        acked[f"p{i}"] = name

    try:
        await asyncio.gather(*(one(i) for i in range(concurrency * 2)))
    finally:
        md.close()
        ring.close()
    _verdict(rec, tmp_path, acked)
    assert os.listdir(tmp_path / "tmp") == []
