"""One tree's side of ``python -m benchmarks.ab``: rounds of the comparison, on command.

``benchmarks/ab.py`` starts one of these per tree, with ``PYTHONPATH`` naming a copy of the
checkout's ``benchmarks`` package first and the tree to measure second, so both trees run the
same contenders and only ``maildrop`` (and ``compat``) differ. It reads one JSON command per
line on stdin and answers each with one JSON line on stdout:

- ``{"op": "hello"}`` -> ``{"maildrop": path, "compat": path}``: the files it measures.
- ``{"op": "round", "round": r, "workload": {...}}`` -> ``{"seconds": {key: s}, "errors":
  {key: message}}``: one interleaved round of every contender that takes part in the
  workload (the starting contender rotates with *r*), seconds for the whole workload.

Nothing is deleted between rounds (ext4 without a journal: bulk deletes slow file creation
~30x for ~30 s), except a stream round's few large files, so that a full run fits on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import compat
import maildrop

from . import compare


def _drop_streams(path: Path) -> None:
    """Remove the streamed messages of a round (one file per contender), keeping the dirs."""
    for msg in path.rglob("*"):
        if msg.parent.name in ("new", "cur") and msg.is_file():
            msg.unlink()


def one_round(
    cs: list[compare.Contender], cmd: dict[str, Any], base: Path, slices: int
) -> dict[str, Any]:
    """Run the round *cmd* asks for and return its answer."""
    w = compare.Workload(**cmd["workload"])
    r = int(cmd["round"])
    ws = compare.taking_part(cs, w)
    order = ws[r % len(ws) :] + ws[: r % len(ws)]
    where = base / f"round{r}"
    res = compare.run_workload(w, order, 1, slices, where, lambda _: None)
    if w.stream:
        _drop_streams(where)
    return {
        "seconds": {k: v.seconds[0] for k, v in res.items() if v.seconds},
        "errors": {k: v.error for k, v in res.items() if v.error is not None},
    }


def main(argv: list[str] | None = None) -> int:
    """Serve rounds until stdin closes."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks._ab_worker")
    ap.add_argument("--dir", required=True, help="where this tree's maildirs go")
    ap.add_argument("--only", default="")
    ap.add_argument("--slices", type=int, default=1)
    ap.add_argument("--no-twisted", action="store_true")
    args = ap.parse_args(argv)
    base = Path(args.dir)
    tw = None if args.no_twisted else compare.TwistedProcess()
    try:
        with asyncio.Runner() as runner:
            cs = compare.chosen(compare.contenders(runner, tw), args.only)
            # No speed to compare (idle), or nothing the base may have (the io_uring rows:
            # a revision from before the backend existed cannot run them).
            cs = [k for k in cs if k.key != compare.IDLE and not k.key.startswith("ur")]
            compare.warm_up(cs, base)
            for line in sys.stdin:
                cmd = json.loads(line)
                if cmd["op"] == "hello":
                    out: dict[str, Any] = {
                        "maildrop": maildrop.__file__,
                        "compat": compat.__file__,
                    }
                else:
                    out = one_round(cs, cmd, base, args.slices)
                print(json.dumps(out), flush=True)
    finally:
        if tw is not None:
            tw.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
