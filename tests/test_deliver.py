"""End-to-end deliveries on the real filesystem, on asyncio and trio."""

from __future__ import annotations

import hashlib
import io
import mailbox
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from maildrop import (
    DEFAULT_SYSCALLS,
    Delivery,
    InvalidFolderNameError,
    Maildir,
    MaildirNotFoundError,
    MessageTooLargeError,
    deliver,
)

from .conftest import listing

pytestmark = pytest.mark.anyio

MSG = b"From: a@example.org\nTo: b@example.org\nSubject: hi\n\nhello\n"


def body(size: int, seed: int = 0) -> bytes:
    """Return *size* pseudo-random bytes that differ by seed."""
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


async def achunks(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    """Yield *data* in chunks."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def assert_delivered(md: Path, d: Delivery, data: bytes) -> None:
    """The delivery is in new/, byte-exact, and tmp/ is empty."""
    assert d.path == md / "new" / d.name
    assert d.path.read_bytes() == data
    assert d.size == len(data)
    assert listing(md)["tmp"] == []


@pytest.mark.parametrize("size", [0, 1, 2048, 3 * 1024 * 1024 + 17])
async def test_bytes_of_every_size(maildir_path: Path, size: int) -> None:
    """Empty, 1-byte, small and multi-MiB messages land byte-exact in new/."""
    data = body(size)
    d = await deliver(maildir_path, data)
    assert_delivered(maildir_path, d, data)


async def test_bytearray_and_memoryview(maildir_path: Path) -> None:
    """bytearray and memoryview sources are accepted."""
    md = Maildir(maildir_path)
    d1 = await md.deliver(bytearray(MSG))
    d2 = await md.deliver(memoryview(MSG))
    assert_delivered(maildir_path, d1, MSG)
    assert_delivered(maildir_path, d2, MSG)


async def test_non_byte_memoryview_is_flattened(maildir_path: Path) -> None:
    """A memoryview of another format is written as its raw bytes."""
    import array

    arr = array.array("I", [1, 2, 3])
    d = await deliver(maildir_path, memoryview(arr))
    assert d.path.read_bytes() == arr.tobytes()


async def test_sync_binary_file(maildir_path: Path, tmp_path: Path) -> None:
    """A regular binary file is copied (copy_file_range) from its current position."""
    data = body(5 * 1024 * 1024 + 3)
    src = tmp_path / "src.eml"
    src.write_bytes(b"HEADER" + data)
    with open(src, "rb") as f:
        f.read(6)  # the copy starts where the caller left the file
        d = await deliver(maildir_path, f)
        assert f.read() == b""  # and leaves it at EOF, like a read would
    assert_delivered(maildir_path, d, data)


async def test_sync_non_regular_file(maildir_path: Path) -> None:
    """A BytesIO (no fileno) is read in the worker thread."""
    data = body(3 * 1024 * 1024)
    d = await deliver(maildir_path, io.BytesIO(data))
    assert_delivered(maildir_path, d, data)


async def test_pipe_file(maildir_path: Path) -> None:
    """A pipe (not a regular file) is read, not copy_file_range'd."""
    r, w = os.pipe()
    with os.fdopen(w, "wb") as fw:
        fw.write(MSG)
    with os.fdopen(r, "rb") as fr:
        d = await deliver(maildir_path, fr)
    assert_delivered(maildir_path, d, MSG)


async def test_async_iterable(maildir_path: Path) -> None:
    """An async iterable of chunks (bytes, bytearray, memoryview mixed) is streamed."""
    data = body(2 * 1024 * 1024 + 5)

    async def mixed() -> AsyncIterator[bytes | bytearray | memoryview]:
        for n, chunk in enumerate(achunks_sync(data)):
            yield (chunk, bytearray(chunk), memoryview(chunk))[n % 3]

    d = await deliver(maildir_path, mixed())
    assert_delivered(maildir_path, d, data)


def achunks_sync(data: bytes, size: int = 65536) -> list[bytes]:
    """Split *data* into chunks."""
    return [data[i : i + size] for i in range(0, len(data), size)]


async def test_async_read_objects(maildir_path: Path, tmp_path: Path) -> None:
    """anyio's AsyncFile and any object with an async read(n) are read to EOF."""
    data = body(1_500_000)
    src = tmp_path / "src.eml"
    src.write_bytes(data)
    async with await anyio.open_file(src, "rb") as f:
        d = await deliver(maildir_path, f)
    assert_delivered(maildir_path, d, data)

    class Reader:
        def __init__(self) -> None:
            self.buf = io.BytesIO(data)

        async def read(self, n: int) -> bytes:
            await anyio.lowlevel.checkpoint()
            return self.buf.read(min(n, 1000))

    d = await deliver(maildir_path, Reader())
    assert_delivered(maildir_path, d, data)


async def test_byte_receive_stream(maildir_path: Path) -> None:
    """An anyio ByteReceiveStream is received until end of stream."""
    data = body(300_000)
    send, receive = anyio.create_memory_object_stream[bytes](10)

    from anyio.abc import ByteReceiveStream

    class Bytes(ByteReceiveStream):
        async def receive(self, max_bytes: int = 65536) -> bytes:
            return await receive.receive()

        async def aclose(self) -> None:
            await receive.aclose()

    async def produce() -> None:
        async with send:
            for c in achunks_sync(data, 7000):
                await send.send(c)

    async with anyio.create_task_group() as tg, Bytes() as stream:
        tg.start_soon(produce)
        d = await deliver(maildir_path, stream)
    assert_delivered(maildir_path, d, data)


async def test_aiofiles_source(maildir_path: Path, tmp_path: Path, anyio_backend: str) -> None:
    """An aiofiles file (asyncio only: aiofiles uses the asyncio executor) is read to EOF."""
    if anyio_backend != "asyncio":
        pytest.skip("aiofiles runs on asyncio only")
    import aiofiles

    data = body(1_200_000)
    src = tmp_path / "src.eml"
    src.write_bytes(data)
    async with aiofiles.open(src, "rb") as f:
        d = await deliver(maildir_path, f)
    assert_delivered(maildir_path, d, data)


async def test_stdlib_reads_them_back(maildir_path: Path) -> None:
    """The stdlib mailbox.Maildir reads every delivered message, flags included."""
    md = Maildir(maildir_path)
    await md.deliver(MSG)
    await md.deliver(MSG.replace(b"hi", b"two"), flags="SF")
    box = mailbox.Maildir(maildir_path, create=False)
    subjects = sorted(m["Subject"] for m in box)
    assert subjects == ["hi", "two"]
    flagged = next(m for m in box if m["Subject"] == "two")
    assert flagged.get_flags() == "FS"
    assert flagged.get_subdir() == "cur"


async def test_500_concurrent_deliveries(maildir_path: Path) -> None:
    """500 concurrent deliveries give 500 distinct, complete files and an empty tmp/."""
    md = Maildir(maildir_path)
    results: list[Delivery] = []

    async def one(i: int) -> None:
        results.append(await md.deliver(body(2048 + i, i)))

    async with anyio.create_task_group() as tg:
        for i in range(500):
            tg.start_soon(one, i)
    assert len({d.name for d in results}) == 500
    files = listing(maildir_path)
    assert len(files["new"]) == 500
    assert files["tmp"] == []
    for d in results:
        i = d.size - 2048
        assert d.path.read_bytes() == body(2048 + i, i)


async def test_modes_under_umask_000(maildir_path: Path) -> None:
    """Files are 0600 and created directories 0700 even with umask 000."""
    old = os.umask(0)
    try:
        d = await Maildir(maildir_path).folder("Lists.python").deliver(MSG)
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.path.stat().st_mode) == 0o600
    for p in (maildir_path, *(maildir_path / s for s in ("tmp", "new", "cur"))):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    folder = maildir_path / ".Lists.python"
    for p in (folder, *(folder / s for s in ("tmp", "new", "cur"))):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    assert (folder / "maildirfolder").is_file()


