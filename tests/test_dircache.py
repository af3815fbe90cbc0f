"""Maildir directories kept open for the next delivery into the same maildir."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from maildrop import DEFAULT_SYSCALLS, Maildir, NotAMaildirError, _dircache
from maildrop._dirs import Dirs, Settings

from .conftest import listing, open_fds

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _held_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(_dircache, "_holders", 1)  # as while one server runs
    _dircache.forget_all()
    yield
    _dircache.forget_all()


def entry_for(md: Path, folder: str | None = None, sub: str = "new") -> _dircache.Entry | None:
    return _dircache._table.get((str(md), folder, sub))


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


async def test_a_second_delivery_reuses_the_directories(tmp_path: Path) -> None:
    """The second delivery into a maildir uses the fds the first one opened, and gives them
    back: nothing is left in use."""
    md = Maildir(tmp_path / "m")
    await md.deliver(b"one\n")
    first = entry_for(tmp_path / "m")
    assert first is not None
    assert first.users == 0
    assert inode(first.dest_fd) == (tmp_path / "m" / "new").stat().st_ino
    await md.deliver(b"two\n")
    assert entry_for(tmp_path / "m") is first
    assert first.users == 0
    assert not first.dropped
    assert len(listing(tmp_path / "m")["new"]) == 2


async def test_a_moved_maildir_is_opened_afresh(tmp_path: Path) -> None:
    """A maildir moved aside and made again at its path gets the next message, not the
    moved one; the old entry's fds are closed."""
    md = Maildir(tmp_path / "m")
    await md.deliver(b"one\n")
    old = entry_for(tmp_path / "m")
    assert old is not None
    (tmp_path / "m").rename(tmp_path / "moved")
    await md.deliver(b"two\n")
    assert old.dropped
    assert old.dir_fds == ()
    assert len(listing(tmp_path / "m")["new"]) == 1
    assert len(listing(tmp_path / "moved")["new"]) == 1


