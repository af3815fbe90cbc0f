"""Twisted's contenders, in a process of their own.

Twisted's reactor is process-global and cannot be uninstalled, so ``compare.py`` (and the
pytest suite) start this module once as ``python -m benchmarks._twisted`` and send it one JSON
command per line on stdin; it answers one JSON line per command on stdout. The process
installs ``asyncioreactor`` on a fresh asyncio loop before importing ``twisted.mail``, then
runs every command on that loop (``loop.run_until_complete``), awaiting Deferreds through
``Deferred.asFuture``. The compat shim's contenders run here too: with Twisted installed its
``defer`` is a real Deferred fired on this reactor's loop, as in a Twisted application.

Commands: ``{"op": "twisted"|"compat"|"maildrop", "path": str, "size": int, "n": int,
"concurrency": int, "fsync": bool}`` -> ``{"seconds": float, "stall": float, "stall_no_gc":
float, "gc_pause": float, "rss_growth": int, "cpu": float}`` or ``{"error": str}``;
``{"op": "probe"}`` -> ``{"twisted": bool, "compat": bool}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ._contenders import Probe, concurrently, message, monitored

_loop = asyncio.new_event_loop()
asyncio.set_event_loop(_loop)
try:
    from twisted.internet import asyncioreactor

    asyncioreactor.install(_loop)
    from twisted.mail import maildir as twisted_maildir
except ImportError:  # pragma: no cover - Twisted is an optional extra
    twisted_maildir = None


def _compat_mailbox(path: Path, fsync: bool) -> Any:
    """Return a compat ``MaildirMailbox``; with *fsync* false, one whose task skips fsyncs.

    compat has no ``fsync=`` switch; its task's documented ``syscalls`` table is the hook:
    a subclass whose table makes ``fsync``/``fsync_dir`` no-ops is what ``fsync=False``
    does in the engine.
    """
    import compat
    from maildrop import DEFAULT_SYSCALLS

    if fsync:
        return compat.MaildirMailbox(str(path))

    class Task(compat.MaildirMailboxAppendMessageTask):
        syscalls = DEFAULT_SYSCALLS.replace(fsync=_no_fsync, fsync_dir=_no_fsync)

    class Mailbox(compat.MaildirMailbox):
        AppendFactory = Task

    return Mailbox(str(path))


def _no_fsync(fd: int) -> None:
    """Skip the fsync (the ``fsync=False`` contender)."""


def _appender(op: str, path: Path, fsync: bool) -> Callable[[bytes], Any]:
    if op == "twisted":
        if twisted_maildir is None:
            raise RuntimeError("Twisted is not installed")
        mbox = twisted_maildir.MaildirMailbox(str(path).encode())
        return mbox.appendMessage  # type: ignore[no-any-return]
    if op == "compat":
        return _compat_mailbox(path, fsync).appendMessage  # type: ignore[no-any-return]
    raise ValueError(f"unknown op {op!r}")


async def _run(cmd: dict[str, Any]) -> dict[str, Any]:
    path = Path(cmd["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    msg = message(cmd["size"])
    n, conc, fsync = cmd["n"], cmd["concurrency"], cmd.get("fsync", True)
    if cmd["op"] == "maildrop":
        from maildrop import Maildir

        md = Maildir(path, fsync=fsync)
        await md.deliver(msg)
        one: Callable[[], Awaitable[object]] = lambda: md.deliver(msg)  # noqa: E731
    else:
        append = _appender(cmd["op"], path, fsync)
        await append(msg).asFuture(_loop)  # warm-up; creates what is missing
        one = lambda: append(msg).asFuture(_loop)  # noqa: E731
    probe: Probe
    async with monitored() as probe:
        t0 = time.perf_counter()
        await concurrently(n, conc, one)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "stall": probe.stall, "stall_no_gc": probe.stall_no_gc,
            "gc_pause": probe.gc_pause, "rss_growth": probe.rss_growth,
            "cpu": probe.cpu}  # fmt: skip


def _probe() -> dict[str, Any]:
    try:
        import compat

        has_compat = hasattr(compat, "MaildirMailbox")
    except ImportError:  # pragma: no cover
        has_compat = False
    return {"twisted": twisted_maildir is not None, "compat": has_compat}


def main() -> None:
    """Serve commands from stdin until it closes."""
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            out = _probe() if cmd["op"] == "probe" else _loop.run_until_complete(_run(cmd))
        except Exception as exc:
            out = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
