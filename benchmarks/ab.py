"""A/B: the README's main table for two trees in one run, and whether any row got worse.

Run: ``python -m benchmarks.ab [REV]`` (or ``--base REV``; default ``HEAD~1``) compares this
checkout's working tree (the head; ``--head REV`` measures a revision instead) against REV.

How it measures:

* REV (and ``--head REV``) is checked out with ``git worktree add --detach`` in a scratch
  directory, removed at the end. The contenders are those of ``python -m benchmarks``
  (``benchmarks/compare.py``) from this checkout's ``benchmarks`` package, copied once, so both
  trees run the same harness and only ``maildrop``/``compat`` differ.
* Each tree runs in its own worker process (``benchmarks/_ab_worker.py``) with its own
  ``PYTHONPATH`` (the harness copy, then the tree) and its own Twisted process; each warms
  up once. Rounds are **interleaved**: round *r* runs the base's round, then the head's
  (the order alternates with *r*), each an interleaved round of every contender.
* **Nothing is deleted between timed rounds** (ext4 without a journal: a bulk delete makes
  file creation ~30x slower for ~30 s) except a stream round's few large files; the rest is
  removed at the end (``--keep`` keeps it).
* Per row: each tree's median speed over the rounds, **head/base** the median of the
  per-round paired ratios (head's speed / base's speed in the same round), their
  **spread** (min-max) and whether head/base is within the tolerance (default 5%). The
  README's "vs raw" figure of each tree (median of per-round contender/raw) is shown too.
  The control rows (raw steps, stdlib, aiofiles, Twisted's stock task: no maildrop code)
  run the same code in both trees; the range of their head/base is the run's noise band,
  printed under each table and next to each maildrop row out of tolerance.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import _contenders as c
from . import compare

REPO = Path(__file__).resolve().parent.parent
#: Contenders that run the same code in both trees (no maildrop): their head/base is noise.
CONTROLS = frozenset(
    {"raw", "rawhop", "rawthreads64", "fsynconly16", "nosync", "stdlib", "aiofiles1",
     "aiofiles64", "twisted16"}
)  # fmt: skip


@dataclass
class Side:
    """One tree's per-round results of one workload: seconds per contender."""

    rounds: list[dict[str, float]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def speeds(self, key: str) -> list[float | None]:
        """1/seconds of *key* per round (None where that round has no figure)."""
        return [1 / r[key] if r.get(key) else None for r in self.rounds]


class Worker(compare.PipeProcess):
    """The process that runs one tree's rounds (see ``benchmarks/_ab_worker.py``)."""

    def __init__(self, tree: Path, harness: Path, data: Path, args: argparse.Namespace) -> None:
        data.mkdir(parents=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(harness), str(tree)]))
        argv = [sys.executable, "-m", "benchmarks._ab_worker", "--dir", str(data),
                "--only", args.only, "--slices", str(args.slices)]  # fmt: skip
        if args.no_twisted:
            argv.append("--no-twisted")
        super().__init__(argv, env, data, "A/B worker")
        self.files = self.ask({"op": "hello"})


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def describe(rev: str | None) -> str:
    """Name a revision (``None``: the working tree) by its short hash and subject."""
    if rev is None:
        dirty = " + uncommitted changes" if _git("status", "--porcelain", "--", ".") else ""
        return f"working tree at {_git('log', '-1', '--format=%h %s', 'HEAD')}{dirty}"
    return _git("log", "-1", "--format=%h %s", rev)


def paired(base: Side, head: Side, key: str) -> list[float]:
    """Head's speed / base's speed of *key*, per round where both have one."""
    return [h / b for b, h in zip(base.speeds(key), head.speeds(key), strict=True) if b and h]


def vs_raw(side: Side, key: str) -> float | None:
    """The README's figure: median over rounds of *key*'s speed / the baseline's."""
    pairs = zip(side.speeds(key), side.speeds(compare.RAW), strict=True)
    ratios = [s / raw for s, raw in pairs if s and raw]
    return statistics.median(ratios) if ratios else None


