"""Maildir++ quota: the maildirsize rules, enforcement while streaming, recalculation."""

from __future__ import annotations

import errno
import io
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from maildrop import DEFAULT_SYSCALLS, Maildir, Quota, QuotaExceededError, deliver, outcome
from maildrop._quota import (
    counts_toward_quota,
    folder_entries,
    format_delta,
    format_maildirsize,
    over_quota,
    parse_limits,
    parse_maildirsize,
    size_from_name,
)

from .conftest import Faults, listing, open_fds

MSG = b"Subject: q\n\n" + b"x" * 88  # 100 bytes


def usage(md: Path) -> tuple[int | None, int | None, int, int]:
    """Return (limit bytes, limit messages, used bytes, used messages) from maildirsize."""
    q = parse_maildirsize((md / "maildirsize").read_bytes())
    return q.limit_bytes, q.limit_messages, q.used_bytes, q.used_messages


def seed(md: Path, content: bytes, *, age: float = 0) -> None:
    """Create the maildir with *content* as its maildirsize, *age* seconds old."""
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True, exist_ok=True)
    (md / "maildirsize").write_bytes(content)
    t = time.time() - age
    os.utime(md / "maildirsize", (t, t))


# -- pure rules ---------------------------------------------------------------------------


@given(
    st.one_of(st.none(), st.integers(1, 10**12)),
    st.one_of(st.none(), st.integers(1, 10**6)),
    st.lists(st.tuples(st.integers(-(10**9), 10**9), st.integers(-5, 5)), max_size=20),
)
def test_maildirsize_round_trip(
    limit_b: int | None, limit_m: int | None, deltas: list[tuple[int, int]]
) -> None:
    """A recalculated file plus appended lines parses back to the sums."""
    data = format_maildirsize(limit_b, limit_m, 10, 1)
    data += b"".join(format_delta(b, c) for b, c in deltas)
    q = parse_maildirsize(data)
    assert (q.limit_bytes, q.limit_messages) == (limit_b, limit_m)
    assert q.used_bytes == 10 + sum(b for b, _ in deltas)
    assert q.used_messages == 1 + sum(c for _, c in deltas)
    assert q.lines == 1 + len(deltas)


def test_parse_is_lenient_like_courier() -> None:
    """Malformed members and lines are skipped; 0 means no limit; padding is fine."""
    assert parse_limits("100S,10C") == (100, 10)
    assert parse_limits("0S,5C,xyz,7Q, 9S") == (9, 5)
    q = parse_maildirsize(b"1000S\n         12          1\nbogus\n5 x\n-3 -1\n7 1")
    assert (q.used_bytes, q.used_messages, q.lines) == (16, 1, 5)
    assert q.malformed  # counted without the bad lines, and to be recalculated
    assert not parse_maildirsize(b"1000S\n12 1\n").malformed
    assert parse_maildirsize(b"").lines == 0


@given(st.binary(max_size=300))
def test_parse_never_raises(data: bytes) -> None:
    """Any bytes at all parse: what does not parse is ignored and marked."""
    q = parse_maildirsize(data)
    assert q.lines >= 0


@given(st.integers(19, 5000))
def test_huge_numbers_are_malformed_not_fatal(digits: int) -> None:
    """A number longer than 18 digits (Python refuses past 4 300) is a line that does not parse."""
    huge = "9" * digits
    q = parse_maildirsize(f"{huge}S,5C\n1 1\n{huge} 1\n".encode())
    assert (q.limit_bytes, q.limit_messages, q.used_bytes, q.used_messages) == (None, 5, 1, 1)
    assert q.malformed
    assert parse_limits(f"{huge}S") == (None, None)


def test_name_rules() -> None:
    """,S= stamps are read from the base name; trashed and hidden files do not count."""
    assert size_from_name("123.M1P2.host,S=4567") == 4567
    assert size_from_name("123.M1P2.host,S=4567,W=4600:2,S") == 4567
    assert size_from_name("123.M1P2.host:2,S=1") is None
    assert size_from_name("123.M1P2.host,S=x") is None
    assert counts_toward_quota("1.host:2,RS")
    assert not counts_toward_quota("1.host:2,ST")
    assert not counts_toward_quota(".hidden")
    assert counts_toward_quota("1.host")


