"""Real disk-full: a 1 MiB tmpfs, and one with 16 inodes, in a private mount namespace.

The child mounts the tmpfs itself inside ``unshare -m --propagation private`` (so nothing
outlives it), asserts the mount happened and caps the bytes it writes. It delivers until a
delivery fails; the failure must be a temporary ENOSPC (452 4.3.1, exit 75) that leaves
nothing in tmp/ and only complete messages in new/ (C1, C3); once one message is deleted,
the next delivery succeeds.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from ._harness import CHILD, FIGURES, PY, require_root, require_tool
from ._uring_harness import require_uring

pytestmark = pytest.mark.crash


@pytest.mark.parametrize(
    ("opts", "size", "at_least"),
    [
        ("size=1m", 100_000, 5),
        ("size=1m,nr_inodes=16", 200, 5),
        ("size=4m", 1_500_000, 2),  # messages of two batches: streamed, on the ring too
    ],
    ids=["1MiB", "16-inodes", "4MiB-streamed"],
)
@pytest.mark.parametrize("backend", ["threads", "uring"])
def test_real_disk_full(work: Path, opts: str, size: int, at_least: int, backend: str) -> None:
    """Fill a real tmpfs: temporary ENOSPC, no litter, and delivery resumes after a delete."""
    require_root("mounting a tmpfs")
    require_tool("unshare", "mount")
    if backend == "uring":
        require_uring()
    mnt = work / "full"
    mnt.mkdir()
    cfg = {
        "dir": str(mnt), "opts": opts, "size": size, "cap": 8 << 20,
        "host_mnt_ns": os.readlink("/proc/self/ns/mnt"), "backend": backend,
    }  # fmt: skip
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", PY, CHILD, "fill", json.dumps(cfg)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert "error" not in out, out
    assert out["delivered"] >= at_least, out
    assert out["errno"] == errno.ENOSPC, out
    assert out["temporary"], out
    assert out["reply"].startswith("452 4.3.1"), out
    assert out["exit_code"] == 75, out
    assert out["tmp_after_failure"] == [], out  # C3
    assert out["complete"] == out["delivered"], out  # C1: nothing partial, nothing lost
    assert out["after_delete"], out
    assert out["complete_at_end"] == out["delivered"], out
    assert not any(mnt.iterdir()), "the tmpfs leaked out of its mount namespace"
    FIGURES["disk_full_rounds" if backend == "threads" else "uring_disk_full_rounds"] += 1