def table(
    w: compare.Workload, keys: list[str], base: Side, head: Side, tolerance: float
) -> tuple[list[str], list[str]]:
    """Format one workload's rows; return them and the maildrop rows out of tolerance.

    A control row (the same code in both trees) is never out of tolerance: the range of the
    control rows' head/base is this run's noise band, named after the table and next to
    each row that is out of tolerance.
    """
    unit, per_round = ("MiB/s", w.total / c.MIB) if w.stream else ("msg/s", w.count)
    lines = [
        f"#### {w.label}" + ("" if w.stream else f" ({w.count} per round)"),
        "",
        f"| contender | base {unit} | head {unit} | head/base | spread (min-max) | base vs raw "
        f"| head vs raw | within {tolerance:.0%} |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    mids: dict[str, float] = {}
    for key in keys:
        if key in base.errors or key in head.errors:
            why = base.errors.get(key) or head.errors.get(key)
            lines.append(f"| {key} | not measured: {why} | | | | | | |")
            continue
        ratios = paired(base, head, key)
        if not ratios:
            continue
        speed = {n: statistics.median(s for s in side.speeds(key) if s) * per_round
                 for n, side in (("base", base), ("head", head))}  # fmt: skip
        mid = mids[key] = statistics.median(ratios)
        verdict = "control" if key in CONTROLS else "yes" if mid >= 1 - tolerance else "NO"
        raws = [vs_raw(base, key), vs_raw(head, key)]
        a, b = (f"{x:.2f}x" if x is not None else "" for x in raws)
        lines.append(
            f"| {key} | {speed['base']:,.1f} | {speed['head']:,.1f} | {mid:.3f} "
            f"| {min(ratios):.3f}-{max(ratios):.3f} | {a} | {b} | {verdict} |"
        )
    band = [m for k, m in mids.items() if k in CONTROLS]
    noise = f"control rows {min(band):.3f}-{max(band):.3f}" if band else "no control rows"
    lines += ["", f"Noise band (head/base of the {noise})."]
    worse = [
        f"{w.label}: {k} {m:.3f}"
        + (" (inside the noise band)" if band and m >= min(band) else f" ({noise})")
        for k, m in mids.items()
        if k not in CONTROLS and m < 1 - tolerance
    ]
    return lines, worse


def _checkout(rev: str, where: Path) -> Path:
    _git("worktree", "add", "--detach", "--quiet", str(where), rev)
    return where


def _remove(where: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=REPO,
                   capture_output=True, check=False)  # fmt: skip


def measure(args: argparse.Namespace, scratch: Path) -> tuple[list[str], list[str]]:
    """Run every workload's rounds for both trees, interleaved; return the report's lines."""
    trees = {"base": _checkout(args.base, scratch / "base-tree")}
    trees["head"] = REPO if args.head is None else _checkout(args.head, scratch / "head-tree")
    harness = scratch / "harness"
    shutil.copytree(REPO / "benchmarks", harness / "benchmarks",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    workers: dict[str, Worker] = {}
    lines: list[str] = []
    worse: list[str] = []
    try:
        for name, tree in trees.items():
            workers[name] = Worker(tree, harness, scratch / name, args)
            files = workers[name].files
            lines.append(f"- the {name} imports `{files['maildrop']}` and `{files['compat']}`")
        lines.append("")
        for w in compare.workloads(args):
            sides = {"base": Side(), "head": Side()}
            for r in range(args.rounds):
                for name in ("base", "head") if r % 2 == 0 else ("head", "base"):
                    ans = workers[name].ask({"op": "round", "round": r, "workload": asdict(w)})
                    sides[name].rounds.append(ans["seconds"])
                    sides[name].errors.update(ans["errors"])
                print(f"{w.label}: round {r + 1}/{args.rounds} done", file=sys.stderr)
            keys = list(dict.fromkeys(k for s in sides.values() for r in s.rounds for k in r))
            rows, bad = table(w, keys, sides["base"], sides["head"], args.tolerance)
            lines += [*rows, ""]
            worse += bad
    finally:
        for worker in workers.values():
            worker.close()
        for name in ("base-tree", "head-tree"):
            if (scratch / name).exists():
                _remove(scratch / name)
    return lines, worse


def main(argv: list[str] | None = None) -> int:
    """Compare the two trees and print the report; exit 0 (the verdict is in the report)."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.ab", description=__doc__.splitlines()[0]
    )
    ap.add_argument("rev", nargs="?", help="the base revision (same as --base)")
    ap.add_argument("--base", default=None, help="the base revision (default HEAD~1)")
    ap.add_argument("--head", default=None, help="a revision to measure instead of this tree")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--tolerance", type=float, default=0.05, help="allowed loss (default 0.05)")
    compare.add_arguments(ap)
    args = ap.parse_args(argv)
    args.base = args.base or args.rev or "HEAD~1"
    if args.smoke:
        args.rounds = 2
    started = time.time()
    head = describe(args.head)
    lines = ["### A/B: head against base, same run", "",
             f"- base: {describe(args.base)}", f"- head: {head}"]  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix="maildrop-ab-", dir=args.dir))
    try:
        body, worse = measure(args, scratch)
    finally:
        if args.keep:
            print(f"maildirs kept in {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    lines += body
    verdict = "every row within" if not worse else f"{len(worse)} row(s) worse than"
    lines += [f"### Verdict: {verdict} {args.tolerance:.0%}", ""]
    lines += [f"- {label}" for label in worse]
    lines += ["", "### Machine", "", *compare.machine()]
    cmd = " ".join(["python -m benchmarks.ab", *(sys.argv[1:] if argv is None else argv)])
    lines.append(f"- `{cmd}`: {args.rounds} interleaved rounds, {time.time() - started:.0f} s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
