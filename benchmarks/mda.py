"""``maildrop deliver`` against the delivery agents an MTA could run instead, one process each.

Run: ``python -m benchmarks.mda`` (``--help`` lists the knobs; ``--smoke`` runs toy sizes).

An MTA (Postfix ``mailbox_command``, ``pipe(8)``, fetchmail ``mda``) starts one process per
message and pipes the message into it, so this is what is timed: per message a fresh process
gets the message on a pipe and delivers it into a Maildir, at 1 and at 8 deliveries in
parallel, with 2 KiB and 100 KiB messages. Per contender it reports the CPU a delivery costs
(user + system of the child, from ``os.wait4``'s rusage, median over every message of every
round) and the messages per second of the whole batch (median over rounds).

* Contenders run **interleaved**: each round runs every contender once, starting one
  contender later than the round before; nothing is deleted between rounds (ext4 without a
  journal creates files ~30x slower for ~30 s after a bulk delete).
* Floors: ``python -c pass`` (any Python program, same interpreter and site as maildrop) and
  a **do-nothing console script**: pip's own wrapper (copied from the installed ``maildrop``
  script, importing a module whose ``main()`` returns 0), byte-compiled like maildrop. The
  target is maildrop's CPU at most 1.3x that script's.
* Peers, each with its usual durable settings (see benchmarks/README.md for what each one
  fsyncs): the stdlib ``mailbox.Maildir.add`` one-liner, Courier's ``maildrop`` (a filter
  file with one ``to`` rule), ``procmail`` (an rc with one maildir recipe) and
  ``dovecot-lda`` (a standalone config, run as uid 65534: Dovecot refuses root). Missing ones
  are installed with apt-get when this runs as root (``--no-install`` skips them instead).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ._contenders import _in_threads

#: Debian packages of the peers, by the binary they provide.
PEERS = {
    "/usr/bin/maildrop": "maildrop",
    "/usr/bin/procmail": "procmail",
    "/usr/lib/dovecot/dovecot-lda": "dovecot-core",
}
NOBODY = 65534
SIZES = {"2 KiB": 2 << 10, "100 KiB": 100 << 10}
STDLIB = "import mailbox, sys; mailbox.Maildir(sys.argv[1]).add(sys.stdin.buffer.read())"


@dataclass
class Contender:
    """One delivery agent: how to run it into a maildir, and what it fsyncs."""

    name: str
    fsyncs: str
    command: object  # (maildir: Path) -> list[str], made per maildir
    uid: int | None = None
    cpu: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    rates: dict[tuple[str, int], list[float]] = field(default_factory=dict)


def message(size: int) -> bytes:
    """A plain message of *size* bytes with a leading mbox From line (as Postfix sends)."""
    head = (
        b"From sender@example.org  Mon Dec  7 10:00:00 2026\n"
        b"From: sender@example.org\nTo: user@example.org\nSubject: benchmark\n\n"
    )
    body = (b"x" * 71 + b"\n") * ((size - len(head)) // 72 + 1)
    return (head + body)[:size]


def ensure_peers(install: bool) -> list[str]:
    """Install missing peers with apt-get (root only); return notes on what is missing."""
    missing = sorted({pkg for path, pkg in PEERS.items() if not os.path.exists(path)})
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, check=False)
    return [f"{path} is missing: skipped" for path in PEERS if not os.path.exists(path)]


def floors(work: Path) -> tuple[list[str], list[str]]:
    """Write the do-nothing console script; return (bare python, console script) commands."""
    script = Path(sys.executable).parent / "maildrop"
    wrapper = script.read_text()
    assert "from maildrop.cli import main" in wrapper, f"unexpected wrapper {script}"
    noop = work / "noop"
    noop.mkdir(exist_ok=True)
    (noop / "maildrop_bench_noop.py").write_text("def main():\n    return 0\n")
    target = noop / "noop-command"
    target.write_text(wrapper.replace("maildrop.cli", "maildrop_bench_noop"))
    target.chmod(0o755)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(noop)], check=True)
    return [sys.executable, "-c", "pass"], [str(target)]


def contenders(work: Path, install: bool) -> tuple[list[Contender], list[str]]:
    """Build every contender that can run here; return them and notes on the others."""
    import maildrop

    pkg = Path(maildrop.__file__).parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(pkg)], check=True)
    ours = Path(sys.executable).parent / "maildrop"
    bare, noop = floors(work)
    out = [
        Contender("python -c pass", "nothing (floor)", lambda md: bare),
        # The interpreter alone, without the venv's site (its editable-install .pth imports
        # pathlib, re and urllib into every Python start, the floors above included).
        Contender(
            "python -I -S -c pass",
            "nothing (floor)",
            lambda md: [*bare[:1], "-I", "-S", "-c", "pass"],
        ),
        Contender("do-nothing console script", "nothing (floor)", lambda md: noop),
        Contender("maildrop deliver", "file, new/", lambda md: [str(ours), "deliver", str(md)]),
        Contender(
            "stdlib mailbox.Maildir.add", "file", lambda md: [sys.executable, "-c", STDLIB, md]
        ),
    ]
    notes = ensure_peers(install)
    if os.path.exists("/usr/bin/maildrop"):
        out.append(Contender("Courier maildrop", "file", lambda md: _courier(work, md)))
    if os.path.exists("/usr/bin/procmail"):
        out.append(Contender("procmail", "file", lambda md: _procmail(work, md)))
    if os.path.exists("/usr/lib/dovecot/dovecot-lda"):
        if os.geteuid() == 0:
            out.append(
                Contender(
                    "dovecot-lda", "file, index files", lambda md: _dovecot(work, md), NOBODY
                )
            )
        else:
            notes.append("dovecot-lda needs root here (to run it as uid 65534): skipped")
    return out, notes


def _courier(work: Path, md: Path) -> list[str]:
    rc = work / f"{md.name}.mailfilter"
    rc.write_text(f'to "{md}/"\n')
    rc.chmod(0o600)
    return ["/usr/bin/maildrop", str(rc)]


def _procmail(work: Path, md: Path) -> list[str]:
    rc = work / f"{md.name}.procmailrc"
    rc.write_text(f"MAILDIR={md}/\n:0\n{md}/\n")
    return ["/usr/bin/procmail", "-m", str(rc)]


def _dovecot(work: Path, md: Path) -> list[str]:
    run = work / f"{md.name}.run"
    run.mkdir(exist_ok=True)
    os.chown(run, NOBODY, NOBODY)
    conf = work / f"{md.name}.dovecot.conf"
    conf.write_text(
        f"base_dir = {run}\nlog_path = {run}/log\nssl = no\nprotocols =\n"
        f"mail_location = maildir:{md}\nmail_fsync = optimized\n"
        "postmaster_address = postmaster@example.org\nfirst_valid_uid = 1\n"
    )
    conf.chmod(0o644)
    return ["/usr/lib/dovecot/dovecot-lda", "-c", str(conf), "-f", "sender@example.org"]


def _one(argv: list[str], msg: bytes, uid: int | None, env: dict[str, str]) -> float:
    """Deliver *msg* through one process; return its CPU in ms (user + system)."""
    extra = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    p = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        bufsize=0, env=env, cwd="/", **extra,  # type: ignore[arg-type]
    )  # fmt: skip
    assert p.stdin is not None
    assert p.stderr is not None
    # Unbuffered (bufsize=0): one blocking write, nothing left to flush at close. The
    # floors exit without reading, which breaks the pipe.
    with contextlib.suppress(BrokenPipeError):
        p.stdin.write(msg)
    p.stdin.close()
    err = p.stderr.read()
    p.stderr.close()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({p.returncode}): {err.decode()[-300:]}")
    return (usage.ru_utime + usage.ru_stime) * 1000


def batch(
    c: Contender, md: Path, msg: bytes, count: int, parallel: int
) -> tuple[list[float], float]:
    """Deliver *count* messages with *parallel* at a time; return CPU per message and msg/s."""
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True, exist_ok=True)
    if c.uid is not None:
        for path in (md, md / "tmp", md / "new", md / "cur"):
            os.chown(path, c.uid, c.uid)
    argv = c.command(md)  # type: ignore[operator]
    # Byte-compiled like a pip install (which compiles at install time), kept so if a source
    # changes during the run; no coverage in the children.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("COVERAGE") and k != "PYTHONDONTWRITEBYTECODE"
    }
    if c.uid is not None:
        env.update(HOME=str(md), USER="nobody")
    cpu: list[float] = []  # list.append is atomic: the threads share it
    seconds = _in_threads(count, parallel, lambda _: cpu.append(_one(argv, msg, c.uid, env)))
    return cpu, count / seconds


def run(work: Path, count: int, rounds: int, parallels: list[int], install: bool) -> str:
    """Run every round and return the report (markdown)."""
    cs, notes = contenders(work, install)
    for r in range(rounds):
        order = cs[r % len(cs) :] + cs[: r % len(cs)]
        for label, size in SIZES.items():
            msg = message(size)
            for par in parallels:
                for c in order:
                    slug = "".join(ch if ch.isalnum() else "-" for ch in c.name)
                    md = work / f"{slug}-{size}-{par}"
                    cpu, rate = batch(c, md, msg, count, par)
                    c.cpu.setdefault((label, par), []).extend(cpu)
                    c.rates.setdefault((label, par), []).append(rate)
    return report(cs, notes, count, rounds, parallels)


def report(cs: list[Contender], notes: list[str], count: int, rounds: int, pars: list[int]) -> str:
    """Format the tables, the targets and the machine."""
    noop = next(c for c in cs if c.name == "do-nothing console script")
    ours = next(c for c in cs if c.name == "maildrop deliver")
    lines = [f"{count} messages per round and setting, {rounds} interleaved rounds", ""]
    for label in SIZES:
        for par in pars:
            base = statistics.median(noop.cpu[(label, par)])
            lines += [f"### {label} messages, {par} in parallel", ""]
            lines += ["| agent | fsyncs | CPU ms/msg | x console script | msg/s |"]
            lines += ["|---|---|---:|---:|---:|"]
            for c in cs:
                cpu = statistics.median(c.cpu[(label, par)])
                rate = statistics.median(c.rates[(label, par)])
                lines.append(
                    f"| {c.name} | {c.fsyncs} | {cpu:.2f} | {cpu / base:.2f}x | {rate:.0f} |"
                )
            lines.append("")
    lines += ["### Targets", ""]
    pythons = [c for c in cs if c.name == "stdlib mailbox.Maildir.add"]
    for label in SIZES:
        for par in pars:
            ratio = statistics.median(ours.cpu[(label, par)]) / statistics.median(
                noop.cpu[(label, par)]
            )
            ok = "met" if ratio <= 1.3 else "MISSED"
            rate = statistics.median(ours.rates[(label, par)])
            best = max((statistics.median(p.rates[(label, par)]) for p in pythons), default=0)
            ahead = "met" if rate > best else "MISSED"
            lines.append(
                f"- {label}, {par} in parallel: CPU {ratio:.2f}x the do-nothing console script "
                f"(target <= 1.3x: {ok}); {rate:.0f} msg/s against {best:.0f} for the best "
                f"other Python agent ({ahead})"
            )
    lines += ["", "### Machine", ""]
    lines += [
        f"- {os.cpu_count()} CPUs, Linux {platform.release()}, Python "
        f"{platform.python_version()}, load average at the end {os.getloadavg()[0]:.2f}",
        *(f"- {note}" for note in notes),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its report."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.mda", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--messages", type=int, default=200, help="messages per round and setting")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 8], help="default: 1 8")
    ap.add_argument("--dir", type=Path, help="work directory (default: a fresh temporary one)")
    ap.add_argument("--no-install", action="store_true", help="skip missing peers")
    ap.add_argument("--smoke", action="store_true", help="toy sizes: 3 messages, 1 round")
    args = ap.parse_args(argv)
    if args.smoke:
        args.messages, args.rounds, args.parallel = 3, 1, [1, 2]
    work = Path(tempfile.mkdtemp(prefix="maildrop-mda-", dir=args.dir))
    work.chmod(0o755)  # dovecot-lda runs as nobody and must reach its maildir
    try:
        print(run(work, args.messages, args.rounds, args.parallel, not args.no_install))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
