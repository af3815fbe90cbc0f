"""Header stamps and CRLF conversion: the pure state machine and every source type."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maildrop import DEFAULT_SYSCALLS, Maildir, MessageTooLargeError, deliver
from maildrop._transform import PEEK, Transform, crlf_to_lf, header_lines, make_transform

from .conftest import listing

MSG = b"Subject: hi\r\nTo: b@example.org\r\n\r\nline one\r\nline two\r\n"


def run(t: Transform, chunks: list[bytes]) -> bytes:
    """Feed *chunks* through *t* and return everything it produced."""
    return b"".join(bytes(t.feed(c)) for c in chunks) + t.finish()


#: Messages made of the bytes that matter here.
MESSAGES = st.lists(st.sampled_from([b"\r", b"\n", b"a", b"\r\n"]), max_size=40).map(b"".join)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split *data* at the (sorted, deduplicated) offsets *cuts*."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


@given(MESSAGES, st.lists(st.integers(0, 200), max_size=8))
def test_crlf_conversion_ignores_chunk_boundaries(data: bytes, cuts: list[int]) -> None:
    """Split anywhere, the output equals converting the whole message at once."""
    t = Transform([], crlf_to_lf=True)
    assert run(t, split(data, cuts)) == data.replace(b"\r\n", b"\n")


@given(st.binary(max_size=300) | MESSAGES)
def test_crlf_to_lf_is_replace(data: bytes) -> None:
    """The fast path (no lone CR) and the fallback both equal replacing every CRLF."""
    assert crlf_to_lf(data) == data.replace(b"\r\n", b"\n")


def test_crlf_to_lf_keeps_a_lone_cr() -> None:
    """A CR not followed by LF is data and stays; the CRLFs around it still convert."""
    assert crlf_to_lf(b"a\r\nb\rc\r\n\r") == b"a\nb\rc\n\r"
    assert crlf_to_lf(b"a\r\nb\r") == b"a\nb\r"  # the only lone CR ends the bytes


@given(
    MESSAGES,
    st.lists(st.integers(0, 200), max_size=8),
    st.booleans(),
)
def test_headers_match_the_first_line_ending(data: bytes, cuts: list[int], crlf: bool) -> None:
    """Added headers end like the message's first line (always LF with crlf_to_lf)."""
    t = make_transform(return_path="a@b", delivered_to="u@d", crlf_to_lf=crlf)
    assert t is not None
    out = run(t, split(data, cuts))
    body = data.replace(b"\r\n", b"\n") if crlf else data
    lf = data.find(b"\n")
    eol = b"\r\n" if not crlf and lf > 0 and data[lf - 1] == 0x0D else b"\n"
    assert out == b"Return-Path: <a@b>" + eol + b"Delivered-To: u@d" + eol + body


def test_header_values() -> None:
    """The null sender, bracketed addresses and UTF-8 are formatted as documented."""
    assert header_lines("", None) == [b"Return-Path: <>"]
    assert header_lines("<a@b>", None) == [b"Return-Path: <a@b>"]
    assert header_lines(None, "j\u00f6@d") == ["Delivered-To: j\u00f6@d".encode()]
    assert header_lines(None, None) == []
    assert make_transform(return_path=None, delivered_to=None, crlf_to_lf=False) is None


@pytest.mark.parametrize("bad", ["a\r@b", "a\n@b", "a\0b"])
def test_header_injection_is_refused(bad: str) -> None:
    """CR, LF or NUL in a header value raises ValueError naming the option."""
    with pytest.raises(ValueError, match="return_path"):
        header_lines(bad, None)
    with pytest.raises(ValueError, match="delivered_to"):
        header_lines(None, bad)
    with pytest.raises(TypeError, match="must be a str"):
        header_lines(b"a@b", None)  # type: ignore[arg-type]


class _Addr(str):
    """A str subclass (never taken from make_transform's cache)."""


