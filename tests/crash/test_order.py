"""Syscall order under ``strace -f``: fsync(file) < link < fsync(new/) < the test's ack.

An unmodified child delivers through the public API (asyncio, and the compat shim when it
is importable) with several deliveries in flight, so ``fsync(new/)`` is shared (group
commit). For every delivery the trace must show: the file's fsync finished before its link
started; a successful fsync of ``new/`` that started after the link finished and finished
before the child's ack marker (written only after ``deliver()`` returned).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from ._harness import FIGURES, acks, require_strace, run_child

pytestmark = pytest.mark.crash

LINE = re.compile(r"^(\d+) +(.*)$")
CALL = re.compile(r"^(\w+)\((.*)$")
RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
FD_PATH = re.compile(r"^\w+\(\d+<([^>]*)>")


@dataclass
class Call:
    """One traced syscall: its name, full text, and the trace lines where it began/ended."""

    name: str
    text: str
    start: int
    end: int

    @property
    def ok(self) -> bool:
        return self.text.rstrip().endswith("= 0") or " = 0 " in self.text


def parse(log: str) -> list[Call]:
    """Turn an ``strace -f`` log into calls with their start and end positions."""
    calls: list[Call] = []
    pending: dict[str, tuple[str, str, int]] = {}
    for i, raw in enumerate(log.splitlines()):
        m = LINE.match(raw)
        if not m:
            continue
        pid, rest = m[1], m[2]
        if r := RESUMED.match(rest):
            name, head, start = pending.pop(pid, (r[1], "", i))
            calls.append(Call(name, head + r[2], start, i))
        elif c := CALL.match(rest):
            if rest.endswith("<unfinished ...>"):
                pending[pid] = (c[1], rest[: -len("<unfinished ...>")], i)
            else:
                calls.append(Call(c[1], rest, i, i))
    return calls


def check_order(log: str, delivered: dict[str, str], md: Path) -> None:
    """Check the order of every delivery in *delivered* ({id: name}) within *log*."""
    calls = parse(log)
    synced: dict[str, list[Call]] = {}
    for c in calls:
        if c.name == "fsync" and c.ok and (m := FD_PATH.match(c.text)):
            synced.setdefault(m[1], []).append(c)
    dir_syncs = synced.get(f"{md}/new", [])
    for ident, name in delivered.items():
        file_sync = synced.get(f"{md}/tmp/{name}", [])
        link = [c for c in calls if c.name == "linkat" and f'"{name}"' in c.text and c.ok]
        ack = [c for c in calls if c.name == "write" and f"ACK {ident} {name}" in c.text]
        assert len(file_sync) == 1, (name, file_sync)
        assert len(link) == 1, (name, link)
        assert len(ack) == 1, (name, ack)
        assert file_sync[0].end < link[0].start, f"{name}: linked before its data was synced"
        covering = [s for s in dir_syncs if s.start > link[0].end and s.end < ack[0].start]
        assert covering, f"{name}: acked without an fsync(new/) after its link"


def traced_run(work: Path, api: str, n: int, concurrency: int) -> int:
    """Deliver *n* messages under strace; check the order; return the deliveries checked."""
    md = work / f"md-{api}-{concurrency}"
    log = work / f"{api}-{concurrency}.strace"
    plan = [["bytes", 300], ["bytes", 20_000], ["chunks", 150_000]]
    if api == "compat":
        plan = [["bytes", 300], ["bytes", 20_000], ["bytes", 150_000]]
    cfg = {
        "md": str(md), "plan": plan, "repeat": n // len(plan) + 1, "concurrency": concurrency,
        "api": api, "tag": api,
    }  # fmt: skip
    cfg["plan"] = (plan * cfg["repeat"])[:n]
    cfg["repeat"] = 1
    prefix = ["strace", "-f", "-qq", "-y", "-s", "200", "-o", str(log),
              "-e", "trace=openat,write,fsync,linkat,unlinkat"]  # fmt: skip
    proc = run_child(cfg, prefix=prefix)
    assert proc.returncode == 0, proc.stderr[-3000:]
    delivered = acks(proc.stdout)
    assert len(delivered) == n
    text = log.read_text()
    check_order(text, delivered, md)
    # The checker is not blind: without the fsyncs of new/ the same trace must fail it.
    blind = "\n".join(
        line for line in text.splitlines() if not ("fsync(" in line and f"<{md}/new>" in line)
    )
    with pytest.raises(AssertionError, match="acked without an fsync"):
        check_order(blind, delivered, md)
    return n


def test_order_asyncio(work: Path) -> None:
    """50 asyncio deliveries (8 in flight) and 10 one at a time: the order holds for each."""
    require_strace()
    FIGURES["order_checked"] += traced_run(work, "asyncio", 50, 8)
    FIGURES["order_checked"] += traced_run(work, "asyncio", 10, 1)


def test_order_compat(work: Path) -> None:
    """20 deliveries through compat's MaildirMailbox.appendMessage (4 in flight)."""
    require_strace()
    if importlib.util.find_spec("compat") is None:
        pytest.skip("the compat shim is not importable")
    compat = importlib.import_module("compat")
    if not hasattr(compat, "MaildirMailbox"):
        pytest.skip("compat.MaildirMailbox does not exist yet")
    FIGURES["order_checked"] += traced_run(work, "compat", 20, 4)