async def test_create_false_on_missing_maildir(maildir_path: Path) -> None:
    """create=False on a missing maildir raises MaildirNotFoundError and creates nothing."""
    with pytest.raises(MaildirNotFoundError, match="create=True"):
        await deliver(maildir_path, MSG, create=False)
    assert not maildir_path.exists()
    with pytest.raises(
        FileNotFoundError, match=r"no maildir at .*; create it or pass create=True"
    ):
        await deliver(maildir_path, MSG, create=False)


async def test_create_false_on_missing_subdirs(maildir_path: Path) -> None:
    """create=False on a directory without tmp/ raises MaildirNotFoundError."""
    maildir_path.mkdir()
    with pytest.raises(
        MaildirNotFoundError, match=r"no maildir at .*; create it or pass create=True"
    ):
        await deliver(maildir_path, MSG, create=False)
    assert list(maildir_path.iterdir()) == []


async def test_create_false_on_missing_folder(maildir_path: Path) -> None:
    """create=False on a missing folder raises MaildirNotFoundError."""
    await deliver(maildir_path, MSG)
    md = Maildir(maildir_path, create=False)
    with pytest.raises(MaildirNotFoundError, match=r"no maildir at .*/\.Nope'; create it"):
        await md.folder("Nope").deliver(MSG)
    assert not (maildir_path / ".Nope").exists()


