"""compat and Twisted's reactors: never imported by compat, refused unless asyncio-based."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..subprocess_coverage import measured_env
from ._util import finish, needs_twisted, start

IMPORT_ONLY = """
import json, sys
import compat
print(json.dumps({"reactor": "twisted.internet.reactor" in sys.modules,
                  "mail": any(m.startswith("twisted.mail") for m in sys.modules),
                  "have_twisted": compat.HAVE_TWISTED}))
"""

DEFAULT_REACTOR = """
import json, sys
from twisted.internet import reactor
import compat

out = {}
def go():
    d = compat.MaildirMailbox(sys.argv[1]).appendMessage(b"x")
    d.addErrback(lambda f: out.update(error=str(f.value), fired_at_once=True))
    out.setdefault("fired_at_once", False)
    reactor.stop()
reactor.callWhenRunning(go)
reactor.run()
out["reactor"] = type(reactor).__name__
print(json.dumps(out))
"""


ASYNCIO_REACTOR = """
import asyncio, json, sys
from twisted.internet import asyncioreactor
asyncioreactor.install()
from twisted.internet import defer, reactor
import twisted.mail.maildir as tmaildir
import compat

out = {}
async def main():
    ours = compat.MaildirMailbox(sys.argv[1])
    out["ours"] = await compat.as_future(ours.appendMessage(b"Subject: 1\\n\\nx\\n"))
    theirs = tmaildir.MaildirMailbox(sys.argv[1].encode())
    theirs.AppendFactory = compat.MaildirMailboxAppendMessageTask
    d = theirs.appendMessage(b"Subject: 2\\n\\ny\\n")
    out["twisted_deferred"] = isinstance(d, defer.Deferred)
    out["theirs"] = await compat.as_future(d)
    try:
        await ours.appendMessage(b"Subject: 3\\n\\nz\\n")
    except RuntimeError as exc:  # what the README's old example did
        out["bare_await"] = str(exc)
def go():
    fut = asyncio.ensure_future(main())
    fut.add_done_callback(lambda f: (out.update(error=repr(f.exception())), reactor.stop()))
reactor.callWhenRunning(go)
reactor.run()
print(json.dumps(out))
"""


def _python(code: str, *args: str, cwd: Path) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=measured_env(),
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_importing_compat_installs_no_reactor(tmp_path: Path) -> None:
    """import compat imports neither twisted.internet.reactor nor twisted.mail."""
    out = _python(IMPORT_ONLY, cwd=tmp_path)
    assert out["reactor"] is False
    assert out["mail"] is False


@needs_twisted
def test_non_asyncio_reactor_fails_at_once(tmp_path: Path) -> None:
    """Under Twisted's default reactor the Deferred fails at once, naming asyncioreactor."""
    out = _python(DEFAULT_REACTOR, str(tmp_path / "Maildir"), cwd=tmp_path)
    assert out["reactor"] != "AsyncioSelectorReactor"
    assert out["fired_at_once"] is True
    assert "asyncioreactor" in str(out["error"])
    assert not (tmp_path / "Maildir").exists()


def test_without_twisted_under_plain_asyncio(tmp_path: Path) -> None:
    """With Twisted unimportable the shim runs on asyncio with compat.Deferred."""
    result = finish(start("_no_twisted.py", str(tmp_path / "Maildir"), cwd=tmp_path))
    assert result.pop("ok") is True, result
    # one, as_future's, the 3 MiB file, and the one cancelled during its publish (linked)
    assert result["new"] == 4


@needs_twisted
def test_as_future_awaits_either_deferred_under_asyncioreactor(tmp_path: Path) -> None:
    """Under asyncioreactor, asyncio code awaits appendMessage through compat.as_future, with
    compat's mailbox and with Twisted's own (a bare await of a Twisted Deferred fails)."""
    out = _python(ASYNCIO_REACTOR, str(tmp_path / "Maildir"), cwd=tmp_path)
    assert out["error"] == "None"
    assert out["ours"] is None
    assert out["theirs"] is None
    assert out["twisted_deferred"] is True
    assert "bad yield" in str(out["bare_await"])
    assert len(list((tmp_path / "Maildir" / "new").iterdir())) >= 2