def test_over_quota_is_strictly_greater() -> None:
    """Exactly at the limit is within quota."""
    assert not over_quota(100, None, 100, 99)
    assert over_quota(100, None, 101, 0)
    assert over_quota(None, 3, 0, 4)
    assert not over_quota(None, None, 10**12, 10**9)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_quota_validation(bad: Any) -> None:
    """Limits are positive ints or None; a non-Quota is refused by Maildir."""
    with pytest.raises(ValueError, match="positive int"):
        Quota(bytes=bad)
    with pytest.raises(ValueError, match="messages"):
        Quota(messages=bad)


def test_maildir_rejects_non_quota(tmp_path: Path) -> None:
    """quota= takes a Quota."""
    with pytest.raises(TypeError, match="Quota"):
        Maildir(tmp_path, quota=1000)  # type: ignore[arg-type]


# -- on disk ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_code_quota_creates_and_appends(maildir_path: Path) -> None:
    """A quota in code creates maildirsize, then appends one line per delivery."""
    md = Maildir(maildir_path, quota=Quota(bytes=1000, messages=5), size_stamp=True)
    await md.deliver(MSG)
    await md.deliver(MSG + b"yy")
    text = (maildir_path / "maildirsize").read_text()
    assert text == "1000S,5C\n0 0\n100 1\n102 1\n"
    assert usage(maildir_path) == (1000, 5, 202, 2)


@pytest.mark.anyio
@pytest.mark.parametrize("permanent", [False, True])
async def test_over_quota_is_refused(maildir_path: Path, permanent: bool) -> None:
    """Passing the byte or message limit raises QuotaExceededError and leaves nothing."""
    md = Maildir(maildir_path, quota=Quota(bytes=250, messages=10, permanent=permanent))
    await md.deliver(MSG)
    await md.deliver(MSG)
    with pytest.raises(QuotaExceededError, match="over quota") as info:
        await md.deliver(MSG)
    assert info.value.permanent is permanent
    assert info.value.errno == errno.EDQUOT
    reply = "552 5.2.2 Mailbox full" if permanent else "452 4.2.2 Mailbox full, try again later"
    assert outcome(info.value).reply == reply
    files = listing(maildir_path)
    assert (len(files["new"]), files["tmp"]) == (2, [])
    await md.deliver(MSG[:50])  # exactly up to the limit still fits
    assert usage(maildir_path)[2:] == (250, 3)


@pytest.mark.anyio
async def test_message_count_limit(maildir_path: Path) -> None:
    """The C limit counts messages."""
    md = Maildir(maildir_path, quota=Quota(messages=2))
    await md.deliver(b"a")
    await md.deliver(b"b")
    with pytest.raises(QuotaExceededError, match="2 of 2 messages"):
        await md.deliver(b"c")


@pytest.mark.anyio
async def test_stops_while_streaming(maildir_path: Path) -> None:
    """A stream is refused once it passes the quota, without reading it to the end."""
    md = Maildir(maildir_path, quota=Quota(bytes=3 * 1024 * 1024))
    sent = 0

    async def big() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(100):
            sent += 1
            yield b"z" * (256 * 1024)

    with pytest.raises(QuotaExceededError, match="is over quota: 0 of 3145728 bytes"):
        await md.deliver(big())
    assert sent <= 24  # within two 1 MiB batches of passing the limit (writes pipeline)
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["file", "bytesio"])
async def test_file_sources_are_checked(maildir_path: Path, tmp_path: Path, kind: str) -> None:
    """Files copied in the worker (copy_file_range or read) are checked per batch."""
    data = b"f" * (3 * 1024 * 1024)
    (tmp_path / "m").write_bytes(data)
    md = Maildir(maildir_path, quota=Quota(bytes=2 * 1024 * 1024))
    src: Any = open(tmp_path / "m", "rb") if kind == "file" else io.BytesIO(data)  # noqa: SIM115
    with src, pytest.raises(QuotaExceededError, match="is over quota: 0 of 2097152 bytes"):
        await md.deliver(src)
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}
    with open(tmp_path / "m", "rb") as f:
        f.seek(2 * 1024 * 1024)
        d = await md.deliver(f)
    assert d.size == 1024 * 1024


