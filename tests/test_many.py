"""deliver_many: write once, hard-link into every maildir, per-target results."""

from __future__ import annotations

import errno
import json
import mailbox
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import maildrop
import maildrop._writer
from maildrop import (
    DEFAULT_SYSCALLS,
    Delivery,
    Maildir,
    MaildirNotFoundError,
    MessageTooLargeError,
    Quota,
    QuotaExceededError,
    deliver_many,
)

from .conftest import Faults, HeldCall, listing, open_fds, settle, wait_for

pytestmark = pytest.mark.anyio

MSG = b"Subject: many\r\nTo: list@example.org\r\n\r\nhello all\r\n"


def boxes(tmp_path: Path, n: int, **kw: Any) -> list[Maildir]:
    """Return *n* maildirs under *tmp_path* (not created yet)."""
    return [Maildir(tmp_path / f"box{i}", **kw) for i in range(n)]


def ok(results: list[Delivery | Exception]) -> list[Delivery]:
    """Return the results, asserting that every one is a Delivery."""
    assert all(isinstance(r, Delivery) for r in results), results
    return [r for r in results if isinstance(r, Delivery)]


async def test_links_one_inode_into_every_maildir(tmp_path: Path) -> None:
    """Every target gets a durable link to the same inode; no staging file is left."""
    mds = boxes(tmp_path, 4)
    res = ok(await deliver_many(MSG, mds))
    inodes = {os.stat(d.path).st_ino for d in res}
    assert len(inodes) == 1
    assert all(os.stat(d.path).st_nlink == 4 for d in res)
    for md, d in zip(mds, res, strict=True):
        assert d.path.parent == md.path / "new"
        assert d.path.read_bytes() == MSG
        assert d.size == len(MSG)
        assert listing(md.path)["tmp"] == []
    assert len({d.name for d in res}) == 4


async def test_options_apply_once_and_per_target(tmp_path: Path) -> None:
    """Flags, headers and CRLF conversion are applied once; size stamps per target."""
    mds = [Maildir(tmp_path / "a", size_stamp=True), Maildir(tmp_path / "b")]
    res = ok(await deliver_many(MSG, mds, flags="SF", return_path="s@x", crlf_to_lf=True))
    want = b"Return-Path: <s@x>\n" + MSG.replace(b"\r\n", b"\n")
    assert res[0].name.endswith(f",S={len(want)}:2,FS")
    assert res[1].name.endswith(":2,FS")
    assert ",S=" not in res[1].name
    for d in res:
        assert d.path.parent.name == "cur"
        assert d.path.read_bytes() == want
    box = mailbox.Maildir(tmp_path / "a", create=False)
    (msg,) = list(box)
    assert msg.get_flags() == "FS"
    assert msg["Return-Path"] == "<s@x>"


async def test_failing_targets_get_their_exception(tmp_path: Path) -> None:
    """A failing target (even the first) reports its error; the others are delivered."""
    missing = Maildir(tmp_path / "no" / "such")
    mds = [missing, *boxes(tmp_path, 2), Maildir(tmp_path / "gone", create=False)]
    res = await deliver_many(MSG, mds)
    assert isinstance(res[0], MaildirNotFoundError)
    assert isinstance(res[3], MaildirNotFoundError)
    for d in res[1:3]:
        assert isinstance(d, Delivery)
        assert d.path.read_bytes() == MSG
        assert os.stat(d.path).st_nlink == 2


async def test_stream_source_probes_for_a_primary(tmp_path: Path) -> None:
    """A stream is read once, into the first maildir that opens."""
    reads = 0

    async def src() -> AsyncIterator[bytes]:
        nonlocal reads
        reads += 1
        yield MSG

    mds = [Maildir(tmp_path / "no" / "such"), *boxes(tmp_path, 2)]
    res = await deliver_many(src(), mds)
    assert isinstance(res[0], MaildirNotFoundError)
    assert [d.path.read_bytes() for d in ok(res[1:])] == [MSG, MSG]
    assert reads == 1


async def test_every_target_failing(tmp_path: Path) -> None:
    """When no target works, every result is that target's error."""
    res = await deliver_many(MSG, [Maildir(tmp_path / "x" / "y"), Maildir(tmp_path / "z" / "w")])
    assert all(isinstance(r, MaildirNotFoundError) for r in res)

    async def src() -> AsyncIterator[bytes]:
        yield MSG

    res = await deliver_many(src(), [Maildir(tmp_path / "x" / "y")])
    assert isinstance(res[0], MaildirNotFoundError)


