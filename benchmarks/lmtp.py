"""``python -m benchmarks.lmtp``: ``maildrop lmtp`` against Dovecot's LMTP server.

The LMTP contender set of issue 11. Postfix's ``smtp-source -L`` sends the same messages to
both servers, which deliver into fresh maildirs on the same filesystem; the two are
interleaved in one run (the one going first alternates), over several rounds, and every
figure is a median. A cell is one message size and one number of concurrent sessions.
For each run the table reports msg/s, and the server's CPU per message: user + system time
of its whole process tree (Dovecot's master, its lmtp/auth/log processes; maildrop's workers).
After every run each message is counted in new/ and a sample is compared with what was sent.

Extra ``maildrop lmtp`` flags go after ``--``, e.g. ``python -m benchmarks.lmtp -- --workers 2``.
Dovecot (``dovecot-core``, ``dovecot-lmtpd``) and Postfix (for ``smtp-source``) are installed
from Debian's packages when missing, unless ``--no-install``; ``--smoke`` never installs.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tests.peers import apt_install, missing

from ._contenders import KIB, message
from ._lmtp_peers import Run, Server, dovecot_server, floor_server, maildrop_server, send, verify

NAMES = {
    "maildrop": "maildrop lmtp",
    "dovecot": "Dovecot LMTP",
    "floor": "asyncio floor",
    "floordisk": "asyncio floor + raw durable store",
}
#: The issue's targets: maildrop's msg/s over Dovecot's, and CPU ms per message by size.
RATIO_TARGET = 1.5
CPU_TARGET_MS = {2 * KIB: 0.5, 100 * KIB: 1.0}


@dataclass(frozen=True)
class Plan:
    """What one benchmark run measures."""

    rounds: int = 5
    count: int = 2000
    sizes: tuple[int, ...] = (2 * KIB, 100 * KIB)
    sessions: tuple[int, ...] = (1, 8, 32)
    extra: tuple[str, ...] = ()
    #: Also run :mod:`benchmarks._lmtp_floor`, bare and storing (CPU references).
    floor: bool = False

    def cells(self) -> list[tuple[int, int]]:
        """Return every (size, sessions) pair, in the order they run in."""
        return [(size, s) for size in self.sizes for s in self.sessions]


SMOKE = Plan(rounds=1, count=20, sessions=(1, 8))


@dataclass
class Results:
    """Every run of a benchmark, by (contender, size, sessions), in round order."""

    plan: Plan
    runs: dict[tuple[str, int, int], list[Run]] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, name: str, size: int, sessions: int, run: Run) -> None:
        """Record one verified run."""
        self.runs.setdefault((name, size, sessions), []).append(run)

    def rate(self, name: str, size: int, sessions: int) -> float:
        """Median msg/s of a contender in a cell."""
        return statistics.median(
            self.plan.count / r.seconds for r in self.runs[name, size, sessions]
        )

    def cpu_ms(self, name: str, size: int, sessions: int) -> float:
        """Median server CPU milliseconds per message of a contender in a cell."""
        runs = self.runs[name, size, sessions]
        return statistics.median(1000 * r.cpu / self.plan.count for r in runs)

    def ratio(self, size: int, sessions: int) -> float:
        """Median over rounds of maildrop's msg/s over Dovecot's in the same round."""
        runs = self.runs["maildrop", size, sessions], self.runs["dovecot", size, sessions]
        pairs = zip(*runs, strict=True)
        return statistics.median(d.seconds / m.seconds for m, d in pairs)


def label(size: int) -> str:
    """Return a size as the table writes it (2 KiB, 100 KiB)."""
    return f"{size // KIB} KiB"


def message_file(scratch: Path, size: int) -> tuple[Path, bytes]:
    """Write the file smtp-source sends; return it and the *size*-byte message it makes.

    smtp-source sends an empty line after the file's last one, so the file is one byte
    shorter than the message the servers receive.
    """
    sent = message(size - 2) + b"\n"
    path = scratch / f"message-{size}.eml"
    path.write_bytes(sent)
    return path, sent + b"\n"


def rotated(items: Sequence[str], by: int) -> list[str]:
    """Return *items* rotated left by *by* places (who goes first alternates by round)."""
    k = by % len(items)
    return [*items[k:], *items[:k]]


def measure(res: Results, servers: Sequence[Server], scratch: Path) -> Iterator[str]:
    """Run every round of *res*' plan, adding each run to *res*; yield a line per run."""
    plan = res.plan
    files = {size: message_file(scratch, size) for size in plan.sizes}
    names = [s.name for s in servers]
    by_name = {s.name: s for s in servers}
    for rnd in range(plan.rounds):
        for i, (size, sessions) in enumerate(plan.cells()):
            for name in rotated(names, rnd + i):
                server = by_name[name]
                user = f"r{rnd}k{size // KIB}s{sessions}"
                md = server.mailbox(user)
                path, body = files[size]
                run = send(server, path, plan.count, sessions, user)
                if name != "floor":  # it stores nothing
                    verify(md, plan.count, body, name)
                res.add(name, size, sessions, run)
                rate = plan.count / run.seconds
                yield (
                    f"round {rnd + 1}/{plan.rounds} {label(size):>7} s={sessions:<2} "
                    f"{name:<8} {rate:8.0f} msg/s {1000 * run.cpu / plan.count:6.2f} ms CPU/msg"
                )