@pytest.mark.anyio
async def test_recalculates_a_missing_file(maildir_path: Path) -> None:
    """Without maildirsize, usage is counted from new/ and cur/ of every folder but Trash."""
    plain = Maildir(maildir_path)
    await plain.deliver(b"x" * 10)  # no stamp: stat'ed
    await plain.deliver(b"x" * 20, flags="S")
    await plain.folder("Lists").deliver(b"x" * 30)
    await plain.folder("Trash").deliver(b"x" * 1000)  # Trash does not count
    await plain.deliver(b"x" * 1000, flags="T")  # nor trashed messages
    (maildir_path / "cur" / ".hidden").write_bytes(b"x" * 1000)
    (maildir_path / ".notafolder").write_bytes(b"")
    (maildir_path / ".Broken").mkdir()  # a folder without new/ cur/
    os.symlink(maildir_path / ".Lists", maildir_path / ".Linked")  # not followed
    stamped = Maildir(maildir_path, quota=Quota(bytes=10_000), size_stamp=True)
    await stamped.folder("Lists").deliver(b"y" * 40)  # a folder uses the top maildirsize
    assert not (maildir_path / ".Lists" / "maildirsize").exists()
    assert usage(maildir_path) == (10_000, None, 100, 4)
    assert listing(maildir_path)["tmp"] == []


@pytest.mark.anyio
async def test_recalculates_a_long_file(maildir_path: Path) -> None:
    """A maildirsize of 5120 bytes or more is recalculated."""
    seed(maildir_path, b"500S\n" + b"1 1\n" * 1280)
    await Maildir(maildir_path, quota=Quota()).deliver(MSG)
    assert (maildir_path / "maildirsize").read_text() == "500S\n0 0\n100 1\n"


@pytest.mark.anyio
async def test_recalculates_negative_totals(maildir_path: Path) -> None:
    """Totals below zero are distrusted."""
    seed(maildir_path, b"500S\n-300 -3\n")
    await Maildir(maildir_path, quota=Quota()).deliver(MSG)
    assert usage(maildir_path) == (500, None, 100, 1)


@pytest.mark.anyio
async def test_fresh_one_line_file_is_trusted(maildir_path: Path) -> None:
    """Over quota by a fresh, freshly recalculated file: refused without recounting."""
    seed(maildir_path, b"500S\n480 5\n")
    md = Maildir(maildir_path, quota=Quota())
    with pytest.raises(
        QuotaExceededError,
        match=r"over quota: 480 of 500 bytes \(96%\) used; this message needs at least 100 bytes",
    ):
        await md.deliver(MSG)
    assert usage(maildir_path) == (500, None, 480, 5)


@pytest.mark.anyio
async def test_old_file_is_recounted_when_over(maildir_path: Path) -> None:
    """Over quota by a file at least 15 minutes old: recount, then deliver."""
    seed(maildir_path, b"500S\n480 5\n", age=15 * 60 + 5)
    await Maildir(maildir_path, quota=Quota()).deliver(MSG)
    assert (maildir_path / "maildirsize").read_text() == "500S\n0 0\n100 1\n"


@pytest.mark.anyio
async def test_many_lines_are_recounted_when_over(maildir_path: Path) -> None:
    """Over quota by a file with several delta lines: recount, then decide."""
    seed(maildir_path, b"500S\n0 0\n240 1\n240 1\n")
    await Maildir(maildir_path, quota=Quota()).deliver(MSG)
    assert usage(maildir_path) == (500, None, 100, 1)


@pytest.mark.anyio
async def test_code_limits_replace_file_limits(maildir_path: Path) -> None:
    """Limits given in code win: the file is rewritten with them."""
    seed(maildir_path, b"50S\n0 0\n")
    await Maildir(maildir_path, quota=Quota(bytes=5000, messages=9)).deliver(MSG)
    assert usage(maildir_path) == (5000, 9, 100, 1)


@pytest.mark.anyio
async def test_file_quota_without_file_is_no_quota(maildir_path: Path) -> None:
    """Quota() with no maildirsize enforces nothing and creates nothing."""
    md = Maildir(maildir_path, quota=Quota())
    d = await md.deliver(b"x" * 100_000)
    assert d.size == 100_000
    assert not (maildir_path / "maildirsize").exists()


