"""Shared helpers of the crash suite: capabilities, child processes, mounts, checks, figures."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ._device import wait_released
from ._msg import parse, scan

HERE = Path(__file__).resolve().parent
CHILD = str(HERE / "child.py")
PY = sys.executable

#: Figures for the README's "Guarantees and how they are tested" (printed after the run).
FIGURES: collections.Counter[str] = collections.Counter()


def is_root() -> bool:
    """Whether this process runs as root."""
    return os.geteuid() == 0


def require_root(what: str) -> None:
    """Skip (with the reason shown by ``pytest -ra``) unless running as root."""
    if not is_root():
        pytest.skip(f"{what} needs root (mounts, namespaces or another uid)")


def require_tool(*tools: str) -> None:
    """Skip unless every one of *tools* is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install strace e2fsprogs xfsprogs)")


def require_strace() -> None:
    """Skip unless strace is installed and may trace here (ptrace can be forbidden)."""
    require_tool("strace")
    probe = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "true"], check=False)
    if probe.returncode:
        pytest.skip("strace cannot trace processes here (ptrace is restricted)")


def serve(
    jobs: Sequence[dict[str, Any]], *, parallel: int = 2, timeout: float = 120
) -> list[dict[str, Any]]:
    """Run *jobs* in forked children of one child.py server; return results in job order."""
    text = "".join(json.dumps(j) + "\n" for j in jobs)
    proc = subprocess.run(
        [PY, CHILD, "serve", str(parallel)],
        input=text, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = {r["id"]: r for r in map(json.loads, proc.stdout.splitlines())}
    return [results[j["id"]] for j in jobs]


def run_child(
    cfg: dict[str, Any], *, prefix: Sequence[str] = (), timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run one job in a fresh interpreter (optionally under *prefix*, e.g. strace)."""
    return subprocess.run(
        [*prefix, PY, CHILD, "run", json.dumps(cfg)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def acks(text: str, marker: str = "ACK") -> dict[str, str]:
    """Return {message id: delivered name} from a child's ack lines."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(" ")
        if parts[0] == marker and len(parts) == 3:
            out[parts[1]] = parts[2]
    return out


def counts(text: str) -> dict[str, int]:
    """Return the per-step call counts a ``count`` job printed."""
    for line in text.splitlines():
        if line.startswith("COUNTS "):
            return dict(json.loads(line[7:]))
    raise AssertionError(f"no COUNTS line in {text!r}")


def check_maildir(
    md: Path, acked: dict[str, str], *, attempted: set[str], existing: dict[str, bytes]
) -> dict[str, str]:
    """Check C1 (all complete), C2 (every ack present under its name) and C4 (old intact).

    Returns {id: relative path} of what is in new/ and cur/.
    """
    found = scan(md)  # C1: raises on any incomplete or duplicated message
    for ident, name in acked.items():
        assert found.get(ident) == f"new/{name}", f"acked {ident} ({name}) lost from {md}"
    stray = set(found) - attempted - {parse(data) for data in existing.values()}
    assert not stray, f"unexpected messages {stray} in {md}"
    for rel, data in existing.items():
        assert (md / rel).read_bytes() == data, f"existing message {rel} changed"
    check_modes(md, root=not existing)
    return found


def check_modes(md: Path, *, root: bool = True) -> None:
    """C5: messages are 0600 and the maildir's directories 0700.

    *root*: the maildir directory itself was created by maildrop (check it too).
    """
    if root and md.is_dir():
        assert stat.S_IMODE(md.stat().st_mode) == 0o700, f"{md} is not 0700"
    for sub in ("tmp", "new", "cur"):
        d = md / sub
        if not d.is_dir():
            continue
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, f"{d} is not 0700"
        for p in d.iterdir():
            mode = stat.S_IMODE(p.lstat().st_mode)
            assert mode == 0o600, f"{p} has mode {mode:o}, not 600"


def killed(result: dict[str, Any]) -> bool:
    """Whether a served job died of SIGKILL."""
    return bool(result["signal"] == signal.SIGKILL)


def mount(*args: str) -> None:
    """Run mount(8), failing the test with its message.

    Retried for a few seconds: after a shutdown, xfs finishes its unmount asynchronously
    and the device reports "already mounted" meanwhile.
    """
    for _ in range(100):
        proc = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
        if proc.returncode == 0 or "already mounted" not in proc.stderr:
            break
        time.sleep(0.05)
    assert proc.returncode == 0, f"mount {' '.join(args)}: {proc.stderr}"


def remount(dev: str, mnt: Path, fstype: str, opts: str) -> None:
    """Unmount and mount again: the journal replay after a shutdown (a power cycle)."""
    umount(mnt)
    wait_released(dev)
    mount("-t", fstype, "-o", opts, dev, str(mnt))
    os.stat(mnt)  # EIO here would mean the old, shut-down filesystem came back


def is_mounted(mnt: Path) -> bool:
    """Whether *mnt* is a mount point (read from mountinfo: a shut-down xfs fails stat)."""
    target = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def umount(mnt: Path) -> None:
    """Unmount *mnt* (lazily as a last resort), never leaving a mount behind."""
    if not is_mounted(mnt):
        return
    proc = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, check=False)
    if proc.returncode:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
    assert not is_mounted(mnt), f"could not unmount {mnt}"
    assert proc.returncode == 0, f"umount {mnt} (done lazily): {proc.stderr}"


MKFS = {
    "ext4": (["mkfs.ext4", "-q", "-F"], 64 << 20, "commit=60"),
    "xfs": (["mkfs.xfs", "-q", "-f"], 320 << 20, "defaults"),
}


@contextlib.contextmanager
def loop_fs(where: Path, fstype: str) -> Iterator[tuple[str, Path, str]]:
    """Make a small *fstype* image on a loop device, mount it; yield (device, mnt, options).

    The loop device is attached once and detached at the end: re-mounting the image file
    with ``-o loop`` races with the asynchronous detach of the previous loop device.
    """
    mkfs, size, opts = MKFS[fstype]
    img, mnt = where / f"{fstype}.img", where / f"{fstype}.mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    with open(img, "wb") as f:
        f.truncate(size)
    proc = subprocess.run([*mkfs, str(img)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        ["losetup", "-f", "--show", str(img)], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        img.unlink()
        pytest.skip(f"no loop device: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    try:
        mount("-t", fstype, "-o", opts, dev, str(mnt))
        assert os.path.ismount(mnt)
        yield dev, mnt, opts
    finally:
        try:
            umount(mnt)
        finally:
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
            img.unlink()