async def test_staging_error_on_a_stream_fails_the_rest(tmp_path: Path, faults: Faults) -> None:
    """A stream cannot be read twice: a staging disk error is every remaining result."""

    async def src() -> AsyncIterator[bytes]:
        yield MSG

    first = Maildir(tmp_path / "a", syscalls=faults.failing("write", err=errno.ENOSPC))
    res = await deliver_many(src(), [first, *boxes(tmp_path, 2)])
    assert all(isinstance(r, OSError) and r.errno == errno.ENOSPC for r in res)
    assert listing(tmp_path / "a") == {"tmp": [], "new": [], "cur": []}


async def test_staging_error_on_bytes_moves_on(tmp_path: Path, faults: Faults) -> None:
    """Bytes can be staged again: a disk error makes the next target the primary."""
    first = Maildir(tmp_path / "a", syscalls=faults.failing("write", err=errno.ENOSPC))
    res = await deliver_many(MSG, [first, *boxes(tmp_path, 2)])
    assert isinstance(res[0], OSError)
    assert res[0].errno == errno.ENOSPC
    assert [d.path.read_bytes() for d in ok(res[1:])] == [MSG, MSG]
    assert listing(tmp_path / "a") == {"tmp": [], "new": [], "cur": []}


async def test_per_target_limits(tmp_path: Path) -> None:
    """max_size and quota are each target's own."""
    small = Maildir(tmp_path / "small", max_size=10)
    full = Maildir(tmp_path / "full", quota=Quota(bytes=10, permanent=True))
    plain = Maildir(tmp_path / "plain")
    res = await deliver_many(MSG, [small, full, plain])
    assert isinstance(res[0], MessageTooLargeError)
    assert isinstance(res[1], QuotaExceededError)
    assert res[1].permanent
    assert isinstance(res[2], Delivery)
    assert os.stat(res[2].path).st_nlink == 1
    for name in ("small", "full"):
        assert listing(tmp_path / name) == {"tmp": [], "new": [], "cur": []}
    roomy = Maildir(tmp_path / "roomy", quota=Quota(bytes=1000))
    ok(await deliver_many(MSG, [roomy]))
    assert (tmp_path / "roomy" / "maildirsize").read_text().endswith(f"{len(MSG)} 1\n")


async def test_too_large_for_everyone(tmp_path: Path) -> None:
    """A message over every target's max_size stops streaming; all results say so."""
    mds = boxes(tmp_path, 2, max_size=10)
    res = await deliver_many(MSG, mds)
    assert all(isinstance(r, MessageTooLargeError) for r in res)
    for md in mds:
        assert listing(md.path) == {"tmp": [], "new": [], "cur": []}


@pytest.mark.parametrize("err", [errno.EXDEV, errno.EMLINK, errno.EPERM])
async def test_copies_where_links_fail(tmp_path: Path, faults: Faults, err: int) -> None:
    """A target refusing the link (other filesystem, link limit) gets a copy."""
    far = Maildir(tmp_path / "far", size_stamp=True, syscalls=faults.failing("link", err=err))
    near = Maildir(tmp_path / "near")
    res = ok(await deliver_many(MSG, [near, far], flags="S"))
    assert os.stat(res[1].path).st_nlink == 1
    assert res[1].path.read_bytes() == MSG
    assert res[1].name.endswith(f",S={len(MSG)}:2,S")
    assert os.stat(res[0].path).st_nlink == 1


async def test_link_errors_are_per_target(tmp_path: Path, faults: Faults) -> None:
    """Any other link error is that target's result, and leaves nothing there."""
    bad = Maildir(tmp_path / "bad", syscalls=faults.failing("link", err=errno.EIO))
    res = await deliver_many(MSG, [*boxes(tmp_path, 1), bad])
    assert isinstance(res[0], Delivery)
    assert isinstance(res[1], OSError)
    assert res[1].errno == errno.EIO
    assert listing(tmp_path / "bad") == {"tmp": [], "new": [], "cur": []}


