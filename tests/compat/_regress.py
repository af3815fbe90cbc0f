"""One weakness of Twisted's maildir append task, checked against the stock task or the shim.

Usage: ``python _regress.py (stock|shim) SCENARIO MAILDIR``; prints ``{"ok": bool, ...}``.
Runs under asyncioreactor in its own process. Each scenario uses only what both classes
share (the class, its ``os*`` hooks, ``MaildirMailbox.appendMessage``), so the same code
judges both.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import stat
import sys
import time
from typing import Any

# Count fsyncs before anything captures os.fsync (maildrop's syscall table does at import).
FSYNCS = {"file": 0, "dir": 0}
_real_fsync = os.fsync


def _counting_fsync(fd: Any) -> None:
    kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
    FSYNCS[kind] += 1
    _real_fsync(fd)


os.fsync = _counting_fsync

from twisted.internet import asyncioreactor  # noqa: E402

asyncioreactor.install()

import twisted.mail.maildir as tmaildir  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402

import compat  # noqa: E402
import maildrop._writer  # noqa: E402 - the clash scenario pins the engine's names
from maildrop import _dircache  # noqa: E402

IMPL, SCENARIO, MAILDIR = sys.argv[1], sys.argv[2], os.fsencode(sys.argv[3])
BASE: Any = {
    "stock": tmaildir._MaildirMailboxAppendMessageTask,
    "shim": compat.MaildirMailboxAppendMessageTask,
}[IMPL]


def listing(sub: str) -> list[str]:
    return sorted(os.listdir(os.path.join(os.fsdecode(MAILDIR), sub)))


def fds() -> set[int]:
    """Open fds but eventfds (maildrop's pool makes one per event loop, kept with the loop),
    after closing the maildir directories kept for reuse (``maildrop._dircache``)."""
    _dircache.forget_all()
    out = set()
    for n in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{n}") != "anon_inode:[eventfd]":
                out.add(int(n))
        except FileNotFoundError:  # the fd listdir itself used
            pass
    return out


async def settle() -> None:
    """Let background cleanup (if any) finish: a few loop turns and 50 ms."""
    await task.deferLater(reactor, 0.05, lambda: None)


def mailbox(factory: Any = BASE) -> Any:
    """Return Twisted's MaildirMailbox on MAILDIR, appending with *factory*."""
    mbox = tmaildir.MaildirMailbox(MAILDIR)
    mbox.AppendFactory = factory
    return mbox


async def append(mbox: Any, msg: Any, within: float = 5) -> Any:
    """Append *msg*; return "ok", the exception, or why the Deferred did not fire."""
    try:
        d = mbox.appendMessage(msg)
    except Exception as exc:
        return f"appendMessage raised {exc!r}; its Deferred never fires"
    d.addTimeout(within, reactor)
    try:
        await d
    except defer.TimeoutError:
        return "timeout"
    except Exception as exc:
        return exc
    return "ok"


async def fsync() -> dict[str, Any]:
    """The message file and new/ are fsynced before the Deferred fires."""
    mbox = mailbox()
    before = dict(FSYNCS)
    res = await append(mbox, b"Subject: x\n\nbody\n")
    got = {k: FSYNCS[k] - before[k] for k in FSYNCS}
    return {"ok": res == "ok" and got["file"] >= 1 and got["dir"] >= 1, "fsyncs": got}


async def clobber() -> dict[str, Any]:
    """A name clash in new/ never replaces a delivered message."""
    mbox = mailbox()
    old = os.path.join(MAILDIR, b"new", b"clash")
    with open(old, "wb") as f:
        f.write(b"OLD MESSAGE\n")
    # Both implementations first pick the name "clash" (Twisted's keeps picking it).
    tmaildir._generateMaildirName = lambda: b"clash"  # type: ignore[assignment]
    names = itertools.chain(["clash"], (f"unique{i}" for i in itertools.count()))
    maildrop._writer.new_name = lambda: next(names)  # type: ignore[assignment]
    res = await append(mbox, b"NEW MESSAGE\n")
    with open(old, "rb") as f:
        kept = f.read() == b"OLD MESSAGE\n"
    return {"ok": kept and res == "ok" and len(listing("new")) == 2, "new": listing("new")}


async def write_error() -> dict[str, Any]:
    """A failed write leaves no tmp file and no open fd behind."""

    class Failing(BASE):  # type: ignore[misc, valid-type]
        def oswrite(self, fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "injected ENOSPC")

    mbox = mailbox(Failing)
    before = fds()
    res = await append(mbox, b"x" * 1000)
    await settle()
    leaked = sorted(fds() - before)
    ok = isinstance(res, OSError) and res.errno == errno.ENOSPC
    return {
        "ok": ok and listing("tmp") == [] and leaked == [],
        "tmp": listing("tmp"),
        "leaked": leaked,
    }


async def short_write() -> dict[str, Any]:
    """A write that takes only part of the data is continued, not ignored."""

    class Short(BASE):  # type: ignore[misc, valid-type]
        def oswrite(self, fd: int, data: bytes) -> int:
            return os.write(fd, data[:7])

    mbox = mailbox(Short)
    msg = bytes(range(256)) * 40
    res = await append(mbox, msg)
    new = listing("new")
    content = b""
    if len(new) == 1:
        with open(os.path.join(os.fsdecode(MAILDIR), "new", new[0]), "rb") as f:
            content = f.read()
    return {"ok": res == "ok" and content == msg, "size": len(content)}


class BrokenSource:
    """A binary file whose second read fails."""

    def __init__(self) -> None:
        self.error = OSError(errno.EIO, "injected EIO in read")
        self.reads = 0

    def read(self, n: int = -1) -> bytes:
        self.reads += 1
        if self.reads > 1:
            raise self.error
        return b"Subject: half a message\n\n"


async def read_error() -> dict[str, Any]:
    """The Deferred fails (with the source's exception) when the source's read fails."""
    mbox = mailbox()
    src = BrokenSource()
    res = await append(mbox, src, within=3)
    await settle()
    return {"ok": res is src.error and listing("tmp") == [], "result": str(res)}


async def blocking() -> dict[str, Any]:
    """A slow disk (a write that takes 0.3 s) does not stall the reactor."""

    class Slow(BASE):  # type: ignore[misc, valid-type]
        def oswrite(self, fd: int, data: bytes) -> int:
            time.sleep(0.3)
            return os.write(fd, data)

    mbox = mailbox(Slow)
    ticks: list[float] = []
    loop = task.LoopingCall(lambda: ticks.append(time.monotonic()))
    loop.start(0.01)
    res = await append(mbox, b"y" * 40_000)
    loop.stop()
    gap = max(b - a for a, b in itertools.pairwise(ticks))
    # Each write takes 0.3 s: on the reactor thread that is a 0.3 s stall.
    return {"ok": res == "ok" and gap < 0.25, "max_gap": round(gap, 3)}


async def main() -> None:
    result = await globals()[SCENARIO]()
    print(json.dumps(result), flush=True)


def run() -> None:
    d = defer.Deferred.fromCoroutine(main())
    d.addErrback(lambda f: print(json.dumps({"ok": False, "crash": f.getTraceback()})))
    d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]


tmaildir.initializeMaildir(MAILDIR)
reactor.callWhenRunning(run)  # type: ignore[attr-defined]
reactor.run()  # type: ignore[attr-defined]
