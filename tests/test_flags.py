"""Flags and size stamps, read back by the stdlib's mailbox.Maildir (the oracle)."""

from __future__ import annotations

import itertools
import mailbox
from pathlib import Path

import pytest

from maildrop import Maildir

pytestmark = pytest.mark.anyio


async def test_stdlib_reads_every_flag_combination(maildir_path: Path) -> None:
    """All 64 flag sets land in cur/ as :2,<sorted flags>; mailbox.Maildir agrees."""
    md = Maildir(maildir_path, size_stamp=True, fsync=False)
    want: dict[str, str] = {}
    for n in range(7):
        for combo in itertools.combinations("DFPRST", n):
            flags = "".join(reversed(combo))  # given unsorted, stored sorted
            msg = f"Subject: {flags or '-'}\n\nbody\n".encode()
            d = await md.deliver(msg, flags=flags)
            assert d.name.endswith(f",S={len(msg)}:2,{''.join(sorted(combo))}")
            want[flags or "-"] = "".join(sorted(combo))
    plain = await md.deliver(b"Subject: none\n\n")
    assert plain.path.parent.name == "new"
    box = mailbox.Maildir(maildir_path, create=False)
    got = {m["Subject"]: m.get_flags() for m in box if m["Subject"] != "none"}
    assert got == want
    assert all(m.get_subdir() == "cur" for m in box if m["Subject"] != "none")
    (none,) = [m for m in box if m["Subject"] == "none"]
    assert (none.get_subdir(), none.get_flags()) == ("new", "")


async def test_duplicate_flags_are_merged(maildir_path: Path) -> None:
    """Repeated flags are stored once."""
    d = await Maildir(maildir_path).deliver(b"x", flags="SSRS")
    assert d.name.endswith(":2,RS")


@pytest.mark.parametrize("bad", ["s", "X", "S ", "2,S", ":"])
async def test_invalid_flags_do_no_io(maildir_path: Path, bad: str) -> None:
    """A flag outside DFPRST raises ValueError before the maildir is created."""
    with pytest.raises(ValueError, match="invalid maildir flag"):
        await Maildir(maildir_path).deliver(b"x", flags=bad)
    with pytest.raises(ValueError, match="invalid maildir flag"):
        Maildir(maildir_path).open_delivery(flags=bad)
    assert not maildir_path.exists()
