"""Maildir.clean_tmp: stale tmp files go, live deliveries and fresh files stay."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest

from maildrop import DEFAULT_SYSCALLS, Maildir

from .conftest import Faults, listing

pytestmark = pytest.mark.anyio

DAY = 24 * 3600


async def test_removes_only_stale_files(maildir_path: Path) -> None:
    """Files older than the cut-off go; fresher ones and directories stay."""
    md = Maildir(maildir_path)
    await md.deliver(b"x")
    tmp = maildir_path / "tmp"
    (tmp / "old").write_bytes(b"crash leftover")
    (tmp / "new-ish").write_bytes(b"recent")
    (tmp / "adir").mkdir()
    os.symlink("/nonexistent", tmp / "dangling")
    now = time.time()
    assert await md.clean_tmp(now=now) == []  # nothing is 36 hours old yet
    removed = await md.clean_tmp(older_than=DAY, now=now + 2 * DAY)
    assert removed == ["dangling", "new-ish", "old"]
    assert listing(maildir_path)["tmp"] == ["adir"]
    assert len(listing(maildir_path)["new"]) == 1


async def test_default_is_36_hours(maildir_path: Path) -> None:
    """The default age is the maildir spec's 36 hours."""
    md = Maildir(maildir_path)
    await md.deliver(b"x")
    (maildir_path / "tmp" / "f").write_bytes(b"")
    now = time.time()
    assert await md.clean_tmp(now=now + 35 * 3600) == []
    assert await md.clean_tmp(now=now + 37 * 3600) == ["f"]


async def test_never_removes_a_live_delivery(maildir_path: Path) -> None:
    """A tmp file this process is still writing survives any sweep."""
    md = Maildir(maildir_path)
    async with md.open_delivery() as w:
        # Two batches: the second write waits for the first, so the tmp file exists.
        await w.write(b"a" * (1024 * 1024))
        await w.write(b"a" * (1024 * 1024))
        (live,) = listing(maildir_path)["tmp"]
        assert await md.clean_tmp(older_than=0, now=time.time() + DAY) == []
        d = await w.commit()
    assert d.path.read_bytes() == b"a" * (2 * 1024 * 1024)
    assert live not in listing(maildir_path)["tmp"]


async def test_missing_maildir_or_tmp(maildir_path: Path) -> None:
    """A maildir (or tmp/) that does not exist has nothing to clean."""
    assert await Maildir(maildir_path).clean_tmp(older_than=0) == []
    maildir_path.mkdir()
    assert await Maildir(maildir_path).clean_tmp(older_than=0) == []
    assert list(maildir_path.iterdir()) == []


async def test_folders_are_cleaned_separately(maildir_path: Path) -> None:
    """A folder's tmp/ is cleaned through that folder."""
    md = Maildir(maildir_path)
    await md.folder("Sub").deliver(b"x")
    (maildir_path / ".Sub" / "tmp" / "f").write_bytes(b"")
    later = time.time() + DAY
    assert await md.clean_tmp(older_than=0, now=later) == []
    assert await md.folder("Sub").clean_tmp(older_than=0, now=later) == ["f"]


async def test_bad_arguments(maildir_path: Path) -> None:
    """older_than must be a non-negative number."""
    md = Maildir(maildir_path)
    with pytest.raises(ValueError, match="negative"):
        await md.clean_tmp(-1)
    with pytest.raises(TypeError, match="seconds"):
        await md.clean_tmp("36h")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seconds"):
        await md.clean_tmp(True)


async def test_vanishing_files_are_skipped(maildir_path: Path) -> None:
    """A file removed between the listing and the unlink is not reported or fatal."""
    md0 = Maildir(maildir_path)
    await md0.deliver(b"x")
    for name in ("a", "b"):
        (maildir_path / "tmp" / name).write_bytes(b"")
    real_stat = DEFAULT_SYSCALLS.stat

    def stat(name: Any, *args: Any, **kw: Any) -> os.stat_result:
        if name == "a":
            raise FileNotFoundError(errno.ENOENT, "gone")
        return real_stat(name, *args, **kw)

    def unlink(name: Any, *args: Any, **kw: Any) -> None:
        os.unlink(name, *args, **kw)
        raise FileNotFoundError(errno.ENOENT, "raced")

    md = Maildir(maildir_path, syscalls=DEFAULT_SYSCALLS.replace(stat=stat, unlink=unlink))
    assert await md.clean_tmp(older_than=0, now=time.time() + DAY) == []
    assert listing(maildir_path)["tmp"] == ["a"]


async def test_unlink_errors_are_raised(maildir_path: Path, faults: Faults) -> None:
    """Any other unlink error is raised (and the directory fds are closed)."""
    await Maildir(maildir_path).deliver(b"x")
    (maildir_path / "tmp" / "f").write_bytes(b"")
    md = Maildir(maildir_path, syscalls=faults.failing("unlink", err=errno.EACCES))
    with pytest.raises(PermissionError, match="injected EACCES in unlink"):
        await md.clean_tmp(older_than=0, now=time.time() + DAY)
    assert listing(maildir_path)["tmp"] == ["f"]


async def test_failed_create_is_not_left_live(maildir_path: Path, faults: Faults) -> None:
    """A tmp create that fails forgets its name (the live set does not grow)."""
    from maildrop._writer import LIVE_TMP

    await Maildir(maildir_path).deliver(b"x")
    before = set(LIVE_TMP)
    md = Maildir(maildir_path, syscalls=faults.failing("open", when=4, err=errno.EACCES))
    with pytest.raises(PermissionError, match="injected EACCES in open"):
        await md.deliver(b"y")
    assert set(LIVE_TMP) <= before
