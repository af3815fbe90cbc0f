"""The worker-side writer: ownership when running as root, and where an error happened."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import maildrop._writer
from maildrop import DEFAULT_SYSCALLS, Maildir, Quota
from maildrop._writer import DeliveryFiles, Settings

from .conftest import listing

MSG = b"Subject: hi\n\nbody\n"
NOBODY = 65534

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: only root can give files to another user"
)


def owned_by_nobody(path: Path) -> Path:
    """Make *path* a directory owned by nobody (uid and gid 65534)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, NOBODY, NOBODY)
    return path


def owners(*paths: Path) -> set[tuple[int, int]]:
    """The (uid, gid) of each path, as a set."""
    return {(p.lstat().st_uid, p.lstat().st_gid) for p in paths}


@needs_root
@pytest.mark.anyio
async def test_root_gives_files_and_new_dirs_to_the_maildir_owner(tmp_path: Path) -> None:
    """Root delivering (async API) into nobody's maildir: message, tmp/ new/ cur/, a new
    folder and its maildirfolder all belong to nobody."""
    md = owned_by_nobody(tmp_path / "md")
    d = await Maildir(md).deliver(MSG)
    f = await Maildir(md).folder("Lists").deliver(MSG, flags="S")
    folder = md / ".Lists"
    made = [d.path, f.path, md / "tmp", md / "new", md / "cur", folder, folder / "tmp"]
    made += [folder / "new", folder / "cur", folder / "maildirfolder"]
    assert owners(*made) == {(NOBODY, NOBODY)}
    assert d.path.stat().st_mode & 0o777 == 0o600


@needs_root
@pytest.mark.anyio
async def test_root_creates_a_maildir_for_its_parents_owner(tmp_path: Path) -> None:
    """A missing ~user/Maildir made by root belongs to the owner of ~user."""
    home = owned_by_nobody(tmp_path / "home")
    d = await Maildir(home / "Maildir").deliver(MSG)
    assert owners(home / "Maildir", home / "Maildir" / "new", d.path) == {(NOBODY, NOBODY)}


@needs_root
@pytest.mark.anyio
async def test_own_maildir_is_not_chowned(tmp_path: Path) -> None:
    """Root's own maildir: no chown call at all."""
    calls: list[Any] = []

    def chown(*a: Any, **k: Any) -> None:
        calls.append(a)

    table = DEFAULT_SYSCALLS.replace(chown=chown, fchown=chown)
    await Maildir(tmp_path / "md", syscalls=table).deliver(MSG)
    assert calls == []


@needs_root
@pytest.mark.anyio
async def test_failed_fchown_leaves_nothing(tmp_path: Path) -> None:
    """fchown failing (injected) fails the delivery with its errno and removes the file."""

    def fchown(fd: int, uid: int, gid: int) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    md = owned_by_nobody(tmp_path / "md")
    for sub in ("tmp", "new", "cur"):
        owned_by_nobody(md / sub)
    with pytest.raises(PermissionError, match="not permitted"):
        await Maildir(md, syscalls=DEFAULT_SYSCALLS.replace(fchown=fchown)).deliver(MSG)
    assert listing(md) == {"tmp": [], "new": [], "cur": []}


@needs_root
@pytest.mark.anyio
async def test_root_gives_a_recalculated_maildirsize_to_the_owner(tmp_path: Path) -> None:
    """A maildirsize root writes into nobody's maildir (a recalculation) is nobody's."""
    md = owned_by_nobody(tmp_path / "md")
    d = await Maildir(md, quota=Quota(bytes=10_000)).deliver(MSG)
    assert owners(md / "maildirsize", d.path) == {(NOBODY, NOBODY)}
    assert (md / "maildirsize").read_bytes().startswith(b"10000S\n")