async def test_missing_parent_directory(tmp_path: Path) -> None:
    """A maildir whose parent is missing is not created; the error says why."""
    with pytest.raises(MaildirNotFoundError, match="parent directory is missing"):
        await deliver(tmp_path / "no" / "Maildir", MSG)


async def test_existing_maildir_with_create_false(maildir_path: Path) -> None:
    """An existing maildir is used as-is with create=False."""
    await deliver(maildir_path, MSG)
    d = await deliver(maildir_path, MSG, create=False)
    assert_delivered(maildir_path, d, MSG)


async def test_folder_of_folder(maildir_path: Path) -> None:
    """md.folder('a').folder('b') is the Maildir++ folder '.a.b' of the same maildir."""
    sub = Maildir(maildir_path).folder("a").folder("b")
    assert sub.path == maildir_path / ".a.b"
    d = await sub.deliver(MSG)
    assert d.path.parent == maildir_path / ".a.b" / "new"
    assert (maildir_path / "new").is_dir()


async def test_a_folder_keeps_every_setting(maildir_path: Path) -> None:
    """A folder delivers with its maildir's settings: size stamp, max_size, fsync, table."""
    calls: list[str] = []

    def fsync(fd: int) -> None:
        calls.append("fsync")
        os.fsync(fd)

    table = DEFAULT_SYSCALLS.replace(fsync=fsync)
    md = Maildir(maildir_path, size_stamp=True, max_size=10, fsync=False, syscalls=table)
    sub = md.folder("a").folder("b")
    assert sub.syscalls is table
    d = await sub.deliver(b"tiny")
    assert d.name.endswith(",S=4")
    assert calls == []  # fsync=False is kept
    with pytest.raises(MessageTooLargeError, match="exceeds max_size=10 bytes"):
        await sub.deliver(b"x" * 11)
    assert Maildir(maildir_path).path == md.path  # the parent is unchanged
    assert md._settings.folder is None


async def test_invalid_folder_names_raise_before_io(maildir_path: Path) -> None:
    """A bad folder name raises at once and creates nothing."""
    with pytest.raises(
        InvalidFolderNameError, match=r"invalid folder name '\.\./etc': '/' is not allowed"
    ):
        Maildir(maildir_path).folder("../etc")
    assert not maildir_path.exists()


async def test_str_source_is_refused(maildir_path: Path) -> None:
    """A str raises TypeError saying to encode it, and leaves nothing behind."""
    with pytest.raises(TypeError, match=r"encode the message first"):
        await deliver(maildir_path, "hello")  # type: ignore[arg-type]
    assert not maildir_path.exists() or listing(maildir_path)["new"] == []


async def test_text_file_is_refused(maildir_path: Path, tmp_path: Path) -> None:
    """A text-mode file raises TypeError saying to open it in binary mode."""
    src = tmp_path / "m.txt"
    src.write_text("hi")
    with open(src) as f, pytest.raises(TypeError, match="binary mode"):
        await deliver(maildir_path, f)


async def test_str_chunk_midway_is_refused(maildir_path: Path) -> None:
    """A str chunk after bytes chunks raises TypeError; tmp/ and new/ stay empty."""

    async def bad() -> AsyncIterator[object]:
        yield body(2 * 1024 * 1024)
        yield "text"

    with pytest.raises(TypeError, match="bytes, not str"):
        await deliver(maildir_path, bad())  # type: ignore[arg-type]
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}


async def test_unsupported_source_type(maildir_path: Path) -> None:
    """An int is not a message."""
    with pytest.raises(TypeError, match="cannot deliver a int"):
        await deliver(maildir_path, 42)
    with pytest.raises(TypeError, match="must be bytes"):
        await Maildir(maildir_path).open_delivery().write(42)  # type: ignore[arg-type]


async def test_source_exception_propagates_as_is(maildir_path: Path) -> None:
    """A source raising midway propagates the same object; nothing is left behind."""
    boom = RuntimeError("source broke")

    async def src() -> AsyncIterator[bytes]:
        yield body(3 * 1024 * 1024)
        raise boom

    with pytest.raises(RuntimeError, match="source broke") as info:
        await deliver(maildir_path, src())
    assert info.value is boom
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}


async def test_sync_file_read_error_propagates(maildir_path: Path) -> None:
    """A synchronous file whose read raises: same exception, nothing left behind."""
    boom = OSError(5, "disk gone")

    class Bad(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            raise boom

    with pytest.raises(OSError, match="disk gone") as info:
        await deliver(maildir_path, Bad())
    assert info.value is boom
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}


