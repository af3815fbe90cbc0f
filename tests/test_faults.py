"""Fault injection through the syscall table: every step, every call, ENOSPC and EIO."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from maildrop import DEFAULT_SYSCALLS, Maildir, Syscalls, outcome

from .conftest import Faults, listing, open_fds

pytestmark = pytest.mark.anyio

SMALL = b"Subject: s\n\n" + b"x" * 2048
LARGE = b"Subject: l\n\n" + b"y" * (2 * 1024 * 1024 + 7)
STEPS = ["open", "write", "writev", "fsync", "close", "link", "unlink", "fsync_dir", "mkdir"]


async def chunked(data: bytes) -> AsyncIterator[bytes]:
    """Yield *data* in 64 KiB chunks (so batches are written with writev)."""
    for i in range(0, len(data), 65536):
        yield data[i : i + 65536]


def source(data: bytes) -> bytes | AsyncIterator[bytes]:
    """The large message streams in chunks; the small one is plain bytes."""
    return chunked(data) if data is LARGE else data


def counting() -> tuple[Syscalls, dict[str, int]]:
    """Return a table that counts calls per step, and the counts."""
    counts: dict[str, int] = {}

    def wrap(step: str) -> Callable[..., Any]:
        real = getattr(DEFAULT_SYSCALLS, step)

        def inner(*a: Any, **k: Any) -> Any:
            counts[step] = counts.get(step, 0) + 1
            return real(*a, **k)

        return inner

    return DEFAULT_SYSCALLS.replace(**{s: wrap(s) for s in STEPS}), counts


async def calls_per_step(path: Path, data: bytes, fresh: bool) -> dict[str, int]:
    """Count each step's calls in one delivery (into a fresh or an existing maildir)."""
    table, counts = counting()
    if not fresh:
        await Maildir(path).deliver(b"warm-up")
    counts.clear()
    await Maildir(path, syscalls=table).deliver(source(data))
    return dict(counts)


def cases() -> list[tuple[str, bool, int, bytes]]:
    """(step, fresh maildir?, errno, message) combinations where the step is called."""
    return [
        pytest.param(step, fresh, err, data, id=f"{step}-{'fresh' if fresh else 'existing'}-"
                     f"{errno.errorcode[err]}-{'2MiB' if data is LARGE else '2KiB'}")
        for step in STEPS
        for fresh in (False, True)
        for err in (errno.ENOSPC, errno.EIO)
        for data in (SMALL, LARGE)
        # writev only runs for multi-chunk batches; mkdir only when creating the maildir.
        if not (step == "writev" and data is SMALL) and not (step == "mkdir" and not fresh)
    ]  # fmt: skip


@pytest.mark.parametrize(("step", "fresh", "err", "data"), cases())
async def test_each_call_of_each_step_fails_once(
    tmp_path: Path, step: str, fresh: bool, err: int, data: bytes
) -> None:
    """Every call of every step failing once: the errno surfaces, nothing stays, no fd leaks."""
    n = (await calls_per_step(tmp_path / "count", data, fresh)).get(step, 0)
    assert n > 0, f"{step} was never called: the case list is stale"
    for when in range(1, n + 1):
        path = tmp_path / f"md-{when}"
        if not fresh:
            await Maildir(path).deliver(b"existing")
        before_files = listing(path) if not fresh else {"tmp": [], "new": [], "cur": []}
        before_fds = open_fds()
        table = Faults().failing(step, when=when, err=err)
        with pytest.raises(OSError, match=f"injected {errno.errorcode[err]} in {step}") as info:
            await Maildir(path, syscalls=table).deliver(source(data))
        assert info.value.errno == err, (step, when)
        assert outcome(info.value).temporary
        after = listing(path) if path.exists() else {"tmp": [], "new": [], "cur": []}
        assert after == before_files, (step, when)
        assert open_fds() == before_fds, (step, when)
        # The maildir still works afterwards.
        d = await Maildir(path).deliver(data)
        assert d.path.read_bytes() == data


async def test_outcomes_of_injected_errors(tmp_path: Path) -> None:
    """ENOSPC maps to 452 4.3.1, EIO to 451 4.3.0, both temporary with exit 75."""
    for err, reply in ((errno.ENOSPC, "452 4.3.1"), (errno.EIO, "451 4.3.0")):
        table = Faults().failing("write", err=err)
        with pytest.raises(OSError, match=f"injected {errno.errorcode[err]} in write") as info:
            await Maildir(tmp_path / "m", syscalls=table).deliver(SMALL)
        o = outcome(info.value)
        assert o.reply.startswith(reply)
        assert o.exit_code == 75


