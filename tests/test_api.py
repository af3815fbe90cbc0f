"""The public namespace."""

from __future__ import annotations

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
