"""maildrop against every alternative, interleaved in one run, as one table.

Run: ``python -m benchmarks`` (or ``python -m benchmarks.compare``); ``--help`` lists the
knobs, ``--smoke`` runs everything at toy sizes in a few seconds.

How it measures (why the numbers can be trusted on a noisy VM):

* Contenders run **interleaved**: round 1 runs every contender once, round 2 again (starting
  one contender later), and so on; a contender's speed is the median over rounds, and its ratio
  to the baseline is the median of the per-round ratios (each against the baseline run of the
  same round), so slow drifts of the machine cancel out.
* Every contender gets a **fresh maildir** per round, and nothing is deleted until the very end:
  on ext4 without a journal a bulk delete makes file creation ~30x slower for ~30 s.
* Twisted installs its reactor process-globally, so Twisted's stock ``MaildirMailbox`` and the
  ``compat`` shim run in a second process (``benchmarks/_twisted.py``, ``asyncioreactor`` on
  a plain asyncio loop), driven command by command so they interleave with the rest.
* ``--slices N`` cuts each round of a message workload into N turns per contender (A B C A B
  C ...), so contenders of one round share the same moments of the machine; it suits the c=1
  rows (a slice of 100 messages at c=64 spends much of its time ramping up and down).
* Reference rows bound what is physically possible here: the raw steps handed to a thread one
  message at a time (no asyncio: the floor of any design that keeps the disk off the event
  loop's thread), the same through one hop of maildrop's pool (the floor on asyncio), the raw
  steps in 64 plain threads, files created, written and fsynced (nothing else) in 16 threads
  (the disk's ceiling for one fsync per message), and an idle event loop's own longest stall
  (the scheduler's noise floor). "Limits of this machine" sets them against the baselines.
* Each maildrop run is monitored: a ticker task waking every millisecond records the longest
  event-loop stall (its own lateness) and the same minus the garbage collector's pauses in
  that tick (``gc.callbacks``; a full collection of the Twisted process's heap pauses every
  thread for 15-30 ms), ``/proc/self/status`` the peak RSS growth (``VmHWM``, reset before
  the run), and maildrop's counters the deliveries per ``fsync(new/)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import _contenders as c
from . import _uring_bench as ur

RAW = "raw"
IDLE = "idle"


@dataclass(frozen=True)
class Workload:
    """What each contender delivers in one round."""

    key: str
    label: str
    size: int  # bytes per message
    count: int  # messages per round (1 for streams)
    stream: bool = False

    @property
    def total(self) -> int:
        return self.size * self.count


@dataclass
class Contender:
    """One way of delivering, and the workloads it takes part in."""

    key: str
    label: str
    run: Callable[[Path, Workload], tuple[float, c.Probe | None]]
    kinds: frozenset[str]  # "msgs" and/or "stream"
    twisted: bool = False  # runs in the Twisted process


@dataclass
class Result:
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # speed / baseline speed, per round
    probes: list[c.Probe] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # CPU seconds per delivery, per round
    error: str | None = None


class PipeProcess:
    """A helper process that answers one JSON line on stdout for each JSON line on stdin."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, what: str) -> None:
        self.what = what
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd, env=env
        )

    def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Send one command, return its answer."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.what} died (exit {self.proc.wait()})")
        out: dict[str, Any] = json.loads(line)
        return out

    def close(self) -> None:
        """Close its stdin (it then exits) and reap it."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class TwistedProcess(PipeProcess):
    """The second process that runs Twisted's and compat's contenders."""

    def __init__(self) -> None:
        root = Path(__file__).resolve().parent.parent
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
        )
        argv = [sys.executable, "-m", "benchmarks._twisted"]
        super().__init__(argv, env, root, "Twisted benchmark process")
        self.caps = self.ask({"op": "probe"})


def contenders(runner: asyncio.Runner, tw: TwistedProcess | None) -> list[Contender]:
    """Build every contender (the baseline first)."""
    both = frozenset({"msgs", "stream"})
    msgs = frozenset({"msgs"})

    def sync(fn: Callable[[Path, Workload], float]) -> Callable[..., tuple[float, None]]:
        return lambda path, w: (fn(path, w), None)

    def monitored(make: Callable[[Path, Workload], Any]) -> Callable[..., tuple[float, c.Probe]]:
        async def go(path: Path, w: Workload) -> tuple[float, c.Probe]:
            async with c.monitored() as probe:
                seconds = await make(path, w)
            return seconds, probe

        return lambda path, w: runner.run(go(path, w))

    def md(
        conc: int, fsync: bool = True, backend: str = "threads"
    ) -> Callable[..., tuple[float, c.Probe]]:
        def make(path: Path, w: Workload) -> Any:
            if w.stream:
                return c.maildrop_stream(path, w.size, fsync=fsync, backend=backend)
            msg = c.message(w.size)
            return c.maildrop_many(path, msg, w.count, conc, fsync=fsync, backend=backend)

        return monitored(make)

    def aiof(conc: int) -> Callable[..., tuple[float, None]]:
        def go(path: Path, w: Workload) -> tuple[float, None]:
            if w.stream:
                return runner.run(c.aiofiles_stream(path, w.size)), None
            return runner.run(c.aiofiles_many(path, c.message(w.size), w.count, conc)), None

        return go

    def raw(sync_: bool) -> Callable[..., tuple[float, None]]:
        def go(path: Path, w: Workload) -> tuple[float, None]:
            if w.stream:
                return c.raw_stream(path, w.size, sync=sync_), None
            return c.raw_many(path, c.message(w.size), w.count, sync=sync_), None

        return go

    handoff = c.Handoff()

    def raw_hop(path: Path, w: Workload) -> tuple[float, None]:
        if w.stream:
            return c.raw_stream_handoff(path, w.size), None
        return c.raw_hop_many(handoff, path, c.message(w.size), w.count), None

    def idle(path: Path, w: Workload) -> tuple[float, c.Probe]:
        return monitored(lambda p, w: c.idle(0.5))(path, w)

    out = [
        Contender(RAW, "raw sync os calls, durable (baseline)", raw(True), both),
        Contender("rawhop", "raw durable, handed to a thread (floor)", raw_hop, both),
        Contender(
            "rawthreads64",
            "raw durable in 64 plain threads (reference)",
            sync(lambda p, w: c.raw_threads_many(p, c.message(w.size), w.count, 64)),
            msgs,
        ),
        Contender(
            "fsynconly16",
            "file create+write+fsync only, 16 plain threads (disk ceiling)",
            sync(lambda p, w: c.fsync_only_threads_many(p, c.message(w.size), w.count, 16)),
            msgs,
        ),
        Contender(
            "rawpool",
            "raw durable, one hop through maildrop's pool (asyncio floor)",
            monitored(lambda p, w: c.raw_pool_many(p, c.message(w.size), w.count)),
            msgs,
        ),
        Contender("nosync", "raw sync os calls, no fsync", raw(False), both),
        Contender(
            "stdlib",
            "stdlib mailbox.Maildir.add (no dir fsync)",
            sync(lambda p, w: c.stdlib_many(p, c.message(w.size), w.count)),
            msgs,
        ),
        Contender("aiofiles1", "naive aiofiles, c=1", aiof(1), both),
        Contender("aiofiles64", "naive aiofiles, c=64", aiof(64), msgs),
        Contender("md1", "maildrop c=1", md(1), both),
        Contender("md16", "maildrop c=16", md(16), msgs),
        Contender("md64", "maildrop c=64", md(64), msgs),
        Contender("md1nofsync", "maildrop fsync=False, c=1", md(1, False), both),
        Contender("md16nofsync", "maildrop fsync=False, c=16", md(16, False), msgs),
        Contender(IDLE, "idle event loop, 0.5 s (stall floor)", idle, msgs),
    ]
    out[-1:-1] = ur.contenders(md, Contender)
    if tw is not None:

        def remote(op: str, conc: int, fsync: bool) -> Callable[..., tuple[float, c.Probe]]:
            def go(path: Path, w: Workload) -> tuple[float, c.Probe]:
                cmd = {"op": op, "path": str(path), "size": w.size, "n": w.count,
                       "concurrency": conc, "fsync": fsync}  # fmt: skip
                ans = tw.ask(cmd)
                if "error" in ans:
                    raise RuntimeError(ans["error"])
                probe = c.Probe(
                    stall=ans["stall"], stall_no_gc=ans["stall_no_gc"],
                    gc_pause=ans["gc_pause"], rss_growth=ans["rss_growth"], cpu=ans["cpu"],
                )  # fmt: skip
                return ans["seconds"], probe

            return go

        if tw.caps.get("twisted"):
            out.append(Contender(
                "twisted16", "Twisted stock appendMessage, 16 concurrent (never fsyncs)",
                remote("twisted", 16, False), msgs, twisted=True,
            ))  # fmt: skip
        if tw.caps.get("compat"):
            out.append(Contender(
                "compat1", "maildrop via compat, c=1", remote("compat", 1, True), msgs,
                twisted=True,
            ))  # fmt: skip
            out.append(Contender(
                "compat16nofsync", "maildrop via compat fsync=False, 16 concurrent",
                remote("compat", 16, False), msgs, twisted=True,
            ))  # fmt: skip
    return out


def run_workload(
    w: Workload,
    cs: list[Contender],
    rounds: int,
    slices: int,
    base: Path,
    log: Callable[[str], None],
) -> dict[str, Result]:
    """Run every contender on *w*, interleaved, and return their results.

    A round of a message workload is cut into *slices*: every contender delivers
    ``count / slices`` messages in turn, *slices* times, into its maildir of that round, and
    its round time is the sum. So the contenders of one round see the same moments of a
    machine whose speed drifts by 2-5x within seconds (a shared VM).
    """
    res = {k.key: Result() for k in cs}
    slices = 1 if w.stream else max(1, min(slices, w.count))
    part = replace(w, count=w.count // slices)
    for r in range(rounds):
        order = cs[r % len(cs) :] + cs[: r % len(cs)]
        times: dict[str, float] = {}
        probes: dict[str, list[c.Probe]] = {}
        for s in range(slices):
            for k in order:
                if res[k.key].error is not None or (k.key == IDLE and s):
                    continue
                path = base / w.key / k.key / f"r{r}"
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    seconds, probe = k.run(path, part)
                except Exception as exc:
                    res[k.key].error = f"{type(exc).__name__}: {exc}"
                    log(f"  {k.key}: failed: {res[k.key].error}")
                    times.pop(k.key, None)
                    continue
                times[k.key] = times.get(k.key, 0.0) + seconds
                if probe is not None:
                    probes.setdefault(k.key, []).append(probe)
        done = part.count * slices
        for key, t in times.items():
            res[key].seconds.append(t * w.count / done)
            if key in probes:
                res[key].probes.append(c.merge(probes[key]))
                res[key].cpu.append(res[key].probes[-1].cpu / done)
        if RAW in times:
            for key, t in times.items():
                res[key].ratios.append(times[RAW] / t)
        log(
            f"  round {r + 1}/{rounds}: "
            + "  ".join(f"{k}={done / t:,.0f}/s" for k, t in times.items())
        )
    return res


def _fmt_rate(w: Workload, seconds: float) -> tuple[str, str]:
    return f"{w.count / seconds:,.0f}", f"{w.total / c.MIB / seconds:,.1f}"


def table(w: Workload, cs: list[Contender], res: dict[str, Result]) -> list[str]:
    """Format the results of one workload as a Markdown table."""
    lines = [
        f"#### {w.label}" + ("" if w.stream else f" ({w.count} per round)"),
        "",
        "| contender | msg/s | MiB/s | vs raw | max stall ms | of it not GC ms | longest GC ms "
        "| peak RSS +MiB | deliveries/dir fsync | CPU µs/msg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in cs:
        r = res.get(k.key)
        if r is None:
            continue
        if r.error is not None or not r.seconds:
            lines.append(f"| {k.label} | not measured: {r.error} | | | | | | | | |")
            continue
        rate, mib = _fmt_rate(w, statistics.median(r.seconds))
        ratio = f"{statistics.median(r.ratios):.2f}x" if r.ratios else ""
        if k.key == IDLE:
            rate = mib = ratio = "-"
        stall = no_gc = gc_ms = rss = per = ""
        if r.probes:
            stall = f"{max(p.stall for p in r.probes) * 1000:.1f}"
            no_gc = f"{max(p.stall_no_gc for p in r.probes) * 1000:.1f}"
            gc_ms = f"{max(p.gc_pause for p in r.probes) * 1000:.1f}"
            rss = f"{max(p.rss_growth for p in r.probes) / c.MIB:.1f}"
            fs = [p.per_fsync for p in r.probes if p.dir_fsyncs]
            per = f"{statistics.median(fs):.1f}" if fs else ""
        lines.append(
            f"| {k.label} | {rate} | {mib} | {ratio} | {stall} | {no_gc} | {gc_ms} | {rss} "
            f"| {per} | {ur.cpu_column(r) if k.key != IDLE else ''} |"
        )
    return lines


def _paired(res: dict[str, Result], a: str, b: str) -> float | None:
    """Median over rounds of speed(a)/speed(b), or None if either is missing."""
    ra, rb = res.get(a), res.get(b)
    if ra is None or rb is None or not ra.seconds or not rb.seconds:
        return None
    n = min(len(ra.seconds), len(rb.seconds))
    return statistics.median(rb.seconds[i] / ra.seconds[i] for i in range(n))


def targets(all_res: dict[str, dict[str, Result]]) -> list[str]:
    """Check the issue's speed targets against this run's results."""
    small = all_res.get("2k", {})
    stream = all_res.get("256m", {})
    rows: list[tuple[str, float | None, str, float, bool]] = [
        ("maildrop c=1 vs raw sync durable, 2 KiB", _paired(small, "md1", RAW), ">=", 0.9, True),
        ("maildrop c=64 vs raw sync durable, 2 KiB", _paired(small, "md64", RAW), ">=", 2.5, True),
        (
            "maildrop c=64 vs stdlib Maildir.add, 2 KiB",
            _paired(small, "md64", "stdlib"), ">=", 1.5, True,
        ),
        (
            "maildrop c=64 vs naive aiofiles c=64, 2 KiB",
            _paired(small, "md64", "aiofiles64"), ">=", 2.5, True,
        ),
        (
            "compat vs maildrop's own API, c=1, 2 KiB",
            _paired(small, "compat1", "md1"), ">=", 0.9, True,
        ),
        (
            "compat fsync=False vs Twisted stock, 16 concurrent, 2 KiB",
            _paired(small, "compat16nofsync", "twisted16"), ">=", 1.0, True,
        ),
        (
            "256 MiB stream, maildrop vs raw sync durable",
            _paired(stream, "md1", RAW), ">=", 0.8, True,
        ),
    ]  # fmt: skip
    rows += ur.targets(all_res, _paired)
    mem = all_res.get("1g", {}).get("md1")
    growth = max((p.rss_growth for p in mem.probes), default=None) if mem else None
    rows.append(("1 GiB stream: peak RSS growth (MiB)", None if growth is None else growth / c.MIB,
                 "<=", 16.0, False))  # fmt: skip
    probes = [
        p
        for res in all_res.values()
        for key, r in res.items()
        if key.startswith(("md", "compat", "ur"))
        for p in r.probes
    ]
    rows.append(
        (
            "longest event-loop stall, any maildrop run (ms)",
            max(p.stall for p in probes) * 1000 if probes else None,
            "<=",
            5.0,
            False,
        )
    )
    rows.append(("the same, minus garbage-collector pauses within the stalled tick (ms)",
                 max(p.stall_no_gc for p in probes) * 1000 if probes else None, "<=", 5.0,
                 False))  # fmt: skip
    floor = [p.stall for p in all_res.get("2k", {}).get(IDLE, Result()).probes]
    if floor:
        rows.append(("(reference) longest stall of an idle loop, same run (ms)",
                     max(floor) * 1000, "<=", 5.0, False))  # fmt: skip
    out = ["| target | measured | wanted | met |", "|---|---:|---:|:---:|"]
    for label, got, op, want, ratio in rows:
        unit = "x" if ratio else ""
        if got is None:
            out.append(f"| {label} | not measured | {op} {want:g}{unit} | - |")
            continue
        ok = got >= want if op == ">=" else got <= want
        out.append(
            f"| {label} | {got:.3f}{unit} | {op} {want:g}{unit} | {'yes' if ok else 'NO'} |"
        )
    return out


def limits(all_res: dict[str, dict[str, Result]]) -> list[str]:
    """What this machine allows, from the reference rows: the bounds behind the targets."""
    small = all_res.get("2k", {})
    rows = [
        ("raw steps handed to a thread, no asyncio (any off-loop design, c=1)", "rawhop", RAW),
        ("raw steps through one hop of maildrop's asyncio pool (c=1 on asyncio)", "rawpool",
         RAW),
        ("file create+write+fsync only, 16 threads: the ceiling for one fsync per message",
         "fsynconly16", RAW),
        ("the same ceiling against stdlib Maildir.add", "fsynconly16", "stdlib"),
        ("the same ceiling against naive aiofiles c=64", "fsynconly16", "aiofiles64"),
        ("raw durable in 64 plain threads", "rawthreads64", RAW),
    ]  # fmt: skip
    out = []
    for label, a, b in rows:
        got = _paired(small, a, b)
        if got is not None:
            out.append(f"- {label}: {got:.3f}x (2 KiB, paired per round)")
    return out


def machine() -> list[str]:
    """Describe the machine the run happened on."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    fs = "?"
    with contextlib.suppress(OSError):
        fs = subprocess.run(
            ["findmnt", "-no", "FSTYPE,OPTIONS", "-T", tempfile.gettempdir()],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"- {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        f"- Python {platform.python_version()}, filesystem of {tempfile.gettempdir()}: {fs}",
        f"- load average at the end of the run: {load}",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the tables."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    add_arguments(ap)
    args = ap.parse_args(argv)
    if args.smoke:
        args.rounds = 1
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)  # --dir may name a directory still to be made
    base = Path(tempfile.mkdtemp(prefix="maildrop-compare-", dir=args.dir))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    tw = None if args.no_twisted else TwistedProcess()
    all_res: dict[str, dict[str, Result]] = {}
    started = time.time()
    try:
        with asyncio.Runner() as runner:
            cs = chosen(contenders(runner, tw), args.only)
            warm_up(cs, base)
            lines = ["### Results", ""]
            if why := c.uring_reason():
                log(f"io_uring contenders left out: {why}")
                lines += [f"io_uring contenders left out: {why}", ""]
            for w in workloads(args):
                ws = taking_part(cs, w)
                log(f"{w.label}: {len(ws)} contenders x {args.rounds} rounds")
                all_res[w.key] = run_workload(w, ws, args.rounds, args.slices, base, log)
                lines += [*table(w, ws, all_res[w.key]), ""]
    finally:
        if tw is not None:
            tw.close()
    lines += ["### Targets", "", *targets(all_res), ""]
    if bound := limits(all_res):
        lines += ["### Limits of this machine (reference rows, speed vs the named row)", "",
                  *bound, ""]  # fmt: skip
    lines += ["### Machine", "", *machine()]
    lines.append(f"- {args.rounds} interleaved rounds, {time.time() - started:.0f} s in all")
    print("\n".join(lines))
    if args.keep:
        log(f"maildirs kept in {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """Add the options that choose the workloads and contenders (shared with ``ab``)."""
    ap.add_argument("--small", type=int, default=1000, help="2 KiB messages per round")
    ap.add_argument("--medium", type=int, default=300, help="100 KiB messages per round")
    ap.add_argument("--stream-mib", type=int, default=256, help="size of the streamed message")
    ap.add_argument("--memory-mib", type=int, default=1024, help="size of the memory stream")
    ap.add_argument(
        "--slices", type=int, default=1, help="interleaved slices per round (default 1)"
    )
    ap.add_argument("--workloads", default="2k,100k,256m,1g", help="comma-separated subset")
    ap.add_argument("--only", default="", help="comma-separated contender keys (raw always runs)")
    ap.add_argument("--no-twisted", action="store_true", help="skip the Twisted process")
    ap.add_argument("--dir", default=None, help="where to make the maildirs (default: /tmp)")
    ap.add_argument("--keep", action="store_true", help="do not delete the maildirs at the end")
    ap.add_argument("--smoke", action="store_true", help="toy sizes, one round: does it run?")


def workloads(args: argparse.Namespace) -> list[Workload]:
    """The workloads selected on the command line (toy sizes with ``--smoke``)."""
    if args.smoke:
        args.small, args.medium, args.stream_mib, args.memory_mib = 20, 5, 2, 4
    every = [
        Workload("2k", "2 KiB messages", 2 * c.KIB, args.small),
        Workload("100k", "100 KiB messages", 100 * c.KIB, args.medium),
        Workload("256m", f"{args.stream_mib} MiB stream", args.stream_mib * c.MIB, 1, True),
        Workload("1g", f"{args.memory_mib} MiB stream (memory)", args.memory_mib * c.MIB, 1, True),
    ]
    return [w for w in every if w.key in args.workloads.split(",")]


def chosen(cs: list[Contender], only: str) -> list[Contender]:
    """The contenders named in *only* (comma-separated keys; empty: all), always the baseline."""
    keys = {k for k in only.split(",") if k}
    return [k for k in cs if not keys or k.key in keys or k.key == RAW]


def taking_part(cs: list[Contender], w: Workload) -> list[Contender]:
    """The contenders that run workload *w* (the memory stream: the baseline, ``md1`` and
    ``ur1``)."""
    kind = "stream" if w.stream else "msgs"
    ws = [k for k in cs if kind in k.kinds]
    if w.key == "1g":
        ws = [k for k in ws if k.key in (RAW, "md1", "ur1")]
    return ws


def warm_up(cs: list[Contender], base: Path) -> None:
    """Run every contender once on a few messages (imports, thread pools, first-touch memory)."""
    for k in cs:
        k.run(base / "warmup" / k.key, Workload("w", "warm-up", 2 * c.KIB, 20))


if __name__ == "__main__":
    raise SystemExit(main())