@pytest.mark.anyio
async def test_file_quota_without_limits_is_maintained(maildir_path: Path) -> None:
    """A maildirsize without limits (0S) is kept up to date but never refuses."""
    seed(maildir_path, b"0S\n0 0\n")
    await deliver(maildir_path, MSG, quota=Quota())
    assert (maildir_path / "maildirsize").read_text() == "0S\n0 0\n100 1\n"


@pytest.mark.anyio
async def test_symlinked_maildirsize_is_refused(maildir_path: Path, tmp_path: Path) -> None:
    """maildirsize is opened O_NOFOLLOW: a planted symlink fails the delivery."""
    seed(maildir_path, b"500S\n0 0\n")
    (maildir_path / "maildirsize").unlink()
    (tmp_path / "elsewhere").write_bytes(b"500S\n0 0\n")
    os.symlink(tmp_path / "elsewhere", maildir_path / "maildirsize")
    with pytest.raises(
        OSError, match="maildirsize' is a symbolic link, not a regular file with one link"
    ) as info:
        await Maildir(maildir_path, quota=Quota()).deliver(MSG)
    assert info.value.errno == errno.ELOOP
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}


def plant(kind: str, md: Path, outside: Path) -> None:
    """Make md's maildirsize a FIFO, a symlink or a hard link to *outside*."""
    seed(md, b"500S\n0 0\n")
    (md / "maildirsize").unlink()
    if kind == "fifo":
        os.mkfifo(md / "maildirsize")
    elif kind == "symlink":
        os.symlink(outside, md / "maildirsize")
    else:
        os.link(outside, md / "maildirsize")


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["fifo", "symlink", "hardlink"])
async def test_unusable_maildirsize_is_replaced_under_code_limits(
    maildir_path: Path, tmp_path: Path, kind: str
) -> None:
    """With limits in code, a FIFO/symlinked/hard-linked maildirsize is recalculated into a
    fresh file: nothing blocks, nothing outside the maildir is written."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"1000S\n0 0\n")  # the limits match: only its kind is wrong
    plant(kind, maildir_path, outside)
    with anyio.fail_after(5):
        await Maildir(maildir_path, quota=Quota(bytes=1000)).deliver(MSG)
    assert outside.read_bytes() == b"1000S\n0 0\n"
    st_ = os.lstat(maildir_path / "maildirsize")
    assert st_.st_nlink == 1
    assert usage(maildir_path) == (1000, None, 100, 1)
    assert len(listing(maildir_path)["new"]) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["fifo", "symlink", "hardlink"])
async def test_unusable_maildirsize_with_file_limits_is_a_temporary_error(
    maildir_path: Path, tmp_path: Path, kind: str
) -> None:
    """With the limits only in maildirsize, an unusable one fails the delivery temporarily
    (at once, not blocked in open()) and is left as it is."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"500S\n0 0\n")
    plant(kind, maildir_path, outside)
    with (
        anyio.fail_after(5),
        pytest.raises(OSError, match="not a regular file with one link") as info,
    ):
        await Maildir(maildir_path, quota=Quota()).deliver(MSG)
    assert outcome(info.value).reply == "451 4.3.0 Local error in processing"
    assert outside.read_bytes() == b"500S\n0 0\n"
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}


@pytest.mark.anyio
async def test_huge_number_in_maildirsize_is_recalculated(maildir_path: Path) -> None:
    """A 5 000-digit number is a line that does not parse: the file is recalculated."""
    seed(maildir_path, b"500S\n0 0\n" + b"9" * 5000 + b" 1\n")
    await Maildir(maildir_path, quota=Quota()).deliver(MSG)
    assert (maildir_path / "maildirsize").read_text() == "500S\n0 0\n100 1\n"