@pytest.mark.parametrize("bad", ["a\r@b", "a\0b", b"a@b", ["a@b"]])
def test_make_transform_refuses_bad_values_every_time(bad: object) -> None:
    """A refused value is refused again on the next message (errors are never remembered),
    an unhashable one with the same TypeError, and the headers of a good one repeat."""
    for _ in range(2):
        with pytest.raises((ValueError, TypeError), match="return_path"):
            make_transform(return_path=bad, delivered_to=None, crlf_to_lf=True)  # type: ignore[arg-type]
    for value in ("s@x", "s@x", _Addr("s@x")):
        t = make_transform(return_path=value, delivered_to="u@x", crlf_to_lf=True)
        assert t is not None
        assert t.feed(b"a\r\n") + t.finish() == b"Return-Path: <s@x>\nDelivered-To: u@x\na\n"


def test_long_first_line_is_not_held_forever() -> None:
    """Without an LF in the first PEEK bytes the headers go out with LF."""
    t = Transform([b"X: 1"], crlf_to_lf=False)
    assert t.feed(b"a" * (PEEK - 1)) == b""
    assert t.feed(b"b") == b"X: 1\n" + b"a" * (PEEK - 1) + b"b"
    assert t.feed(b"c\r\n") == b"c\r\n"
    assert t.feed(memoryview(b"rest")) == b"rest"
    assert t.finish() == b""


# -- through the engine -------------------------------------------------------------------


