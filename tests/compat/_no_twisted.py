"""Exercise the shim with Twisted made unimportable; print ``{"ok": true, ...}``.

Usage: ``python _no_twisted.py MAILDIR``. A ``sys.meta_path`` finder refuses every
``twisted`` module before ``compat`` is imported, so the shim must fall back to its own
Deferred, Failure, FileSender and IConsumer and run under plain asyncio.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any


class BlockTwisted:
    """Refuse to import Twisted, as if it were not installed."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name == "twisted" or name.startswith("twisted."):
            raise ImportError(f"{name} is blocked for this test")
        return None


sys.meta_path.insert(0, BlockTwisted())

from zope.interface.verify import verifyObject  # noqa: E402

import compat  # noqa: E402

MAILDIR = sys.argv[1]
checks: dict[str, Any] = {}


class NoSpace(compat.MaildirMailboxAppendMessageTask):
    def oswrite(self, fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "injected ENOSPC")


class SlowRename(compat.MaildirMailboxAppendMessageTask):
    def osrename(self, src: str, dst: str) -> None:
        import time

        time.sleep(0.2)
        os.rename(src, dst)


async def main() -> None:
    loop = asyncio.get_running_loop()
    mbox = compat.MaildirMailbox(MAILDIR)
    d = mbox.appendMessage(b"Subject: one\n\nbody\n")
    checks["deferred_type"] = type(d) is compat.Deferred
    seen: list[Any] = []
    d.addCallback(lambda r: seen.append(("cb", r)) or "chained")
    checks["await_result"] = await d == "chained"
    checks["callback_ran"] = seen == [("cb", None)]
    checks["as_future"] = await compat.as_future(mbox.appendMessage(b"Subject: f\n\nf\n")) is None
    big = os.urandom(3 << 20)
    await mbox.appendMessage(io.BytesIO(big))
    with open(mbox.list[-1], "rb") as f:
        checks["file_source_exact"] = f.read() == big
    checks["list"] = len(mbox.list) == 3 and all(isinstance(p, str) for p in mbox.list)

    mbox.AppendFactory = NoSpace
    failures: list[Any] = []
    d = mbox.appendMessage(b"x")
    d.addErrback(lambda f: failures.append(f))
    await d.asFuture(loop)
    f = failures[0]
    checks["errback_failure"] = isinstance(f, compat.Failure) and f.check(OSError) is OSError
    checks["errno"] = getattr(f.value, "errno", None) == errno.ENOSPC
    try:
        await mbox.appendMessage(b"y")
    except OSError as exc:
        checks["await_raises"] = exc.errno == errno.ENOSPC

    # Cancelling the awaiting task cancels the Deferred; nothing is left behind.
    mbox.AppendFactory = SlowRename
    try:
        await asyncio.wait_for(mbox.appendMessage(b"z"), 0.05)
    except TimeoutError:
        checks["cancel_timeout"] = True
    await asyncio.sleep(0.4)
    checks["tmp_empty"] = os.listdir(os.path.join(MAILDIR, "tmp")) == []

    task = compat.MaildirMailboxAppendMessageTask(mbox, b"")
    checks["iconsumer"] = verifyObject(compat.IConsumer, task)
    checks["iconsumer_is_compat"] = compat.IConsumer.__module__ == "compat"


def no_loop() -> None:
    """Without a running loop, the Deferred fails at once (nothing hangs)."""
    failures: list[Any] = []
    d = compat.MaildirMailbox(MAILDIR).appendMessage(b"x")
    d.addErrback(failures.append)
    checks["no_loop_fails_at_once"] = bool(failures) and "asyncio" in str(failures[0].value)


asyncio.run(main())
no_loop()
checks["twisted_not_loaded"] = not any(m.startswith("twisted") for m in sys.modules)
checks["have_twisted_flag"] = compat.HAVE_TWISTED is False
checks["new"] = len(os.listdir(os.path.join(MAILDIR, "new")))
print(json.dumps({"ok": all(v is True for k, v in checks.items() if k != "new"), **checks}))
