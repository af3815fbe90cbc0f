"""The worker-side steps of one delivery: chunk checks, batches, file copies, publishing."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maildrop import DEFAULT_SYSCALLS, MessageTooLargeError
from maildrop._dirs import Settings
from maildrop._steps import BATCH, Steps, as_chunk

from .conftest import listing

MSG = b"Subject: steps\n\nbody\n"


def steps_for(path: Path, *, max_size: int | None = None, batch: int = BATCH) -> Steps:
    """Steps delivering into the maildir at *path* (created on the first write)."""
    steps = Steps(Settings(str(path), None, True, True, DEFAULT_SYSCALLS, max_size))
    steps.batch = batch
    return steps


@given(st.binary(max_size=64), st.sampled_from(["bytes", "bytearray", "view", "view_of_ba"]))
def test_as_chunk_keeps_the_bytes_of_every_bytes_like_kind(data: bytes, kind: str) -> None:
    """as_chunk returns the same bytes for bytes, bytearray and memoryviews of either."""
    made: object = {
        "bytes": data,
        "bytearray": bytearray(data),
        "view": memoryview(data),
        "view_of_ba": memoryview(bytearray(data)),
    }[kind]
    assert bytes(as_chunk(made)) == data


def test_as_chunk_copies_mutable_buffers_and_shares_immutable_ones() -> None:
    """A bytearray (or a view of one) is copied; a view of bytes survives its release."""
    buf = bytearray(b"abcd")
    chunk = as_chunk(memoryview(buf))
    buf[:] = b"XXXX"
    assert chunk == b"abcd"
    view = memoryview(b"efgh")
    shared = as_chunk(view)
    view.release()
    assert bytes(shared) == b"efgh"


@pytest.mark.parametrize(
    ("data", "match"),
    [("text", "not str; encode the message first"), (42, "not int"), (None, "not NoneType")],
)
def test_as_chunk_refuses_what_is_not_bytes(data: object, match: str) -> None:
    """str and other non-bytes-like objects raise a TypeError that says what to pass."""
    with pytest.raises(TypeError, match=match):
        as_chunk(data)


def test_accept_refuses_a_chunk_that_passes_max_size(tmp_path: Path) -> None:
    """accept counts the bytes already taken: the chunk that crosses max_size is refused."""
    steps = steps_for(tmp_path / "m", max_size=10)
    assert steps.accept(b"12345", 5) == b"12345"
    with pytest.raises(MessageTooLargeError, match="10"):
        steps.accept(b"123456", 5)
    assert not (tmp_path / "m").exists()  # accept does no I/O


def test_first_write_creates_the_maildir_and_finish_publishes(tmp_path: Path) -> None:
    """The first batch creates the maildir and the tmp file; finish links it into new/."""
    md = tmp_path / "m"
    steps = steps_for(md)
    assert not md.exists()
    steps.write([b"Subject: steps\n\n"])
    assert steps.started
    assert len(listing(md)["tmp"]) == 1
    name = steps.finish([b"body\n"], sync_new=True)
    assert (md / "new" / name).read_bytes() == MSG
    assert listing(md)["tmp"] == []
    assert steps.tmp.dir_fds == []  # sync_new: the directories were closed here


def test_copy_file_copies_a_regular_file_from_its_offset(tmp_path: Path) -> None:
    """A regular file is copied from its current offset and left at its end."""
    src = tmp_path / "src"
    src.write_bytes(b"skipped\n" + MSG)
    steps = steps_for(tmp_path / "m")
    with open(src, "rb") as f:
        f.seek(len(b"skipped\n"))
        steps.write([])
        steps.copy_file(f)
        assert f.tell() == len(b"skipped\n" + MSG)
    name = steps.finish([], sync_new=True)
    assert (tmp_path / "m" / "new" / name).read_bytes() == MSG


def test_copy_file_reads_a_file_object_without_a_descriptor(tmp_path: Path) -> None:
    """A file object with no fd (BytesIO) is read in batches and delivered whole."""
    data = os.urandom(3000)
    steps = steps_for(tmp_path / "m", batch=1024)
    steps.write([])
    steps.copy_file(io.BytesIO(data))
    name = steps.finish([], sync_new=True)
    assert (tmp_path / "m" / "new" / name).read_bytes() == data


@pytest.mark.parametrize("regular", [True, False])
def test_copy_file_stops_at_max_size(tmp_path: Path, regular: bool) -> None:
    """A copied file longer than max_size raises MessageTooLargeError (file or stream)."""
    src = tmp_path / "src"
    src.write_bytes(b"y" * 5000)
    steps = steps_for(tmp_path / "m", max_size=4096, batch=1024)
    steps.write([])
    with open(src, "rb") as f, pytest.raises(MessageTooLargeError, match="4096"):
        steps.copy_file(f if regular else io.BytesIO(f.read()))
    steps.tmp.cleanup()
    assert listing(tmp_path / "m") == {"tmp": [], "new": [], "cur": []}


def test_copy_file_refuses_a_nonblocking_source_without_data(tmp_path: Path) -> None:
    """An empty non-blocking pipe is not the end of the message: BlockingIOError."""
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        steps = steps_for(tmp_path / "m")
        steps.write([])
        with (
            open(r, "rb", closefd=False) as f,
            pytest.raises(BlockingIOError, match="non-blocking and had no data"),
        ):
            steps.copy_file(f)
        steps.tmp.cleanup()
    finally:
        os.close(r)
        os.close(w)
    assert listing(tmp_path / "m")["tmp"] == []