@pytest.mark.anyio
@pytest.mark.parametrize("swap", ["hardlink", "fifo", "removed"])
async def test_append_skips_a_maildirsize_swapped_after_the_check(
    maildir_path: Path, tmp_path: Path, swap: str
) -> None:
    """The line after the link is never appended through a hard link to another file, never
    blocks on a FIFO, and is skipped when the file is gone: the message stays delivered."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"1000S\n0 0\n")
    real_link = os.link

    def link(*args: Any, **kwargs: Any) -> None:
        real_link(*args, **kwargs)  # the message is published; now the file is swapped
        (maildir_path / "maildirsize").unlink()
        if swap == "hardlink":
            real_link(outside, maildir_path / "maildirsize")
        elif swap == "fifo":
            os.mkfifo(maildir_path / "maildirsize")

    seed(maildir_path, b"1000S\n0 0\n")
    md = Maildir(maildir_path, quota=Quota(), syscalls=DEFAULT_SYSCALLS.replace(link=link))
    with anyio.fail_after(5):
        d = await md.deliver(MSG)
    assert d.path.read_bytes() == MSG
    assert outside.read_bytes() == b"1000S\n0 0\n"


@pytest.mark.anyio
async def test_failed_stat_of_maildirsize_fails_cleanly(
    maildir_path: Path, faults: Faults
) -> None:
    """An fstat error right after opening maildirsize fails the delivery; no fd stays open."""
    seed(maildir_path, b"1000S\n0 0\n")
    fds = open_fds()
    md = Maildir(maildir_path, quota=Quota(), syscalls=faults.failing("stat", err=errno.EIO))
    with pytest.raises(OSError, match="injected EIO in stat"):
        await md.deliver(MSG)
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}
    assert open_fds() == fds


@pytest.mark.anyio
async def test_100_concurrent_deliveries_never_exceed(maildir_path: Path) -> None:
    """100 concurrent deliveries against a nearly full quota never pass it."""
    md = Maildir(maildir_path, quota=Quota(bytes=5_000, messages=1000), size_stamp=True)
    await md.deliver(b"x" * 4_000)
    ok: list[int] = []
    refused: list[int] = []

    async def one(i: int) -> None:
        try:
            await md.deliver(b"y" * (30 + i))
            ok.append(i)
        except QuotaExceededError:
            refused.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(one, i)
    on_disk = sum(p.stat().st_size for p in (maildir_path / "new").iterdir())
    assert on_disk <= 5_000
    assert ok
    assert refused
    assert len(ok) + len(refused) == 100
    limit_b, limit_m, used_b, used_m = usage(maildir_path)  # still parseable
    assert (limit_b, limit_m) == (5_000, 1000)
    assert (used_b, used_m) == (on_disk, 1 + len(ok))
    assert listing(maildir_path)["tmp"] == []


@pytest.mark.anyio
async def test_cancelled_delivery_releases_its_reservation(maildir_path: Path) -> None:
    """A cancelled delivery's reserved bytes are freed for the next one."""
    md = Maildir(maildir_path, quota=Quota(bytes=3 * 1024 * 1024))
    started = anyio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"a" * (2 * 1024 * 1024)  # one batch: reserved in the worker
        started.set()
        await anyio.sleep(10)
        yield b"never"

    async with anyio.create_task_group() as tg:
        tg.start_soon(md.deliver, slow())
        await started.wait()
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    d = await md.deliver(b"b" * (2 * 1024 * 1024))
    assert d.size == 2 * 1024 * 1024