@pytest.mark.parametrize("kind", ["bytes", "stream", "file", "pipe"])
async def test_max_size(maildir_path: Path, tmp_path: Path, kind: str) -> None:
    """Passing max_size raises MessageTooLargeError while streaming and leaves nothing."""
    data = body(3 * 1024 * 1024)
    source: object
    if kind == "bytes":
        source = data
    elif kind == "stream":
        source = achunks(data)
    elif kind == "file":
        (tmp_path / "big").write_bytes(data)
        source = open(tmp_path / "big", "rb")  # noqa: SIM115
    else:
        source = io.BytesIO(data)
    with pytest.raises(MessageTooLargeError, match="max_size=1048576"):
        await deliver(maildir_path, source, max_size=1024 * 1024)
    if kind == "file":
        source.close()  # type: ignore[attr-defined]
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}
    d = await deliver(maildir_path, data[: 1024 * 1024], max_size=1024 * 1024)
    assert d.size == 1024 * 1024


async def test_bad_max_size(maildir_path: Path) -> None:
    """max_size must be a non-negative int."""
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="max_size"):
            Maildir(maildir_path, max_size=bad)  # type: ignore[arg-type]


async def test_bad_constructor_arguments(maildir_path: Path) -> None:
    """A non-path or a non-table raises TypeError."""
    with pytest.raises(TypeError, match="path"):
        Maildir(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Syscalls"):
        Maildir(maildir_path, syscalls=object())  # type: ignore[arg-type]
    md = Maildir(os.fsencode(maildir_path))  # type: ignore[arg-type]
    assert md.path == maildir_path
    assert repr(md) == f"Maildir({str(maildir_path)!r})"


async def test_size_stamp(maildir_path: Path) -> None:
    """size_stamp=True adds ,S=<bytes written> to the published name."""
    data = body(5000)
    d = await deliver(maildir_path, achunks(data, 1000), size_stamp=True)
    assert d.name.endswith(",S=5000")
    assert d.path.read_bytes() == data


async def test_flags_go_to_cur(maildir_path: Path) -> None:
    """Flags deliver into cur/ with a sorted :2, suffix."""
    d = await deliver(maildir_path, MSG, flags="SR", size_stamp=True)
    assert d.path.parent == maildir_path / "cur"
    assert d.name.endswith(f",S={len(MSG)}:2,RS")
    with pytest.raises(ValueError, match="invalid maildir flag"):
        await deliver(maildir_path, MSG, flags="X")


async def test_fsync_false_still_delivers(maildir_path: Path) -> None:
    """fsync=False skips fsyncs, not the protocol."""
    d = await deliver(maildir_path, MSG, fsync=False)
    assert_delivered(maildir_path, d, MSG)
    ds = [await Maildir(maildir_path, fsync=False).folder("F").deliver(MSG) for _ in range(3)]
    assert len({x.name for x in ds}) == 3


async def test_symlinked_maildir_is_refused(tmp_path: Path) -> None:
    """A maildir path whose last component is a symlink is refused (ELOOP)."""
    real = tmp_path / "real"
    await deliver(real, MSG)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OSError, match="symbolic link"):
        await deliver(tmp_path / "link", MSG)
    assert len(listing(real)["new"]) == 1


async def test_symlinked_tmp_is_refused(maildir_path: Path, tmp_path: Path) -> None:
    """A tmp/ replaced by a symlink is refused, and the link target stays untouched."""
    await deliver(maildir_path, MSG)
    canary = tmp_path / "canary"
    canary.mkdir()
    os.rmdir(maildir_path / "tmp")
    (maildir_path / "tmp").symlink_to(canary)
    with pytest.raises(
        OSError, match="tmp' is a symbolic link; maildrop does not follow symlinks"
    ):
        await deliver(maildir_path, MSG)
    assert list(canary.iterdir()) == []
    assert len(listing(maildir_path)["new"]) == 1


async def test_hostile_hostname_is_escaped(
    maildir_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostname with '/', ':' and NUL still gives one safe name inside new/."""
    from maildrop import _unique

    monkeypatch.setattr(_unique, "hostname", lambda: "evil/../host:25\0x")
    monkeypatch.setattr(_unique, "_host", ("", -1))  # names read it again at once
    d = await deliver(maildir_path, MSG)
    assert d.path.parent == maildir_path / "new"
    assert "/" not in d.name
    assert ":" not in d.name
    assert "\0" not in d.name
    assert d.name.endswith(".evil\\057..\\057host\\07225\\000x")