async def achunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    """Yield *data* in chunks of *size*."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.anyio
async def test_crlf_split_at_every_boundary(maildir_path: Path) -> None:
    """A CRLF message split in two at every offset is stored with LF endings."""
    md = Maildir(maildir_path, fsync=False)
    want = MSG.replace(b"\r\n", b"\n")
    for cut in range(len(MSG) + 1):

        async def two(cut: int = cut) -> AsyncIterator[bytes]:
            yield MSG[:cut]
            yield MSG[cut:]

        d = await md.deliver(two(), crlf_to_lf=True)
        assert d.path.read_bytes() == want, cut
        assert d.size == len(want)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["bytes", "stream", "file", "bytesio", "reader", "push"])
async def test_every_source_type(maildir_path: Path, tmp_path: Path, kind: str) -> None:
    """Headers and CRLF conversion apply to every source type, streamed."""
    data = MSG + b"x" * (3 * 1024 * 1024) + b"\r\nend\r\n"
    want = b"Return-Path: <s@x>\nDelivered-To: u@d\n" + data.replace(b"\r\n", b"\n")
    opts: dict[str, Any] = {"return_path": "s@x", "delivered_to": "u@d", "crlf_to_lf": True}
    calls: list[int] = []

    def cfr(*args: Any) -> int:
        calls.append(1)
        return DEFAULT_SYSCALLS.copy_file_range(*args)

    md = Maildir(
        maildir_path, size_stamp=True, syscalls=DEFAULT_SYSCALLS.replace(copy_file_range=cfr)
    )
    source: Any
    if kind == "bytes":
        source = data
    elif kind == "stream":
        source = achunks(data, 65537)
    elif kind == "file":
        (tmp_path / "m").write_bytes(data)
        source = open(tmp_path / "m", "rb")  # noqa: SIM115
    elif kind == "bytesio":
        source = io.BytesIO(data)
    elif kind == "reader":

        class Reader:
            def __init__(self) -> None:
                self.buf = io.BytesIO(data)

            async def read(self, n: int) -> bytes:
                return self.buf.read(min(n, 100_001))

        source = Reader()
    if kind == "push":
        async with md.open_delivery(**opts) as w:
            for i in range(0, len(data), 999_999):
                await w.write(data[i : i + 999_999])
            d = await w.commit()
        assert w.size == len(want)
    else:
        d = await md.deliver(source, **opts)
        if kind == "file":
            source.close()
    assert d.path.read_bytes() == want
    assert d.size == len(want)
    assert d.name.endswith(f",S={len(want)}")
    assert calls == []  # a transform reads the file; copy_file_range would bypass it
    assert listing(maildir_path)["tmp"] == []


@pytest.mark.anyio
async def test_crlf_message_keeps_crlf_headers(maildir_path: Path) -> None:
    """Without conversion a CRLF message gets CRLF headers; the one-shot API takes them."""
    d = await deliver(maildir_path, MSG, return_path="", delivered_to="u@d")
    assert d.path.read_bytes() == b"Return-Path: <>\r\nDelivered-To: u@d\r\n" + MSG


@pytest.mark.anyio
async def test_empty_message_gets_headers(maildir_path: Path) -> None:
    """An empty message becomes just the added headers."""
    d = await deliver(maildir_path, b"", delivered_to="u@d")
    assert d.path.read_bytes() == b"Delivered-To: u@d\n"


@pytest.mark.anyio
async def test_bad_header_value_does_no_io(maildir_path: Path) -> None:
    """A header value with a newline raises ValueError before the maildir is created."""
    with pytest.raises(ValueError, match="delivered_to"):
        await deliver(maildir_path, MSG, delivered_to="u@d\r\nBcc: x@y")
    with pytest.raises(ValueError, match="return_path"):
        Maildir(maildir_path).open_delivery(return_path="a\nb")
    assert not maildir_path.exists()


@pytest.mark.anyio
async def test_max_size_counts_added_bytes(maildir_path: Path, tmp_path: Path) -> None:
    """max_size applies to the bytes written, headers included, for every path."""
    md = Maildir(maildir_path, max_size=len(MSG))
    with pytest.raises(MessageTooLargeError, match=f"exceeds max_size={len(MSG)} bytes"):
        await md.deliver(MSG, delivered_to="u@d")
    with pytest.raises(
        MessageTooLargeError, match="exceeds max_size=3 bytes"
    ):  # the headers of an empty message
        await Maildir(maildir_path, max_size=3).deliver(b"", delivered_to="u@d")
    (tmp_path / "m").write_bytes(MSG)
    with (
        open(tmp_path / "m", "rb") as f,
        pytest.raises(MessageTooLargeError, match=f"exceeds max_size={len(MSG)} bytes"),
    ):
        await md.deliver(f, delivered_to="u@d")
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}
    d = await md.deliver(MSG, crlf_to_lf=True)
    assert d.size == len(MSG) - MSG.count(b"\r\n")


@pytest.mark.anyio
async def test_plain_file_still_uses_copy_file_range(maildir_path: Path, tmp_path: Path) -> None:
    """Without a transform a regular file is still copied in the kernel."""
    calls: list[int] = []

    def cfr(*args: Any) -> int:
        calls.append(1)
        return DEFAULT_SYSCALLS.copy_file_range(*args)

    (tmp_path / "m").write_bytes(MSG)
    md = Maildir(maildir_path, syscalls=DEFAULT_SYSCALLS.replace(copy_file_range=cfr))
    with open(tmp_path / "m", "rb") as f:
        d = await md.deliver(f)
    assert d.path.read_bytes() == MSG
    assert calls


@pytest.mark.anyio
@pytest.mark.parametrize("err", ["EXDEV", "EINVAL"])
async def test_copy_file_range_refused_falls_back_to_read(
    maildir_path: Path, tmp_path: Path, err: str
) -> None:
    """copy_file_range refusing the pair (EXDEV across filesystem types) reads instead."""
    import errno

    def cfr(*args: Any) -> int:
        raise OSError(getattr(errno, err), "refused")

    data = os.urandom(3 * 1024 * 1024)
    (tmp_path / "m").write_bytes(data)
    md = Maildir(maildir_path, syscalls=DEFAULT_SYSCALLS.replace(copy_file_range=cfr))
    with open(tmp_path / "m", "rb") as f:
        d = await md.deliver(f)
    assert d.path.read_bytes() == data


@pytest.mark.anyio
async def test_copy_file_range_other_errors_fail(maildir_path: Path, tmp_path: Path) -> None:
    """Any other copy_file_range error fails the delivery and leaves nothing behind."""
    import errno

    def cfr(*args: Any) -> int:
        raise OSError(errno.EIO, "disk")

    (tmp_path / "m").write_bytes(MSG)
    md = Maildir(maildir_path, syscalls=DEFAULT_SYSCALLS.replace(copy_file_range=cfr))
    with open(tmp_path / "m", "rb") as f, pytest.raises(OSError, match="disk"):
        await md.deliver(f)
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}