@pytest.mark.anyio
async def test_append_failure_still_delivers(maildir_path: Path, faults: Faults) -> None:
    """The line appended after the link may fail: the message stays delivered."""
    seed(maildir_path, b"5000S\n0 0\n")
    real_open = DEFAULT_SYSCALLS.open

    def open_(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if path == "maildirsize" and flags & os.O_APPEND:
            raise OSError(errno.EIO, "injected")
        return real_open(path, flags, *args, **kw)

    md = Maildir(maildir_path, quota=Quota(), syscalls=DEFAULT_SYSCALLS.replace(open=open_))
    d = await md.deliver(MSG)
    assert d.path.read_bytes() == MSG
    assert (maildir_path / "maildirsize").read_text() == "5000S\n0 0\n"

    def write(fd: int, data: Any) -> int:
        if bytes(data).endswith(b" 1\n"):
            raise OSError(errno.ENOSPC, "injected")
        return os.write(fd, data)

    md = Maildir(maildir_path, quota=Quota(), syscalls=DEFAULT_SYSCALLS.replace(write=write))
    d = await md.deliver(b"Subject: two\n\n")
    assert d.path.exists()
    assert (maildir_path / "maildirsize").read_text() == "5000S\n0 0\n"


@pytest.mark.anyio
@pytest.mark.parametrize("step", ["rename", "fsync", "write", "listdir"])
async def test_recalculation_failure_fails_cleanly(
    maildir_path: Path, faults: Faults, step: str
) -> None:
    """A disk error while recalculating fails the delivery; nothing is left behind."""
    md = Maildir(maildir_path)
    await md.deliver(b"warm")  # makes the maildir: the faults hit the recalculation
    bad = Maildir(maildir_path, quota=Quota(bytes=10_000), syscalls=faults.failing(step))
    with pytest.raises(OSError, match="injected"):
        await bad.deliver(MSG)
    files = listing(maildir_path)
    assert (len(files["new"]), files["tmp"]) == (1, [])
    assert not (maildir_path / "maildirsize").exists()


@pytest.mark.anyio
async def test_zero_write_while_recalculating(maildir_path: Path) -> None:
    """write() returning 0 for the new maildirsize is an error, not a loop."""

    def write(fd: int, data: Any) -> int:
        return 0 if bytes(data).startswith(b"10000S") else os.write(fd, data)

    md = Maildir(
        maildir_path, quota=Quota(bytes=10_000), syscalls=DEFAULT_SYSCALLS.replace(write=write)
    )
    with pytest.raises(OSError, match="wrote nothing"):
        await md.deliver(MSG)


@pytest.mark.anyio
async def test_racing_change_repeats_the_count(maildir_path: Path) -> None:
    """A new/ changed during a recount is counted again (the spec's race check)."""
    await deliver(maildir_path, MSG)
    real_rename = DEFAULT_SYSCALLS.rename
    renames = 0

    def rename(*args: Any, **kw: Any) -> None:
        nonlocal renames
        renames += 1
        real_rename(*args, **kw)
        if renames == 1:  # another writer delivers right after our count
            (maildir_path / "new" / "other,S=7").write_bytes(b"1234567")

    md = Maildir(
        maildir_path, quota=Quota(bytes=10_000), syscalls=DEFAULT_SYSCALLS.replace(rename=rename)
    )
    await md.deliver(MSG)
    assert renames == 2
    assert usage(maildir_path) == (10_000, None, 207, 3)


@pytest.mark.anyio
async def test_count_skips_vanished_and_unreadable(maildir_path: Path) -> None:
    """While counting, a message that vanishes is skipped; other errors fail."""
    await deliver(maildir_path, b"x" * 10)
    await Maildir(maildir_path).folder("F").deliver(b"x" * 20)
    real_stat, real_open = DEFAULT_SYSCALLS.stat, DEFAULT_SYSCALLS.open

    def stat(name: Any, *args: Any, **kw: Any) -> os.stat_result:
        # The unstamped messages (no "," in their names) vanish as they are counted.
        if kw.get("follow_symlinks") is False and "," not in str(name):
            raise FileNotFoundError(errno.ENOENT, "vanished")
        return real_stat(name, *args, **kw)

    md = Maildir(
        maildir_path, quota=Quota(bytes=10_000), syscalls=DEFAULT_SYSCALLS.replace(stat=stat)
    )
    await md.deliver(MSG)
    assert usage(maildir_path)[2:] == (100, 1)

    def open_(name: Any, flags: int, *args: Any, **kw: Any) -> int:
        if name == ".F":
            raise OSError(errno.EIO, "injected")
        return real_open(name, flags, *args, **kw)

    (maildir_path / "maildirsize").unlink()
    bad = Maildir(
        maildir_path, quota=Quota(bytes=10_000), syscalls=DEFAULT_SYSCALLS.replace(open=open_)
    )
    with pytest.raises(OSError, match="injected"):
        await bad.deliver(MSG)


@pytest.mark.anyio
async def test_without_fsync(maildir_path: Path) -> None:
    """fsync=False skips the fsyncs of the recalculation too."""
    md = Maildir(maildir_path, quota=Quota(messages=5), fsync=False)
    await md.deliver(MSG)
    assert usage(maildir_path) == (None, 5, 100, 1)


@pytest.mark.anyio
async def test_endless_race_keeps_the_last_count(maildir_path: Path) -> None:
    """If new/ keeps changing, the count is repeated 3 times, then the last one stays."""
    await deliver(maildir_path, MSG)
    real_rename = DEFAULT_SYSCALLS.rename
    renames = 0

    def rename(*args: Any, **kw: Any) -> None:
        nonlocal renames
        renames += 1
        real_rename(*args, **kw)
        (maildir_path / "new" / f"other{renames},S=1").write_bytes(b"1")

    md = Maildir(
        maildir_path, quota=Quota(bytes=10_000), syscalls=DEFAULT_SYSCALLS.replace(rename=rename)
    )
    await md.deliver(MSG)
    assert renames == 3
    assert usage(maildir_path)[2:] == (202, 4)  # 100 + 2 others, then our 100


@pytest.mark.anyio
async def test_no_file_quota_checks_once(maildir_path: Path) -> None:
    """Quota() without maildirsize stops looking after the first batch."""
    reads = 0
    real_open = DEFAULT_SYSCALLS.open

    def open_(name: Any, flags: int, *args: Any, **kw: Any) -> int:
        nonlocal reads
        reads += name == "maildirsize"
        return real_open(name, flags, *args, **kw)

    md = Maildir(maildir_path, quota=Quota(), syscalls=DEFAULT_SYSCALLS.replace(open=open_))

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * (1024 * 1024)

    d = await md.deliver(chunks())
    assert d.size == 3 * 1024 * 1024
    assert reads == 1


def test_released_guard_reserves_nothing(tmp_path: Path) -> None:
    """A guard released before its check (a cancelled delivery) never reserves."""
    from maildrop._quota_io import QuotaGuard

    md = Maildir(tmp_path, quota=Quota(bytes=100))
    guard = QuotaGuard(Quota(bytes=100), md._settings)
    for sub in ("tmp", "new", "cur"):
        (tmp_path / sub).mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        guard.release()
        guard.check(fd, 50)
    finally:
        os.close(fd)
    assert (guard.ledger.pending_bytes, guard.reserved_bytes) == (0, 0)
    with guard:  # no tmp bound: nothing to append
        pass
    assert (tmp_path / "maildirsize").read_text() == "100S\n0 0\n"


@pytest.mark.anyio
async def test_link_failure_under_quota(maildir_path: Path, faults: Faults) -> None:
    """A failed link appends nothing and frees the reservation."""
    md = Maildir(maildir_path, quota=Quota(bytes=150), syscalls=faults.failing("link"))
    with pytest.raises(OSError, match="injected"):
        await md.deliver(MSG)
    await Maildir(maildir_path, quota=Quota(bytes=150)).deliver(MSG)
    assert usage(maildir_path)[2:] == (100, 1)


def test_folder_entries() -> None:
    """The Maildir++ folders of a listing are its dot entries but '.' and '..', sorted."""
    names = ["new", ".b", "..", ".", "cur", ".Trash", ".a", "maildirsize"]
    assert folder_entries(names) == [".Trash", ".a", ".b"]


def test_a_guard_probes_for_its_maildirsize_once(tmp_path: Path) -> None:
    """absent(): one lstat per guard; a missing file turns the guard off, a file keeps it."""
    from maildrop._dirs import Settings
    from maildrop._quota_io import QuotaGuard

    seen: list[str] = []

    def stat(path: Any, **kw: Any) -> os.stat_result:
        seen.append(os.path.basename(path))
        assert kw == {"follow_symlinks": False}
        return os.stat(path, **kw)

    table = DEFAULT_SYSCALLS.replace(stat=stat)
    settings = Settings(str(tmp_path), None, True, True, table, quota=Quota())
    missing = QuotaGuard(Quota(), settings)
    assert missing.absent()
    assert missing.absent()
    assert not missing.active
    (tmp_path / "maildirsize").write_bytes(b"10S\n0 0\n")
    present = QuotaGuard(Quota(), settings)
    assert not present.absent()
    assert not present.absent()
    assert present.active
    assert seen == ["maildirsize", "maildirsize"]
    in_code = QuotaGuard(Quota(bytes=10), settings)
    assert not in_code.absent()
    assert seen == ["maildirsize", "maildirsize"]  # limits in code: nothing to look for


def test_a_maildirsize_that_cannot_be_looked_at_is_not_absent(tmp_path: Path) -> None:
    """An lstat error other than ENOENT leaves the guard on (its check reports it)."""
    from maildrop._dirs import Settings
    from maildrop._quota_io import QuotaGuard

    def stat(path: Any, **kw: Any) -> os.stat_result:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    table = DEFAULT_SYSCALLS.replace(stat=stat)
    guard = QuotaGuard(Quota(), Settings(str(tmp_path), None, True, True, table))
    assert not guard.absent()
    assert guard.active