@needs_root
def test_root_command_delivers_as_the_maildir_owner(tmp_path: Path) -> None:
    """``maildrop deliver`` run as root into nobody's maildir: the file is nobody's."""
    md = owned_by_nobody(tmp_path / "md")
    p = subprocess.run(
        [sys.executable, "-m", "maildrop", "deliver", str(md)],
        input=MSG, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert owners(Path(p.stdout.decode().strip()), md / "tmp") == {(NOBODY, NOBODY)}


@pytest.mark.parametrize(
    ("filename", "filename2", "expected"),
    [
        ("tmp", None, "/m/.F/tmp"),
        (".F", None, "/m/.F"),
        ("maildirsize", None, "/m/maildirsize"),
        ("123_maildirsize", None, "/m/tmp/123_maildirsize"),
        ("123.M1P2.host", None, "/m/.F/tmp/123.M1P2.host"),
        ("/proc/self/fd/7", "123.M1P2.host", "/m/.F/new/123.M1P2.host"),
        ("/abs/path", None, "/abs/path"),
        (None, None, "/m/.F"),
    ],
)
def test_locate_names_the_absolute_path(
    filename: str | None, filename2: str | None, expected: str
) -> None:
    """A kernel error on a relative name (or none) is given the path it concerns."""
    tmp = DeliveryFiles(Settings("/m", ".F", True, True, DEFAULT_SYSCALLS), "new")
    exc = OSError(errno.EACCES, "Permission denied", filename, None, filename2)
    tmp.locate(exc)
    assert exc.filename == expected
    assert exc.filename2 is None
    assert exc.errno == errno.EACCES


def test_locate_names_the_file_being_written() -> None:
    """A write error (no name) names the tmp file, or the published one after the link."""
    tmp = DeliveryFiles(Settings("/m", None, True, True, DEFAULT_SYSCALLS), "new")
    tmp.tmp_name = "1.M2.h"
    exc = OSError(errno.ENOSPC, "No space left on device")
    tmp.locate(exc)
    assert exc.filename == "/m/tmp/1.M2.h"
    tmp.tmp_name, tmp.final_name = None, "1.M2.h"
    exc = OSError(errno.EIO, "Input/output error")
    tmp.locate(exc)
    assert exc.filename == "/m/new/1.M2.h"


@pytest.mark.anyio
async def test_without_proc_the_tmp_name_is_linked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without /proc the message is linked from its name in tmp/ (no symlink followed)."""
    monkeypatch.setattr(maildrop._writer, "_PROC_FD", False)
    calls: list[tuple[Any, dict[str, Any]]] = []

    def link(src: Any, dst: Any, **kw: Any) -> None:
        calls.append((src, kw))
        os.link(src, dst, **kw)

    d = await Maildir(tmp_path / "m", syscalls=DEFAULT_SYSCALLS.replace(link=link)).deliver(MSG)
    assert d.path.read_bytes() == MSG
    ((src, kw),) = calls
    assert "/" not in src
    assert d.name.startswith(src)
    assert kw["follow_symlinks"] is False
    assert listing(tmp_path / "m")["tmp"] == []


@needs_root
@pytest.mark.anyio
async def test_a_maildirsize_swapped_after_its_rename_is_not_chowned(tmp_path: Path) -> None:
    """Root gives a recalculated maildirsize to the user through its fd, before the rename:
    a hard link to a root file put at that name afterwards is never chowned."""
    md = owned_by_nobody(tmp_path / "md")
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's\n")
    real_rename = DEFAULT_SYSCALLS.rename

    def rename(src: str, dst: str, **kw: Any) -> None:
        real_rename(src, dst, **kw)
        if dst == "maildirsize":  # the user's swap, right after the rename
            os.unlink(md / "maildirsize")
            os.link(victim, md / "maildirsize")

    table = DEFAULT_SYSCALLS.replace(rename=rename)
    await Maildir(md, quota=Quota(bytes=10_000), syscalls=table).deliver(MSG)
    assert owners(victim) == {(0, 0)}