def benchmark(
    plan: Plan,
    where: Path,
    *,
    keep: bool = False,
    echo: bool = True,
    report: Callable[[Results], None] | None = None,
) -> Results:
    """Run *plan* with both servers under a new directory in *where*; return the results.

    *report* gets the results once the servers have stopped, before the maildirs are
    deleted (unless *keep*): a bulk delete slows file creation on ext4 without a journal, so
    it comes after every timed run. After a failure they are kept for inspection.
    """
    if where is not None:
        os.makedirs(where, exist_ok=True)  # --dir may name a directory still to be made
    scratch = Path(tempfile.mkdtemp(prefix="maildrop-lmtp-bench-", dir=where))
    os.chmod(scratch, 0o755)  # Dovecot's mail uid must reach its maildirs below
    res = Results(plan)
    t0 = time.monotonic()
    try:
        with ExitStack() as stack:
            servers = [
                stack.enter_context(maildrop_server(scratch, plan.extra)),
                stack.enter_context(dovecot_server(scratch)),
            ]
            if plan.floor:
                servers.append(stack.enter_context(floor_server(scratch)))
                servers.append(stack.enter_context(floor_server(scratch, durable=True)))
            for line in measure(res, servers, scratch):
                if echo:
                    print(line, file=sys.stderr, flush=True)
    except BaseException:
        print(f"maildirs, messages and logs kept in {scratch}", file=sys.stderr)
        raise
    res.seconds = time.monotonic() - t0
    if report is not None:
        report(res)
    if not keep:
        shutil.rmtree(scratch)
    return res


