"""The public namespace."""

from __future__ import annotations

import os
import subprocess
import sys

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