async def test_short_writes_are_completed(tmp_path: Path) -> None:
    """A write() that takes only part of the buffer is looped until all bytes are written."""

    def short_write(fd: int, data: Any) -> int:
        return DEFAULT_SYSCALLS.write(fd, memoryview(data)[:100])

    def short_writev(fd: int, bufs: Any) -> int:
        return DEFAULT_SYSCALLS.write(fd, memoryview(bufs[0])[:1000])

    table = DEFAULT_SYSCALLS.replace(write=short_write, writev=short_writev)
    d = await Maildir(tmp_path / "m", syscalls=table).deliver(LARGE)
    assert d.path.read_bytes() == LARGE


async def test_zero_write_fails_instead_of_spinning(tmp_path: Path) -> None:
    """A write() returning 0 fails the delivery (EIO) rather than looping forever."""
    table = DEFAULT_SYSCALLS.replace(write=lambda fd, data: 0)
    with pytest.raises(OSError, match=r"write\(\) wrote nothing; nothing was delivered") as info:
        await Maildir(tmp_path / "m", syscalls=table).deliver(SMALL)
    assert info.value.errno == errno.EIO
    assert listing(tmp_path / "m") == {"tmp": [], "new": [], "cur": []}


async def test_link_eexist_picks_a_new_name(tmp_path: Path) -> None:
    """link() refusing an existing target never clobbers: a new name is used."""
    md = tmp_path / "m"
    first = await Maildir(md).deliver(b"first")
    calls = 0

    def link(src: str, dst: str, **kw: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # pretend the new name collides with the existing message
            DEFAULT_SYSCALLS.link(src, first.name, **kw)
        DEFAULT_SYSCALLS.link(src, dst, **kw)

    d = await Maildir(md, syscalls=DEFAULT_SYSCALLS.replace(link=link)).deliver(b"second")
    assert first.path.read_bytes() == b"first"
    assert d.path.read_bytes() == b"second"
    assert d.name != first.name


async def test_rename_fallback_without_hard_links(tmp_path: Path) -> None:
    """Where link() says EPERM (no hard links), the message is renamed into new/."""

    def nolink(*a: Any, **k: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    md = tmp_path / "m"
    d = await Maildir(md, syscalls=DEFAULT_SYSCALLS.replace(link=nolink)).deliver(SMALL)
    assert d.path.read_bytes() == SMALL
    assert listing(md)["tmp"] == []


async def test_rename_fallback_never_clobbers(tmp_path: Path) -> None:
    """The rename fallback refuses an existing target and picks another name."""
    md = tmp_path / "m"
    first = await Maildir(md).deliver(b"first")
    stats = 0

    def nolink(*a: Any, **k: Any) -> None:
        raise OSError(errno.EOPNOTSUPP, "no links")

    def stat(name: str | int, **kw: Any) -> Any:
        nonlocal stats
        if isinstance(name, int):  # the maildir's owner (running as root), not a name check
            return DEFAULT_SYSCALLS.stat(name, **kw)
        stats += 1
        return DEFAULT_SYSCALLS.stat(first.name if stats == 1 else name, **kw)

    table = DEFAULT_SYSCALLS.replace(link=nolink, stat=stat)
    d = await Maildir(md, syscalls=table).deliver(b"second")
    assert first.path.read_bytes() == b"first"
    assert d.path.read_bytes() == b"second"
    assert stats == 2


async def test_name_collisions_in_tmp_are_skipped(tmp_path: Path) -> None:
    """An O_EXCL clash in tmp/ retries with a new name; never opens the existing file."""
    md = tmp_path / "m"
    calls = 0

    def open_(path: str, flags: int, mode: int = 0o777, **kw: Any) -> int:
        nonlocal calls
        if flags & 0o100:  # O_CREAT: the tmp file
            calls += 1
            if calls == 1:
                raise FileExistsError(errno.EEXIST, "exists")
        return DEFAULT_SYSCALLS.open(path, flags, mode, **kw)

    d = await Maildir(md, syscalls=DEFAULT_SYSCALLS.replace(open=open_)).deliver(b"m")
    assert d.path.read_bytes() == b"m"
    assert calls == 2