def table(res: Results) -> list[str]:
    """Return the results as Markdown: one row per cell, with the issue's targets."""
    out = [
        "| message | sessions | maildrop msg/s | Dovecot msg/s | maildrop/Dovecot "
        f"(>= {RATIO_TARGET}x) | maildrop CPU ms/msg | Dovecot CPU ms/msg | CPU target ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, s in res.plan.cells():
        ratio = res.ratio(size, s)
        md_cpu = res.cpu_ms("maildrop", size, s)
        target = CPU_TARGET_MS.get(size)
        out.append(
            f"| {label(size)} | {s} | {res.rate('maildrop', size, s):,.0f} "
            f"| {res.rate('dovecot', size, s):,.0f} "
            f"| {ratio:.2f}x {'yes' if ratio >= RATIO_TARGET else 'NO'} | {md_cpu:.2f} "
            f"{'' if target is None else ('yes' if md_cpu <= target else 'NO')} "
            f"| {res.cpu_ms('dovecot', size, s):.2f} | {'' if target is None else target} |"
            + (
                f" {res.cpu_ms('floor', size, s):.2f} | {res.cpu_ms('floordisk', size, s):.2f} |"
                if res.plan.floor
                else ""
            )
        )
    if res.plan.floor:
        out[0] += " asyncio floor CPU ms/msg | floor + raw durable store CPU ms/msg |"
        out[1] += "---:|---:|"
    return out


def machine(res: Results, where: Path) -> list[str]:
    """Return the lines that say where and how the figures were taken."""
    mounts = Path("/proc/mounts").read_text().splitlines()
    fs = next((ln.split()[2] for ln in mounts if ln.split()[1] == _mount_of(where)), "?")
    flags = " ".join(res.plan.extra) or "(none)"
    return [
        f"- run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
        f"Linux {platform.release()}, Python {platform.python_version()}, {fs} under {where}",
        f"- {res.plan.rounds} interleaved round(s) of {res.plan.count} messages per run, "
        f"{res.seconds:.0f} s in all; extra maildrop flags: {flags}",
        f"- load average at the end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}",
    ]


def _mount_of(path: Path) -> str:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return str(path)


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, Plan]:
    """Parse the command line; flags after ``--`` go to ``maildrop lmtp``."""
    argv = list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.lmtp",
        description="maildrop lmtp against Dovecot's LMTP server, driven by smtp-source -L.",
        epilog="Flags after -- go to maildrop lmtp, e.g. -- --workers 2. Needs root.",
    )
    p.add_argument("--rounds", type=int, default=Plan.rounds, help="interleaved rounds")
    p.add_argument("--messages", type=int, default=Plan.count, help="messages per run")
    p.add_argument("--sessions", default="1,8,32", help="comma-separated session counts")
    p.add_argument("--sizes", default="2,100", help="comma-separated sizes in KiB")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="one round of 20 messages at 1 and 8 sessions (other plan flags ignored)",
    )
    p.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the maildirs go"
    )
    p.add_argument("--keep", action="store_true", help="keep the maildirs")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also run a bare asyncio server speaking the same exchange, without and with a "
        "raw durable store per message (CPU references)",
    )
    p.add_argument("--no-install", action="store_true", help="never apt-get missing peers")
    a = p.parse_args(argv)
    if a.smoke:
        return a, Plan(
            SMOKE.rounds, SMOKE.count, SMOKE.sizes, SMOKE.sessions, tuple(extra), a.floor
        )
    sizes = tuple(int(x) * KIB for x in a.sizes.split(","))
    sessions = tuple(int(x) for x in a.sessions.split(","))
    return a, Plan(a.rounds, a.messages, sizes, sessions, tuple(extra), a.floor)


def unavailable(install: bool) -> str | None:
    """Return why the peers cannot run here (after installing them if *install*), or None."""
    if os.geteuid() != 0:
        return "Dovecot's LMTP server needs root (it switches to the mail uid)"
    need = missing(["postfix", "dovecot-core", "dovecot-lmtpd"])
    if need and install:
        why = apt_install(need)
        if why:
            return f"missing {', '.join(need)}: {why}"
        need = missing(need)
    return f"missing Debian packages: {', '.join(need)}" if need else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its Markdown table; return the exit status."""
    args, plan = parse(sys.argv[1:] if argv is None else argv)
    why = unavailable(install=not (args.smoke or args.no_install))
    if why:
        print(f"skipped: {why}", file=sys.stderr)
        return 0 if args.smoke else 1

    def report(res: Results) -> None:
        title = f"`maildrop lmtp` vs Dovecot's LMTP server ({plan.count} messages per run)"
        lines = [f"#### LMTP: {title}", "", *table(res), "", *machine(res, args.dir)]
        print("\n".join(lines), flush=True)

    benchmark(plan, args.dir, keep=args.keep, report=report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
