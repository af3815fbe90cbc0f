"""SIGKILL right before and right after every io_uring op of a delivery (the driver's hook).

strace cannot stop a process at an io_uring op, so the child's ring hook does: it kills the
process before the Nth op is submitted (the ops before it have completed: with hooks, the
driver submits a chain one op at a time) or right after the Nth completion is reaped. Each
point runs in its own forked child; the parent checks C1 (complete), C2 (every ack present),
C4 (the existing message untouched) and C5 (modes), then the tmp sweeper removes the litter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ._harness import FIGURES, acks, counts, serve
from ._uring_harness import require_uring
from .test_kill import existing_message, judge_kills

pytestmark = pytest.mark.crash

#: Small messages (one write with RWF_SYNC), a stream written in one step (then fsync(file))
#: and one of two ~1 MiB batches.
PLAN = [["bytes", 300], ["chunks", 600_000], ["chunks", 1_200_000], ["bytes", 9000]]


def count_ops(work: Path, base: dict[str, Any], fresh: bool) -> int:
    """Run the plan once, undisturbed; return how many ops its ring ran."""
    probe = work / "probe"
    if not fresh:
        existing_message(probe)
    (res,) = serve([{**base, "id": "count", "md": str(probe), "count": True}])
    assert res["status"] == 0, res
    assert len(acks(res["acks"])) == len(PLAN), res
    ops = counts(res["acks"])["ops"]
    if base.get("api") == "many" and ops < 4 * len(PLAN):
        pytest.skip(f"deliver_many ran {ops} ops on the ring: it runs in the thread pool")
    assert ops >= 4 * len(PLAN), f"only {ops} ops for {len(PLAN)} deliveries"
    return ops


@pytest.mark.parametrize(
    ("fresh", "extra"),
    [(True, {}), (False, {}), (False, {"concurrency": 3}), (True, {"api": "many"})],
    ids=["fresh-maildir", "existing-maildir", "concurrent", "deliver_many"],
)
def test_uring_sigkill_before_and_after_every_op(
    work: Path, fresh: bool, extra: dict[str, Any]
) -> None:
    """Killed around any op of the ring: complete messages only, every ack kept (C1 C2 C4)."""
    require_uring()
    base = {"plan": PLAN, "scratch": str(work), "backend": "uring", **extra}
    ops = count_ops(work, base, fresh)
    jobs: list[dict[str, Any]] = []
    existing: dict[str, dict[str, bytes]] = {}
    for n in range(ops):
        for when in ("before", "after"):
            i = len(jobs)
            md = work / f"m{i}"
            existing[str(md)] = {} if fresh else existing_message(md)
            hook = {f"stop_{when}": n}
            job = {"id": f"{when}:{n}", "md": str(md), "tag": f"j{i}", "uring": hook}
            jobs.append({**base, **job})
    results = serve(jobs)
    # Concurrent deliveries interleave their ops differently from run to run: the last few
    # op numbers may not be reached.
    swept, missed = judge_kills(jobs, results, existing, PLAN, unreached_ok="concurrency" in extra)
    assert swept > 0, "no crash point left litter in tmp/: the crash points miss the write"
    assert missed <= len(jobs) // 10, f"{missed} of {len(jobs)} crash points never reached"
    # Killed before the first op, nothing was acked.
    assert len(acks(results[0]["acks"])) == 0
    FIGURES["uring_crash_points"] += len(jobs) - missed
    FIGURES["uring_acked_after_crash"] += sum(len(acks(r["acks"])) for r in results)