async def test_a_deleted_maildir_is_not_delivered_into(tmp_path: Path) -> None:
    """A maildir removed after a delivery is refused (create=False) or made again, never
    written through the fds of the removed one."""
    await Maildir(tmp_path / "m").deliver(b"one\n")
    shutil.rmtree(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no maildir at"):
        await Maildir(tmp_path / "m", create=False).deliver(b"two\n")
    await Maildir(tmp_path / "m").deliver(b"three\n")
    assert len(listing(tmp_path / "m")["new"]) == 1


async def test_a_symlink_put_in_place_of_the_maildir_is_refused(tmp_path: Path) -> None:
    """The maildir replaced by a symlink (to another maildir) is refused as before."""
    await Maildir(tmp_path / "m").deliver(b"one\n")
    await Maildir(tmp_path / "other").deliver(b"x\n")
    (tmp_path / "m").rename(tmp_path / "aside")
    (tmp_path / "m").symlink_to(tmp_path / "other")
    with pytest.raises(NotAMaildirError, match="symlink"):
        await Maildir(tmp_path / "m").deliver(b"two\n")
    assert len(listing(tmp_path / "other")["new"]) == 1


async def test_an_old_entry_is_opened_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After MAX_AGE a new/ replaced inside the same maildir gets the next message."""
    monkeypatch.setattr(_dircache, "MAX_AGE", 0.0)
    md = Maildir(tmp_path / "m")
    await md.deliver(b"one\n")
    (tmp_path / "m" / "new").rename(tmp_path / "m" / "old-new")
    (tmp_path / "m" / "new").mkdir()
    await md.deliver(b"two\n")
    assert len(listing(tmp_path / "m")["new"]) == 1


async def test_an_aborted_delivery_drops_its_entry(tmp_path: Path) -> None:
    """A delivery that fails or is aborted after its first write drops the entry it used
    and closes its fds."""
    md = Maildir(tmp_path / "m")
    await md.deliver(b"small\n")
    kept = entry_for(tmp_path / "m")
    assert kept is not None
    before = set(kept.dir_fds)
    async with md.open_delivery() as d:
        await d.write(b"x" * (2 << 20))  # past one batch: written, so the dirs are in use
        assert kept.users == 1
        await d.abort()
    assert kept.dropped
    assert entry_for(tmp_path / "m") is None
    assert not before & open_fds()
    assert listing(tmp_path / "m")["tmp"] == []


async def test_concurrent_deliveries_share_one_entry(tmp_path: Path) -> None:
    """Deliveries in flight at once share the entry; a dropped one closes its fds only when
    the last of them gives it back."""
    md = Maildir(tmp_path / "m")
    await md.deliver(b"warm\n")
    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(md.deliver, b"m%d\n" % i)
    kept = entry_for(tmp_path / "m")
    assert kept is not None
    assert kept.users == 0
    assert len(listing(tmp_path / "m")["new"]) == 21


def test_give_back_closes_a_dropped_entry_once_unused(tmp_path: Path) -> None:
    """An entry dropped while two deliveries use it keeps its fds until both give it back."""
    dirs = Dirs(Settings(str(tmp_path / "m"), None, True, True, DEFAULT_SYSCALLS), "new")
    dirs.reuse = True
    dirs.open_dirs()
    again = Dirs(dirs.settings, "new")
    again.reuse = True
    again.open_dirs()
    kept = entry_for(tmp_path / "m")
    assert kept is not None
    assert kept.users == 2
    assert again.tmp_fd == dirs.tmp_fd
    dirs.close_dirs(failed=True)
    assert kept.dropped
    assert kept.dir_fds != ()
    assert inode(again.tmp_fd) == (tmp_path / "m" / "tmp").stat().st_ino
    again.close_dirs()
    assert kept.dir_fds == ()


def test_a_custom_syscall_table_is_never_cached(tmp_path: Path) -> None:
    """A test's or a hook's table sees every open: nothing is kept for it."""
    table = DEFAULT_SYSCALLS.replace(open=os.open)
    dirs = Dirs(Settings(str(tmp_path / "m"), None, True, True, table), "new")
    dirs.reuse = True
    dirs.open_dirs()
    dirs.close_dirs()
    assert _dircache._table == {}


def test_the_table_is_bounded_least_recent_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond the limit the least recently kept entry goes (and its fds are closed)."""
    monkeypatch.setattr(_dircache, "_limit", lambda: 2)
    kept = []
    for name in ("a", "b", "c"):
        dirs = Dirs(Settings(str(tmp_path / name), None, True, True, DEFAULT_SYSCALLS), "new")
        dirs.reuse = True
        dirs.open_dirs()
        dirs.close_dirs()
        kept.append(entry_for(tmp_path / name))
    assert [e is not None and e.dropped for e in kept] == [True, False, False]
    assert len(_dircache._table) == 2


def test_a_low_fd_limit_keeps_fewer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table holds at most a sixteenth of RLIMIT_NOFILE in fds (none under 48)."""
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 4096))
    assert _dircache._limit() == 5
    monkeypatch.setattr(resource, "getrlimit", lambda _: (40, 4096))
    assert _dircache._limit() == 0
    monkeypatch.setattr(resource, "getrlimit", lambda _: (resource.RLIM_INFINITY,) * 2)
    assert _dircache._limit() == _dircache.MAX_ENTRIES


def test_nothing_is_kept_under_a_tiny_fd_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no room for an entry the directories are closed as before."""
    monkeypatch.setattr(_dircache, "_limit", lambda: 0)
    before = open_fds()
    dirs = Dirs(Settings(str(tmp_path / "m"), None, True, True, DEFAULT_SYSCALLS), "new")
    dirs.reuse = True
    dirs.open_dirs()
    dirs.close_dirs()
    assert _dircache._table == {}
    assert open_fds() <= before


def test_a_forked_child_forgets_the_parent_entries(tmp_path: Path) -> None:
    """After fork the child has no entries (it closed its copies of their fds)."""
    dirs = Dirs(Settings(str(tmp_path / "m"), None, True, True, DEFAULT_SYSCALLS), "new")
    dirs.reuse = True
    dirs.open_dirs()
    dirs.close_dirs()
    kept = entry_for(tmp_path / "m")
    assert kept is not None
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        ok = _dircache._table == {} and all(not _is_open(fd) for fd in kept.dir_fds)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert all(_is_open(fd) for fd in kept.dir_fds)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_a_folder_has_its_own_entry(tmp_path: Path) -> None:
    """A Maildir++ folder is kept apart from its parent maildir."""
    md = Maildir(tmp_path / "m")
    await md.deliver(b"inbox\n")
    await md.folder("Work").deliver(b"work\n")
    await md.folder("Work").deliver(b"work again\n")
    top, folder = entry_for(tmp_path / "m"), entry_for(tmp_path / "m", ".Work")
    assert top is not None
    assert folder is not None
    assert top is not folder
    assert inode(folder.dest_fd) == (tmp_path / "m" / ".Work" / "new").stat().st_ino
    assert len(listing(tmp_path / "m" / ".Work")["new"]) == 2


async def test_nothing_is_kept_without_a_server(tmp_path: Path) -> None:
    """Without a running server every delivery closes its directories: a library caller
    never finds its filesystem kept busy after deliver() returned."""
    _dircache.release()
    before = open_fds()
    await Maildir(tmp_path / "m").deliver(b"one\n")
    assert _dircache._table == {}
    assert open_fds() <= before


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_server_holds_the_cache_until_it_shuts_down(tmp_path: Path) -> None:
    """MaildirServer keeps directories from its first socket; its shutdown closes them."""
    from maildrop.lmtp import MaildirHandler, MaildirServer

    _dircache.release()
    (tmp_path / "alice").mkdir()
    server = MaildirServer(MaildirHandler(tmp_path))
    await server.listen("127.0.0.1:0")
    assert _dircache._holders == 1
    await Maildir(tmp_path / "alice").deliver(b"one\n")
    assert entry_for(tmp_path / "alice") is not None
    await server.shutdown(grace=0)
    assert _dircache._holders == 0
    assert _dircache._table == {}
