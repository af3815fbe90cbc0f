"""A delivery's directories: opening and creating a maildir and its folders, safely."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from maildrop import DEFAULT_SYSCALLS, Maildir, MaildirNotFoundError, NotAMaildirError
from maildrop._dirs import Dirs, Settings, parent_of

from .conftest import open_fds, wait_for


def dirs_for(root: Path, folder: str | None = None, **kwargs: Any) -> Dirs:
    """Dirs of a delivery into new/ of *root* (or its Maildir++ *folder*)."""
    opts: dict[str, Any] = {"create": True, "fsync": True, "syscalls": DEFAULT_SYSCALLS}
    opts.update(kwargs)
    return Dirs(Settings(str(root), folder, **opts), "new")


def test_open_dirs_creates_a_private_maildir_and_close_dirs_closes_it(tmp_path: Path) -> None:
    """open_dirs makes the maildir with tmp/ new/ cur/ (mode 0700); close_dirs closes every fd."""
    before = open_fds()
    dirs = dirs_for(tmp_path / "m")
    dirs.open_dirs()
    md = tmp_path / "m"
    for d in (md, md / "tmp", md / "new", md / "cur"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert os.fstat(dirs.tmp_fd).st_ino == (md / "tmp").stat().st_ino
    assert os.fstat(dirs.dest_fd).st_ino == (md / "new").stat().st_ino
    assert os.fstat(dirs.root_fd).st_ino == md.stat().st_ino
    dirs.close_dirs()
    assert (dirs.dir_fds, dirs.tmp_fd, dirs.dest_fd) == ([], -1, -1)
    assert open_fds() <= before


def test_creating_fsyncs_each_parent_once(tmp_path: Path) -> None:
    """A new maildir's entry and its subdirectories are made durable; an existing one is not."""
    synced: list[int] = []

    def fsync_dir(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        os.fsync(fd)

    table = DEFAULT_SYSCALLS.replace(fsync_dir=fsync_dir)
    dirs = dirs_for(tmp_path / "m", syscalls=table)
    dirs.open_dirs()
    dirs.close_dirs()
    assert synced == [tmp_path.stat().st_ino, (tmp_path / "m").stat().st_ino]
    synced.clear()
    again = dirs_for(tmp_path / "m", syscalls=table)
    again.open_dirs()
    again.close_dirs()
    assert synced == []


def test_without_fsync_nothing_is_fsynced(tmp_path: Path) -> None:
    """fsync=False creates the maildir without a single directory fsync."""

    def fsync_dir(fd: int) -> None:
        raise AssertionError("fsync_dir called with fsync=False")

    dirs = dirs_for(
        tmp_path / "m", fsync=False, syscalls=DEFAULT_SYSCALLS.replace(fsync_dir=fsync_dir)
    )
    dirs.open_dirs()
    dirs.close_dirs()
    assert (tmp_path / "m" / "new").is_dir()


def test_create_false_refuses_a_missing_maildir_and_creates_nothing(tmp_path: Path) -> None:
    """Without create, a missing maildir is MaildirNotFoundError and nothing appears."""
    dirs = dirs_for(tmp_path / "m", create=False)
    with pytest.raises(MaildirNotFoundError, match="pass create=True"):
        dirs.open_dirs()
    dirs.close_dirs()
    assert list(tmp_path.iterdir()) == []


def test_create_false_refuses_a_maildir_without_its_subdirectories(tmp_path: Path) -> None:
    """Without create, a maildir directory lacking tmp/ is refused, not completed."""
    (tmp_path / "m").mkdir()
    dirs = dirs_for(tmp_path / "m", create=False)
    with pytest.raises(MaildirNotFoundError, match="no maildir at"):
        dirs.open_dirs()
    dirs.close_dirs()
    assert list((tmp_path / "m").iterdir()) == []


def test_a_missing_parent_directory_is_named(tmp_path: Path) -> None:
    """A maildir whose parent is missing fails with a message saying so."""
    dirs = dirs_for(tmp_path / "no" / "m")
    with pytest.raises(MaildirNotFoundError, match="its parent directory is missing"):
        dirs.open_dirs()
    dirs.close_dirs()
    assert not (tmp_path / "no").exists()


def test_a_folder_is_created_marked_inside_a_whole_parent_maildir(tmp_path: Path) -> None:
    """A new Maildir++ folder gets tmp/ new/ cur/, a maildirfolder file, and a whole parent."""
    dirs = dirs_for(tmp_path / "m", ".Sent")
    dirs.open_dirs()
    dirs.close_dirs()
    md = tmp_path / "m"
    assert sorted(p.name for p in md.iterdir()) == [".Sent", "cur", "new", "tmp"]
    assert sorted(p.name for p in (md / ".Sent").iterdir()) == [
        "cur",
        "maildirfolder",
        "new",
        "tmp",
    ]
    assert (md / ".Sent" / "maildirfolder").stat().st_size == 0


@pytest.mark.parametrize("link", [True, False])
def test_a_subdirectory_that_is_a_symlink_or_a_file_is_refused(tmp_path: Path, link: bool) -> None:
    """tmp/ as a symlink or a regular file is NotAMaildirError naming it; nothing is followed."""
    md = tmp_path / "m"
    md.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if link:
        (md / "tmp").symlink_to(elsewhere)
    else:
        (md / "tmp").write_bytes(b"")
    dirs = dirs_for(md)
    match = "is a symbolic link" if link else "is not a directory"
    with pytest.raises(NotAMaildirError, match=match) as info:
        dirs.open_dirs()
    dirs.close_dirs()
    assert str(md / "tmp") in str(info.value)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "where"),
    [
        (".Sent", "root"),
        ("maildirsize", "root"),
        ("tmp", "path"),
        ("maildirfolder", "path"),
        ("123.M1P2.host", "path/tmp"),
        ("123_maildirsize", "root/tmp"),
    ],
)
def test_parent_of_names_the_directory_of_a_failed_call(name: str, where: str) -> None:
    """parent_of maps a relative name to the directory it lives in, for error messages."""
    lay = Settings("/r", ".Sent", True, True, DEFAULT_SYSCALLS)
    expected = {
        "root": "/r",
        "path": "/r/.Sent",
        "path/tmp": "/r/.Sent/tmp",
        "root/tmp": "/r/tmp",
    }[where]
    assert parent_of(lay, name) == expected


# -- regressions --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrent_first_delivery_waits_until_the_new_maildir_is_durable(
    tmp_path: Path,
) -> None:
    """A delivery into a maildir that another delivery just created waits for its parent fsync."""
    parent = os.stat(tmp_path).st_ino
    entered, gate = threading.Event(), threading.Event()
    synced = threading.Event()

    def fsync_dir(fd: int) -> None:
        if os.fstat(fd).st_ino == parent:  # makes the new maildir's own entry durable
            entered.set()
            gate.wait(5)
            os.fsync(fd)
            synced.set()
            return
        os.fsync(fd)

    md = Maildir(tmp_path / "m", syscalls=DEFAULT_SYSCALLS.replace(fsync_dir=fsync_dir))
    seen: dict[str, bool] = {}

    async def second() -> None:
        await md.deliver(b"second")
        seen["durable"] = synced.is_set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(md.deliver, b"first")  # mkdir Maildir, then blocks in its fsync
            await wait_for(entered)
            tg.start_soon(second)  # finds the maildir made: must not return before the fsync
            await anyio.sleep(0.3)
            gate.set()
    finally:
        gate.set()
    assert seen["durable"]
