"""The public namespace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import maildrop


def test_all_is_complete_and_importable() -> None:
    """Every public name is in __all__, and every name in __all__ exists."""
    public = {n for n in dir(maildrop) if not n.startswith("_")}
    modules = {"annotations"}
    assert set(maildrop.__all__) == public - modules - {
        n for n in public if type(getattr(maildrop, n)).__name__ == "module"
    }
    for name in maildrop.__all__:
        assert getattr(maildrop, name) is not None


def test_default_syscalls_is_a_table() -> None:
    """The default table is public and derives modified copies."""
    t = maildrop.DEFAULT_SYSCALLS.replace(fsync=lambda fd: None)
    assert isinstance(t, maildrop.Syscalls)
    assert t.write is maildrop.DEFAULT_SYSCALLS.write
    assert t.fsync is not maildrop.DEFAULT_SYSCALLS.fsync


def test_import_is_lazy() -> None:
    """``import maildrop`` loads no engine; the first use of a name loads its module."""
    code = (
        "import sys, maildrop; a = {m for m in ('anyio', 'asyncio') if m in sys.modules}; "
        "maildrop.Maildir; print(sorted(a), 'anyio' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE")}
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    assert p.stdout.split() == ["[]", "True"]


def test_unknown_attribute_is_an_attribute_error() -> None:
    """A name maildrop does not have raises AttributeError, as for any module."""
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        maildrop.nope  # noqa: B018 - the access is the test
    assert "Maildir" in dir(maildrop)


SIGNATURES = """
from maildrop import Maildir, Quota, deliver
from maildrop.lmtp import MaildirHandler, MaildirServer


async def uses() -> None:
    await deliver("/m", b"x", create=False, fsync=False, max_size=3, size_stamp=True,
                  quota=Quota(bytes=1), flags="S", return_path="", delivered_to="a",
                  crlf_to_lf=True)
    await Maildir("/m").deliver(b"x", flags="S", return_path="", delivered_to="a",
                                crlf_to_lf=False)
    MaildirServer(MaildirHandler("/r"), lmtp=False, hostname="h", timeout=1.0,
                  data_timeout=2.0, max_connections=3, max_recipients=4, retry=None)
    await deliver("/m", b"x", bogus=1)  # refused
    await deliver("/m", b"x", create="no")  # refused
    await Maildir("/m").deliver(b"x", pipeline=True)  # refused
    MaildirServer(MaildirHandler("/r"), False)  # refused
"""


def test_public_signatures_type_check(tmp_path: Path) -> None:
    """mypy accepts the keywords of deliver(), Maildir.deliver(), MaildirServer; not bad ones."""
    api = pytest.importorskip("mypy.api", reason="mypy is not installed")
    (tmp_path / "uses.py").write_text(SIGNATURES)
    out, _, status = api.run(["--strict", "--no-error-summary", str(tmp_path / "uses.py")])
    assert status == 1
    refused = [i for i, line in enumerate(SIGNATURES.splitlines(), 1) if "# refused" in line]
    errors = {int(line.split(":")[1]) for line in out.splitlines() if ": error:" in line}
    assert sorted(errors) == refused


@pytest.mark.anyio
async def test_deliver_refuses_an_unknown_keyword(tmp_path: Path) -> None:
    """A keyword that neither Maildir nor Maildir.deliver takes is a TypeError, before any I/O."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        await maildrop.deliver(tmp_path / "m", b"x", bogus=1)  # type: ignore[call-arg]  # the mistake under test
    assert not (tmp_path / "m").exists()