async def test_dir_fsync_failure_unlinks(tmp_path: Path, faults: Faults) -> None:
    """A destination directory fsync that fails removes that link and reports it."""
    bad = Maildir(tmp_path / "bad", syscalls=faults.failing("fsync_dir", when=4))
    await bad.deliver(b"warm")  # makes the maildir with 3 dir fsyncs
    res = await deliver_many(MSG, [*boxes(tmp_path, 1), bad])
    assert isinstance(res[0], Delivery)
    assert isinstance(res[1], OSError)
    assert len(listing(tmp_path / "bad")["new"]) == 1  # just the warm-up message


async def test_name_collisions_are_retried(tmp_path: Path) -> None:
    """An existing name in the target is never clobbered."""
    calls = 0

    def link(src: Any, dst: Any, **kw: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise FileExistsError(errno.EEXIST, "taken")
        os.link(src, dst, **kw)

    md = Maildir(tmp_path / "a", syscalls=DEFAULT_SYSCALLS.replace(link=link))
    (d,) = ok(await deliver_many(MSG, [md]))
    assert calls == 2
    assert d.path.read_bytes() == MSG


async def test_fsync_false_targets(tmp_path: Path) -> None:
    """Targets with fsync=False skip their directory fsync."""
    res = ok(await deliver_many(MSG, boxes(tmp_path, 2, fsync=False)))
    assert [d.path.read_bytes() for d in res] == [MSG, MSG]


async def test_arguments(tmp_path: Path) -> None:
    """No targets gives []; bad targets, flags or headers raise before any I/O."""
    assert await deliver_many(MSG, []) == []
    with pytest.raises(TypeError, match=r"maildrop\.Maildir"):
        await deliver_many(MSG, [str(tmp_path)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="flag"):
        await deliver_many(MSG, boxes(tmp_path, 1), flags="X")
    with pytest.raises(ValueError, match="return_path"):
        await deliver_many(MSG, boxes(tmp_path, 1), return_path="a\nb")
    assert list(tmp_path.iterdir()) == []
    assert "deliver_many" in maildrop.__all__


async def test_source_exception_propagates(tmp_path: Path) -> None:
    """The source's own exception is raised as the same object."""
    boom = RuntimeError("source broke")

    async def src() -> AsyncIterator[bytes]:
        yield MSG
        raise boom

    with pytest.raises(RuntimeError, match="source broke") as info:
        await deliver_many(src(), boxes(tmp_path, 2))
    assert info.value is boom
    assert listing(tmp_path / "box0") == {"tmp": [], "new": [], "cur": []}


async def test_cancellation_removes_the_staging_file(tmp_path: Path) -> None:
    """Cancelled while streaming: nothing is published and the staging file goes."""
    started = anyio.Event()

    async def src() -> AsyncIterator[bytes]:
        yield b"a" * (2 * 1024 * 1024)
        started.set()
        await anyio.sleep(10)
        yield b"never"

    mds = boxes(tmp_path, 2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(deliver_many, src(), mds)
        await started.wait()
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    empty = {"tmp": [], "new": [], "cur": []}
    await settle(lambda: listing(tmp_path / "box0") == empty, "the cleanup job")


_CHILD = textwrap.dedent(
    """
    import json, os, sys, anyio
    from maildrop import Maildir, deliver_many
    same, mnt = sys.argv[1], sys.argv[2]
    assert os.path.ismount(mnt), "tmpfs not mounted: refusing to write"
    async def main():
        mds = [Maildir(os.path.join(same, "a")), Maildir(os.path.join(same, "b")),
               Maildir(os.path.join(mnt, "c"))]
        res = await deliver_many(sys.stdin.buffer.read(), mds)
        out = []
        for r in res:
            st = os.stat(r.path)
            out.append({"path": str(r.path), "nlink": st.st_nlink, "dev": st.st_dev,
                        "data": r.path.read_bytes().decode()})
        print(json.dumps(out))
    anyio.run(main)
    """
)


def test_three_maildirs_across_filesystems(tmp_path: Path) -> None:
    """Two maildirs on one filesystem share a link; one on a tmpfs gets a copy."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        reason = "needs root and unshare(1) to mount a private tmpfs"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (
        'mount -t tmpfs -o size=1m,nr_inodes=64 tmpfs "$2" && '
        f'exec "{sys.executable}" -c "$3" "$1" "$2"'
    )
    proc = subprocess.run(
        [unshare, "-m", "--propagation", "private", "sh", "-c", script, "sh",
         str(tmp_path), str(mnt), _CHILD],
        input=MSG, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    if proc.returncode != 0 and b"mount" in proc.stderr and b"ismount" not in proc.stderr:
        reason = f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace')[-200:]}"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    a, b, c = json.loads(proc.stdout)
    assert a["nlink"] == b["nlink"] == 2
    assert a["dev"] == b["dev"] != c["dev"]
    assert c["nlink"] == 1
    assert a["data"] == b["data"] == c["data"] == MSG.decode()
    assert not os.path.ismount(mnt)  # the mount stayed in the child's namespace
    assert list(mnt.iterdir()) == []


async def test_file_source_and_header_tail(tmp_path: Path) -> None:
    """A synchronous file is staged once; headers added at the end count for max_size."""
    (tmp_path / "m.eml").write_bytes(MSG)
    with open(tmp_path / "m.eml", "rb") as f:
        res = ok(await deliver_many(f, boxes(tmp_path, 2), return_path="s@x"))
    assert res[0].path.read_bytes() == b"Return-Path: <s@x>\r\n" + MSG
    (tmp_path / "empty").write_bytes(b"")
    small = [Maildir(tmp_path / f"s{i}", max_size=5) for i in range(2)]
    with open(tmp_path / "empty", "rb") as f:
        res2 = await deliver_many(f, small, return_path="s@x")
    assert all(isinstance(r, MessageTooLargeError) for r in res2)
    with open(tmp_path / "empty", "rb") as f:
        (d,) = ok(await deliver_many(f, [Maildir(tmp_path / "e")], return_path="s@x"))
    assert d.path.read_bytes() == b"Return-Path: <s@x>\n"


async def test_failed_copy_is_that_targets_result(tmp_path: Path) -> None:
    """When the copy fallback fails too, that target reports the copy's error."""

    def link(*args: Any, **kw: Any) -> None:
        raise OSError(errno.EXDEV, "other filesystem")

    def cfr(*args: Any) -> int:
        raise OSError(errno.EIO, "copy broke")

    far = Maildir(
        tmp_path / "far", syscalls=DEFAULT_SYSCALLS.replace(link=link, copy_file_range=cfr)
    )
    res = await deliver_many(MSG, [Maildir(tmp_path / "near"), far])
    assert isinstance(res[0], Delivery)
    assert isinstance(res[1], OSError)
    assert res[1].errno == errno.EIO


async def test_unreadable_staging_file_fails_only_the_copy_target(tmp_path: Path) -> None:
    """If the staged file cannot be reopened for a copy, that target reports the error and
    the others are delivered."""

    def link(*args: Any, **kw: Any) -> None:
        raise OSError(errno.EXDEV, "other filesystem")

    def open_(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if str(path).startswith("/proc/self/fd/") and not flags & os.O_WRONLY:
            raise OSError(errno.EMFILE, "injected EMFILE")
        return os.open(path, flags, *args, **kw)

    near = Maildir(tmp_path / "near", syscalls=DEFAULT_SYSCALLS.replace(open=open_))
    far = Maildir(tmp_path / "far", syscalls=DEFAULT_SYSCALLS.replace(link=link))
    res = await deliver_many(MSG, [near, far, Maildir(tmp_path / "also")])
    assert isinstance(res[0], Delivery)
    assert isinstance(res[1], OSError)
    assert res[1].errno == errno.EMFILE
    assert isinstance(res[2], Delivery)
    assert listing(tmp_path / "near")["tmp"] == []


async def test_no_free_name(tmp_path: Path) -> None:
    """A target where every name is taken reports FileExistsError."""

    def link(*args: Any, **kw: Any) -> None:
        raise FileExistsError(errno.EEXIST, "taken")

    full = Maildir(tmp_path / "full", syscalls=DEFAULT_SYSCALLS.replace(link=link))
    res = await deliver_many(MSG, [Maildir(tmp_path / "ok"), full])
    assert isinstance(res[1], FileExistsError)
    assert f"free name in {tmp_path / 'full' / 'new'}/" in str(res[1])


async def test_quota_target_link_failure(tmp_path: Path, faults: Faults) -> None:
    """A link failing under a quota leaves the quota untouched."""
    q = Maildir(tmp_path / "q", quota=Quota(bytes=1000), syscalls=faults.failing("link"))
    res = await deliver_many(MSG, [Maildir(tmp_path / "ok"), q])
    assert isinstance(res[1], OSError)
    assert (tmp_path / "q" / "maildirsize").read_text() == "1000S\n0 0\n"


async def test_cancelled_during_the_fsyncs(tmp_path: Path, faults: Faults) -> None:
    """Cancelled while directories are fsynced: links stay, nothing leaks."""
    import threading
    import time

    entered = threading.Event()

    def slow_fsync_dir(fd: int) -> None:
        entered.set()
        time.sleep(0.2)
        os.fsync(fd)

    slow = Maildir(tmp_path / "slow", syscalls=DEFAULT_SYSCALLS.replace(fsync_dir=slow_fsync_dir))
    await deliver_many(b"warm", [Maildir(tmp_path / "near"), slow])  # make the maildirs
    far = Maildir(tmp_path / "far", syscalls=faults.failing("link", err=errno.EXDEV))
    await Maildir(tmp_path / "far").deliver(b"warm")
    entered.clear()
    before = open_fds()
    async with anyio.create_task_group() as tg:
        tg.start_soon(deliver_many, MSG, [Maildir(tmp_path / "near"), slow, far])
        while not entered.is_set():  # noqa: ASYNC110 - a worker thread sets it
            await anyio.sleep(0.005)
        tg.cancel_scope.cancel()
    # The abandoned worker finishes its fsync, closes its fds and removes the staging file.
    await settle(
        lambda: open_fds() <= before and listing(tmp_path / "near")["tmp"] == [],
        "the abandoned worker's fsync and cleanup",
    )
    assert len(listing(tmp_path / "slow")["new"]) == 2  # linked: it stays
    assert listing(tmp_path / "near")["tmp"] == []
    assert len(listing(tmp_path / "far")["new"]) == 1  # the copy never started


_FD_CHILD = textwrap.dedent(
    """
    import asyncio, os, resource, sys
    from maildrop import Delivery, Maildir, deliver_many
    root, n = sys.argv[1], int(sys.argv[2])
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    mds = [Maildir(os.path.join(root, f"m{i}")) for i in range(n)]
    res = asyncio.run(deliver_many(b"Subject: fan-out\\n\\nhi\\n", mds))
    bad = [r for r in res if not isinstance(r, Delivery)]
    assert not bad, bad[:3]
    assert all(r.path.read_bytes() == b"Subject: fan-out\\n\\nhi\\n" for r in res)
    print(len(res))
    """
)


def test_a_thousand_targets_fit_in_256_fds(tmp_path: Path) -> None:
    """1 000 targets succeed under RLIMIT_NOFILE 256: the fds held at once are bounded."""
    for i in range(1000):  # made here, so the child only delivers
        for sub in ("tmp", "new", "cur"):
            (tmp_path / f"m{i}" / sub).mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-c", _FD_CHILD, str(tmp_path), "1000"],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert proc.stdout.strip() == b"1000"


# -- regressions --------------------------------------------------------------------------


async def test_deliver_many_cancelled_while_staging_leaks_no_fds(tmp_path: Path) -> None:
    """Cancelling deliver_many while its staging file is fsynced leaves no fd open."""
    fsync = HeldCall(os.fsync, timeout=5)
    await Maildir(tmp_path / "a").deliver(b"warm")
    await Maildir(tmp_path / "b").deliver(b"warm")
    first = Maildir(tmp_path / "a", syscalls=DEFAULT_SYSCALLS.replace(fsync=fsync))
    second = Maildir(tmp_path / "b")
    before = open_fds()
    scopes: list[anyio.CancelScope] = []

    async def run() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await deliver_many(MSG, [first, second])

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await wait_for(fsync.entered)
            scopes[0].cancel()
            await anyio.sleep(0.05)
            fsync.release.set()
    finally:
        fsync.release.set()
    await settle(
        lambda: listing(tmp_path / "a")["tmp"] == [] and open_fds() <= before, "the cleanup"
    )


@pytest.mark.parametrize("anyio_backend", ["trio"])  # asyncio's pool runs queued jobs anyway
async def test_deliver_many_cancelled_while_a_dir_fsync_waits_for_a_thread(
    tmp_path: Path, anyio_backend: str
) -> None:
    """A cancel that lands while a target's directory fsync waits for a thread leaks no fd."""
    from maildrop._backend import run_sync
    from maildrop._pool import THREADS, anyio_limiter

    hold, gate, blocked = threading.Event(), threading.Event(), threading.Event()

    def block(real: Any) -> Any:
        def inner(*args: Any, **kwargs: Any) -> Any:
            blocked.set()
            gate.wait(5)
            return real(*args, **kwargs)

        return inner

    table = DEFAULT_SYSCALLS.replace(fsync_dir=block(os.fsync), unlink=block(os.unlink))
    for name in ("a", "b"):
        await Maildir(tmp_path / name).deliver(b"warm")
    mds = [Maildir(tmp_path / name, syscalls=table) for name in ("a", "b")]
    before = open_fds()
    scopes: list[anyio.CancelScope] = []

    async def run() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await deliver_many(MSG, mds)

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(THREADS - 1):  # every thread token but one is busy elsewhere
                tg.start_soon(run_sync, hold.wait, 5)
            with anyio.fail_after(5):
                while anyio_limiter().borrowed_tokens < THREADS - 1:  # noqa: ASYNC110
                    await anyio.sleep(0.002)
            tg.start_soon(run)
            await wait_for(blocked)  # the last token is stuck; a _sync task waits for one
            scopes[0].cancel()
            await anyio.sleep(0.05)
            gate.set()
            hold.set()
    finally:
        gate.set()
        hold.set()
    await settle(lambda: open_fds() <= before, "the workers' cleanup")


async def test_deliver_many_raises_a_source_oserror(tmp_path: Path) -> None:
    """An OSError raised by the source propagates from deliver_many as the same object."""
    boom = ConnectionResetError(errno.ECONNRESET, "peer went away")

    async def src() -> AsyncIterator[bytes]:
        yield MSG
        raise boom

    with pytest.raises(ConnectionResetError, match="peer went away") as info:
        await deliver_many(src(), [Maildir(tmp_path / "a"), Maildir(tmp_path / "b")])
    assert info.value is boom


async def test_without_proc_links_and_copies_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without /proc the staged file is linked, and reopened for a copy, by its tmp/ name."""
    monkeypatch.setattr(maildrop._writer, "_PROC_FD", False)
    seen: list[str] = []

    def link(src: Any, dst: Any, **kw: Any) -> None:
        seen.append(f"link {src}")
        os.link(src, dst, **kw)

    def open_(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        seen.append(f"open {path}")
        return os.open(path, flags, *args, **kw)

    refused = 0

    def link_once_refused(*args: Any, **kw: Any) -> None:
        nonlocal refused
        refused += 1
        if refused == 1:  # the fan-out's link; the copy's own delivery then links
            raise OSError(errno.EXDEV, "other filesystem")
        os.link(*args, **kw)

    table = DEFAULT_SYSCALLS.replace(link=link, open=open_)
    near = [Maildir(tmp_path / f"near{i}", syscalls=table) for i in range(2)]
    far = Maildir(tmp_path / "far", syscalls=DEFAULT_SYSCALLS.replace(link=link_once_refused))
    res = ok(await deliver_many(MSG, [*near, far]))
    assert [d.path.read_bytes() for d in res] == [MSG] * 3
    assert os.stat(res[0].path).st_ino == os.stat(res[1].path).st_ino
    assert os.stat(res[2].path).st_ino != os.stat(res[0].path).st_ino
    assert refused == 2
    assert not [s for s in seen if "/proc/" in s]
    staged = [s for s in seen if s.startswith("link ")]
    assert len(staged) == 2
    assert f"open {staged[0].removeprefix('link ')}" in seen  # reopened for the copy
    assert [listing(tmp_path / n)["tmp"] for n in ("near0", "near1", "far")] == [[], [], []]


async def test_without_proc_a_name_collision_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without /proc a taken name in a target is retried under a new one, never clobbered."""
    monkeypatch.setattr(maildrop._writer, "_PROC_FD", False)
    names: list[str] = []

    def link(src: Any, dst: Any, **kw: Any) -> None:
        names.append(dst)
        if len(names) == 1:
            raise FileExistsError(errno.EEXIST, "taken")
        os.link(src, dst, **kw)

    md = Maildir(tmp_path / "a", syscalls=DEFAULT_SYSCALLS.replace(link=link))
    (d,) = ok(await deliver_many(MSG, [Maildir(tmp_path / "b"), md]))[1:]
    assert d.name == names[1] != names[0]
    assert d.path.read_bytes() == MSG
