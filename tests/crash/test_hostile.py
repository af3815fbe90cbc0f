"""Hostile mailboxes: symlinked tmp/, new/ and folders, planted names, a swapped tmp file,
traversal-shaped folder names and hostnames with ``/``, ``:`` and NUL.

The symlink games run as an unprivileged user (uid 65534: root would bypass the permission
checks an attacker faces) who owns both the maildir and a canary directory, so following a
symlink would succeed. The canary must stay untouched, the engine must open nothing outside
the maildir (checked on an ``strace -y`` trace), and each delivery either lands inside the
maildir or fails (C6).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maildrop import InvalidFolderNameError, Maildir

from ._harness import (
    CHILD,
    FIGURES,
    PY,
    acks,
    is_root,
    require_root,
    require_strace,
    require_tool,
)
from ._msg import make, parse

pytestmark = pytest.mark.crash

NOBODY = 65534


def snapshot(d: Path, *, links_too: bool = True) -> dict[str, Any]:
    """Names, types, sizes, hashes (and inode data) of everything under *d*."""
    out: dict[str, Any] = {}
    for p in sorted(d.rglob("*")):
        st_ = p.lstat()
        entry: list[Any] = [st_.st_mode, st_.st_size, st_.st_mtime_ns]
        if p.is_file() and not p.is_symlink():
            entry.append(hashlib.sha256(p.read_bytes()).hexdigest())
        if links_too:
            entry += [st_.st_nlink, st_.st_ctime_ns]
        out[str(p.relative_to(d))] = entry
    return out


def chown_tree(d: Path) -> None:
    """Give *d* and everything under it to the unprivileged user."""
    for p in [d, *d.rglob("*")]:
        os.lchown(p, NOBODY, NOBODY)


def build(base: Path, setup: str) -> tuple[Path, Path, str | None]:
    """Make a maildir and a canary under *base* as the attacker left them; return both."""
    md, canary = base / "md", base / "canary"
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True, mode=0o700)
    canary.mkdir()
    (canary / "file").write_bytes(b"canary: must never change\n")
    folder = None
    if setup in ("tmp", "new"):
        (md / setup).rmdir()
        (md / setup).symlink_to(canary)
    elif setup == "folder":
        (md / ".Lists").symlink_to(canary)
        folder = "Lists"
    elif setup == "folder-tmp":
        for sub in ("new", "cur"):
            (md / ".Lists" / sub).mkdir(parents=True, mode=0o700)
        (md / ".Lists" / "tmp").symlink_to(canary)
        folder = "Lists"
    elif setup == "root":
        shutil.rmtree(md)
        md.symlink_to(canary)
    chown_tree(base)
    return md, canary, folder


#: (name, symlink to the canary put in place of ..., attacker's actions during delivery)
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("symlinked-tmp", "tmp", {}),
    ("symlinked-new", "new", {}),
    ("symlinked-folder", "folder", {}),
    ("symlinked-folder-tmp", "folder-tmp", {}),
    ("symlinked-maildir", "root", {}),
    ("planted-tmp-names", "", {"plant_tmp": True}),
    ("planted-new-name", "", {"plant_new": True}),
    ("swapped-for-symlink", "", {"swap": "symlink"}),
    ("swapped-for-hardlink", "", {"swap": "hardlink"}),
]


def opened_outside(log: str, pids: dict[int, Path]) -> tuple[list[str], int]:
    """Successful openat calls made by a job (any of its threads) after it dropped root
    that resolve outside its maildir; and how many openat calls were checked."""
    parent: dict[int, int] = {}
    dropped: set[int] = set()
    bad, checked = [], 0

    def job(tid: int) -> int | None:
        while tid not in pids and tid in parent:
            tid = parent[tid]
        return tid if tid in pids else None

    for line in log.splitlines():
        if m := re.match(r"(\d+) +(?:<\.\.\. )?clone3?[ (].* = (\d+)$", line):
            parent[int(m[2])] = int(m[1])
        elif m := re.match(r"(\d+) +setuid\(\d+\) += 0", line):
            dropped.add(int(m[1]))
        elif m := re.match(r"(\d+) +openat\(.*\) = \d+<([^>]*)>", line):
            pid = job(int(m[1]))
            if pid is None or pid not in dropped:
                continue
            checked += 1
            allowed = os.path.realpath(pids[pid])
            if not (m[2] + "/").startswith(allowed + "/"):
                bad.append(line)
    return bad, checked


def hostile_jobs(
    work: Path, extra: dict[str, Any], cases: list[tuple[str, str, dict[str, Any]]] = CASES
) -> tuple[list[dict[str, Any]], Layout]:
    """Build *cases* under *work*; return the child jobs (with *extra*) and the layout."""
    work.chmod(0o755)
    jobs, layout = [], {}
    for name, setup, hostile in cases:
        base = work / name
        base.mkdir()
        md, canary, folder = build(base, setup)
        layout[name] = (md, canary, snapshot(canary, links_too=False), snapshot(canary))
        cfg: dict[str, Any] = {
            "id": name, "md": str(md), "folder": folder, "uid": NOBODY, "tag": name,
            "warm": str(work),
            "plan": [["bytes", 500], ["bytes", 70_000]], **extra,
        }  # fmt: skip
        if hostile:
            cfg["hostile"] = {**hostile, "canary_file": str(canary / "file")}
        jobs.append(cfg)
    return jobs, layout


Layout = dict[str, tuple[Path, Path, dict[str, Any], dict[str, Any]]]


def judge(results: list[dict[str, Any]], layout: Layout) -> dict[int, Path]:
    """Check every case (C6); return {child pid: its maildir}."""
    pids: dict[int, Path] = {}
    outcomes = {}
    for r in results:
        name = r["id"]
        md, canary, loose, strict = layout[name]
        assert "CRASHED" not in r["acks"], r
        # The canary is untouched (its link count may change only where the attacker
        # itself hard-linked it).
        hardlinked = name in ("planted-tmp-names", "swapped-for-hardlink")
        assert snapshot(canary, links_too=not hardlinked) == (loose if hardlinked else strict)
        got = acks(r["acks"])
        real_md = Path(os.path.realpath(md))
        where = real_md / ".Lists" if name.startswith("symlinked-folder") else real_md
        for ident, fname in got.items():
            landed = Path(os.path.realpath(where / "new" / fname))
            assert landed.parent == where / "new", (name, landed)
            assert not (where / "new").is_symlink(), name
            assert not (where / "new" / fname).is_symlink(), (name, fname)
            assert parse((where / "new" / fname).read_bytes()) == ident
        if not got:
            assert "ERROR" in r["acks"], r
        outcomes[name] = "delivered" if got else r["acks"].split()[1]
        pids[r["pid"]] = md
    # Symlinked directories are refused; races on names are survived by picking new names.
    for name in ("symlinked-tmp", "symlinked-new", "symlinked-folder", "symlinked-maildir"):
        assert outcomes.get(name) != "delivered", (name, outcomes)
    for name in ("planted-tmp-names", "planted-new-name", "swapped-for-symlink"):
        assert outcomes.get(name, "delivered") == "delivered", (name, outcomes)
    return pids


def test_hostile_mailboxes_as_nobody(work: Path) -> None:
    """Symlinks, planted names and a swapped tmp file never reach the canary (C6)."""
    require_root("switching to uid 65534")
    require_strace()
    jobs, layout = hostile_jobs(work, {})
    log = work / "hostile.strace"
    text = "".join(json.dumps(j) + "\n" for j in jobs)
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-y", "-o", str(log), "-e", "trace=openat,setuid,clone,clone3",
         PY, CHILD, "serve", "1"],
        input=text, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    pids = judge(results, layout)
    bad, checked = opened_outside(log.read_text(), pids)
    assert bad == [], bad
    assert checked >= 4 * len(CASES), checked
    FIGURES["hostile_cases"] += len(CASES)


#: Folder names shaped like the Apache James maildir traversal (CVE-2021-40525) and friends.
TRAVERSAL = [
    "..", "../", "../evil", "../../etc", "a/../../evil", "Lists/../../md-evil", ".", "./x",
    "..evil", "evil..", "x..y", "..\\evil", "%2e%2e%2fevil", "\u2025evil", "\uff0e\uff0e/evil",
    "Lists\x00../evil", "~evil", "md-evil", ".md-evil", "-evil", "&Li4-", "tmp", "new", "cur",
    "a.tmp", "a.b.c.d.e", "x" * 300, "\u00e9t\u00e9", "&", "a b", "*", "%", "\\", "md",
]  # fmt: skip


async def _deliver_folder(md: Path, name: str) -> Path | None:
    try:
        sub = Maildir(md, fsync=False).folder(name)
    except InvalidFolderNameError:
        return None
    d = await sub.deliver(make("t", 100))
    return d.path


def check_folder_name(base: Path, name: str) -> None:
    """*name* is refused, or its message lands in a direct ``.``-child of the maildir."""
    md = base / "md"
    before = sorted(p.name for p in base.iterdir())
    sibling = snapshot(base / "md-evil")
    path = asyncio.run(_deliver_folder(md, name))
    assert sorted(p.name for p in base.iterdir()) == before, name  # nothing beside md
    assert snapshot(base / "md-evil") == sibling, name
    if path is None:
        return
    folder = path.parent.parent
    assert path.parent.name == "new", (name, path)
    assert folder.parent == md, (name, path)
    assert folder.name.startswith("."), (name, path)
    assert folder.name not in (".", ".."), (name, path)
    assert os.path.realpath(path) == str(path), (name, path)


@pytest.fixture(scope="module")
def folder_base(scratch: Path) -> Path:
    """A maildir with a sibling whose name shares its prefix (``md-evil``)."""
    base = scratch / "folder-names"
    (base / "md").mkdir(parents=True)
    (base / "md-evil" / "new").mkdir(parents=True)
    (base / "md-evil" / "new" / "keep").write_bytes(b"sibling")
    return base


@pytest.mark.parametrize("name", TRAVERSAL, ids=range(len(TRAVERSAL)))
def test_traversal_shaped_folder_names(folder_base: Path, name: str) -> None:
    """Traversal-shaped folder names are refused or stay inside the maildir."""
    check_folder_name(folder_base, name)
    FIGURES["folder_names"] += 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.text(min_size=1, max_size=30))
def test_any_folder_name_stays_inside(folder_base: Path, name: str) -> None:
    """Hypothesis: any text as a folder name is refused or lands inside the maildir."""
    check_folder_name(folder_base, name)
    FIGURES["folder_names"] += 1


HOSTNAMES = ["evil/../../x", "a:b:c", "a\x00b", "..", ".hidden", "/", "x\\y", "\u00e9"]


def test_hostile_hostnames(work: Path) -> None:
    """Hostnames with ``/``, ``:``, NUL, dots (set in a private UTS namespace) stay escaped."""
    require_root("setting a hostname in a UTS namespace")
    require_tool("unshare")
    host_ns = os.readlink("/proc/self/ns/uts")
    for i, host in enumerate(HOSTNAMES):
        md = work / f"md{i}"
        cfg = {"md": str(md), "hostname": host, "host_uts_ns": host_ns, "tag": f"h{i}"}
        proc = subprocess.run(
            ["unshare", "-u", PY, CHILD, "run", json.dumps(cfg)],
            capture_output=True, text=True, errors="surrogateescape", timeout=30, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, (host, proc.stderr[-2000:])
        got = acks(proc.stdout)
        (fname,) = got.values()
        assert not set("/:\x00") & set(fname), fname
        assert not fname.startswith("."), fname
        assert os.listdir(md / "new") == [fname]
        assert os.listdir(md / "tmp") == []
        assert sorted(p.name for p in work.iterdir()) == [f"md{j}" for j in range(i + 1)]
    assert os.readlink("/proc/self/ns/uts") == host_ns
    FIGURES["hostile_hostnames"] += len(HOSTNAMES)


def test_hostname_guard_refuses_the_host_namespace(work: Path) -> None:
    """The child never sets the hostname of the namespace the tests run in."""
    if not is_root():
        pytest.skip("the guard matters only where sethostname would succeed (root)")
    before = os.uname().nodename
    host_ns = os.readlink("/proc/self/ns/uts")
    cfg = {"md": str(work / "md"), "hostname": "x", "host_uts_ns": host_ns}
    proc = subprocess.run(
        [PY, CHILD, "run", json.dumps(cfg)], capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0
    assert "refusing" in proc.stderr
    assert os.uname().nodename == before
