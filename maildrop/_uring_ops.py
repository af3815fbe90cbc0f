"""Operations for maildrop's io_uring driver: one :class:`Op` per submission queue entry.

An :class:`Op` carries the entry's fields and every object the kernel reads through a pointer
(path strings, data buffers, the iovec array, ``open_how``, the statx buffer) in ``keep``. The
driver holds the op, hence those objects, from queueing until its completion is reaped, so no
path or buffer can be freed while the kernel may still read it: the caller may drop its own
references as soon as it has queued the op.

Paths are ``str`` or ``bytes`` (``os.fsencode``); a NUL inside one is refused as ``os`` does.
Buffers are ``bytes``, ``bytearray`` or ``memoryview``: ``bytes`` is used in place, a writable
buffer is pinned (a ``bytearray`` cannot be resized while in flight), a read-only view that is
not ``bytes`` is copied once.
"""

from __future__ import annotations

import ctypes
import functools
import struct
import sys
from collections.abc import Sequence

from . import _uring_abi as abi

__all__ = [
    "MAX_RW_COUNT",
    "Op",
    "Statx",
    "close",
    "fspath",
    "fsync",
    "linkat",
    "nop",
    "openat",
    "openat2",
    "renameat2",
    "severs",
    "shorten",
    "statx",
    "unlinkat",
    "write",
    "writev",
]

#: Ops whose failure leaves the rest of their chain running (kernel 6.18).
_KEEPS_CHAIN = frozenset(
    {
        abi.OP_FSYNC,
        abi.OP_SYNC_FILE_RANGE,
        abi.OP_LINKAT,
        abi.OP_UNLINKAT,
        abi.OP_RENAMEAT,
        abi.OP_STATX,
    }
)
_U32 = 0xFFFF_FFFF
#: The most one read or write moves on Linux (INT_MAX rounded down to a page).
MAX_RW_COUNT = 0x7FFF_F000
_WRITES = frozenset({abi.OP_WRITE, abi.OP_WRITEV})
Path = str | bytes
_IS_FD = (0).__le__  # 0 <= fd: AT_FDCWD is no fd of ours (a builtin: no Python call per op)
Buffer = bytes | bytearray | memoryview


class Op:
    """One submission queue entry and the objects it points into."""

    __slots__ = (
        "addr",
        "addr2",
        "addr3",
        "expect",
        "fd",
        "fds",
        "file_index",
        "fixed",
        "keep",
        "length",
        "op_flags",
        "opcode",
        "seq",
        "success",
    )

    def __init__(self, opcode: int, fd: int, *, fixed: bool = False) -> None:
        self.opcode = opcode
        self.fd = fd
        #: ``fd`` is a slot of the ring's registered file table, not a process fd.
        self.fixed = fixed
        self.addr = 0
        self.addr2 = 0
        self.addr3 = 0
        self.length = 0
        self.op_flags = 0
        self.file_index = 0
        #: Bytes a write must write; fewer is a short write, which severs a chain.
        self.expect = 0
        #: Objects the kernel reads through the pointers above, held until the completion.
        self.keep: tuple[object, ...] = ()
        #: Process fds this op uses: the driver defers closing them until it completes.
        self.fds: tuple[int, ...] = () if fixed or fd < 0 else (fd,)
        #: Position in the driver's submission order (set when the entry is written).
        self.seq = -1
        #: The result on success when it is known in advance, else None. Only such ops may
        #: be submitted quiet (``IOSQE_CQE_SKIP_SUCCESS``), and all of them sever their chain
        #: when they fail, so a failure always reports. fsync, linkat, unlinkat and renameat2
        #: never know theirs: their failure does not sever the chain, and the kernel then
        #: skips their failed completion too (an EEXIST link would look like a success).
        self.success: int | None = None

    @property
    def name(self) -> str:
        """Return the operation's name (``"linkat"``)."""
        return abi.OP_NAMES[self.opcode]

    def __repr__(self) -> str:
        where = f"slot {self.fd}" if self.fixed else f"fd {self.fd}"
        return f"<Op {self.name} {where} seq={self.seq}>"


def severs(op: Op, result: int) -> bool:
    """Return True when *op* ending with *result* cancels the rest of its chain."""
    if result < 0:
        return op.opcode not in _KEEPS_CHAIN
    return op.opcode in _WRITES and result < op.expect


_ENCODING, _ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


def fspath(name: str) -> bytes:
    """Return *name* as the bytes of a path (``os.fsencode`` in one call, not three)."""
    return name.encode(_ENCODING, _ERRORS)


def _path(path: Path) -> bytes:
    # os.fsencode's own rule, without its two calls: every op of a delivery has a path.
    # Bytes (the engine encodes its paths once) go through without a call.
    raw = path.encode(_ENCODING, _ERRORS) if isinstance(path, str) else bytes(path)
    if b"\0" in raw:
        raise ValueError(f"embedded null byte in path {raw!r}")
    return raw


_HEADER, _FAST = abi.HEADER, abi.FAST  # a bytes object's data is at id() + _HEADER (CPython)
_IOV = struct.Struct("=QQ")  # struct iovec: base, length


def _buffer(data: Buffer) -> tuple[int, int, object]:
    """Return (address, length, object to keep) for *data*."""
    if type(data) is bytes:
        return id(data) + _HEADER if _FAST else abi.address(data), len(data), data
    view = memoryview(data).cast("B")
    if view.readonly:
        copy = bytes(view)
        return abi.address(copy), len(copy), copy
    pinned = (ctypes.c_char * len(view)).from_buffer(view)
    return ctypes.addressof(pinned), len(view), pinned


def _slot_target(op: Op, slot: int | None) -> None:
    if slot is not None:
        op.file_index = slot + 1  # the ABI numbers direct-descriptor slots from 1
        op.success = 0


def nop() -> Op:
    """Prepare an operation that does nothing (a probe, or a marker in a chain)."""
    return Op(abi.OP_NOP, -1)


def openat(dfd: int, path: Path, flags: int, mode: int = 0o600, *, slot: int | None = None) -> Op:
    """Prepare ``openat(dfd, path, flags, mode)``; with *slot*, into that registered slot.

    The result is the new fd, or 0 when opened into *slot*.
    """
    op = Op(abi.OP_OPENAT, dfd)
    raw = _path(path)
    op.addr, op.length, op.op_flags, op.keep = abi.address(raw), mode, flags, (raw,)
    _slot_target(op, slot)
    return op


@functools.lru_cache(maxsize=64)
def _how(flags: int, mode: int, resolve: int) -> ctypes.Array[ctypes.c_char]:
    """Return the ``open_how`` for these fields, shared by every op that uses them: the
    kernel only reads it (when the entry is submitted), and an op keeps it alive."""
    return ctypes.create_string_buffer(abi.OPEN_HOW.pack(flags, mode, resolve), abi.OPEN_HOW.size)


def openat2(
    dfd: int,
    path: Path,
    flags: int,
    mode: int = 0o600,
    *,
    resolve: int = 0,
    slot: int | None = None,
) -> Op:
    """Prepare ``openat2(dfd, path, {flags, mode, resolve})``, optionally into *slot*."""
    op = Op(abi.OP_OPENAT2, dfd)
    raw = path if type(path) is bytes and b"\0" not in path else _path(path)
    how = _how(flags, mode, resolve)
    op.addr = id(raw) + _HEADER if _FAST else abi.address(raw)
    op.addr2, op.length, op.keep = ctypes.addressof(how), abi.OPEN_HOW.size, (raw, how)
    if slot is not None:
        op.file_index = slot + 1  # as _slot_target: inline, as this op runs per delivery
        op.success = 0
    return op


def write(
    fd: int, data: Buffer, *, offset: int = -1, rw_flags: int = 0, fixed: bool = False
) -> Op:
    """Prepare ``pwritev2(fd, data, offset, rw_flags)`` (``-1``: the file position).

    The result is the number of bytes written: a short write is a positive result, compare it
    with the length (the driver's chains treat it as a failure, as the kernel does).

    Raises:
        ValueError: *data* is longer than ``MAX_RW_COUNT``, the most Linux writes at once
            (the entry's length field has 32 bits; :func:`writev` takes any length).
    """
    op = Op(abi.OP_WRITE, fd, fixed=fixed)
    op.addr, op.length, kept = _buffer(data)
    if op.length > MAX_RW_COUNT:
        raise ValueError(f"one write op takes at most {MAX_RW_COUNT} bytes, not {op.length}")
    op.expect = op.success = op.length
    op.addr2, op.op_flags, op.keep = offset, rw_flags, (kept,)
    return op


def writev(
    fd: int, buffers: Sequence[Buffer], *, offset: int = -1, rw_flags: int = 0, fixed: bool = False
) -> Op:
    """Prepare ``pwritev2(fd, buffers, offset, rw_flags)``; the result is as for :func:`write`."""
    op = Op(abi.OP_WRITEV, fd, fixed=fixed)
    if len(buffers) == 1 and type(data := buffers[0]) is bytes and _FAST:
        # A whole message: its one iovec is packed into bytes (the kernel only reads it), with
        # no ctypes array to build and fill; shorten() turns it into one when it must.
        op.expect = op.success = n = len(data)
        iov1 = _IOV.pack(id(data) + _HEADER, n)
        op.addr, op.length, op.addr2 = id(iov1) + _HEADER, 1, offset
        op.op_flags, op.keep = rw_flags, (iov1, data)
        return op
    iov = (ctypes.c_uint64 * (2 * len(buffers)))()
    kept: list[object] = [iov]
    for i, data in enumerate(buffers):
        iov[2 * i], iov[2 * i + 1], obj = _buffer(data)
        op.expect += iov[2 * i + 1]
        kept.append(obj)
    op.addr, op.length, op.addr2 = ctypes.addressof(iov), len(buffers), offset
    op.op_flags, op.keep, op.success = rw_flags, tuple(kept), op.expect
    return op


def shorten(op: Op, length: int) -> None:
    """Make the write or writev *op* write only its first *length* bytes (the fault hooks'
    short write: the kernel really writes fewer, so the file holds what the result says)."""
    if op.opcode == abi.OP_WRITE:
        op.length = length
        return
    iov = op.keep[0]
    if isinstance(iov, bytes):  # writev's packed single iovec: made writable here
        iov = (ctypes.c_uint64 * 2).from_buffer_copy(iov)
        op.addr, op.keep = ctypes.addressof(iov), (iov, *op.keep[1:])
    assert isinstance(iov, ctypes.Array)
    for i in range(op.length):
        if length < iov[2 * i + 1]:
            iov[2 * i + 1] = length
            op.length = i + (length > 0)
            return
        length -= iov[2 * i + 1]


def fsync(fd: int, *, datasync: bool = False, fixed: bool = False) -> Op:
    """Prepare ``fsync(fd)`` (``fdatasync`` with *datasync*)."""
    op = Op(abi.OP_FSYNC, fd, fixed=fixed)
    op.op_flags = abi.FSYNC_DATASYNC if datasync else 0
    return op


def sync_file_range(fd: int, offset: int, length: int, flags: int) -> Op:
    """Prepare ``sync_file_range(fd, offset, length, flags)``.

    The entry's length field has 32 bits: a longer range goes as 0, "to the end of the file"
    (a superset of the range).
    """
    op = Op(abi.OP_SYNC_FILE_RANGE, fd)
    op.addr2, op.length, op.op_flags = offset, length if length <= _U32 else 0, flags
    return op


def _two_paths(opcode: int, olddfd: int, old: Path, newdfd: int, new: Path, flags: int) -> Op:
    op = Op(opcode, olddfd)
    src = old if type(old) is bytes and b"\0" not in old else _path(old)
    dst = new if type(new) is bytes and b"\0" not in new else _path(new)
    if _FAST:
        op.addr, op.addr2, op.length = id(src) + _HEADER, id(dst) + _HEADER, newdfd
    else:  # pragma: no cover - CPython has the fast path
        op.addr, op.addr2, op.length = abi.address(src), abi.address(dst), newdfd
    op.op_flags, op.keep = flags, (src, dst)
    op.fds = tuple(filter(_IS_FD, (olddfd, newdfd)))
    return op


def linkat(olddfd: int, old: Path, newdfd: int, new: Path, flags: int = 0) -> Op:
    """Prepare ``linkat(olddfd, old, newdfd, new, flags)``; ``-EEXIST`` never overwrites."""
    return _two_paths(abi.OP_LINKAT, olddfd, old, newdfd, new, flags)


def renameat2(olddfd: int, old: Path, newdfd: int, new: Path, flags: int = 0) -> Op:
    """Prepare ``renameat2(olddfd, old, newdfd, new, flags)`` (``RENAME_NOREPLACE``...)."""
    return _two_paths(abi.OP_RENAMEAT, olddfd, old, newdfd, new, flags)


def unlinkat(dfd: int, path: Path, flags: int = 0) -> Op:
    """Prepare ``unlinkat(dfd, path, flags)``."""
    op = Op(abi.OP_UNLINKAT, dfd)
    raw = path if type(path) is bytes and b"\0" not in path else _path(path)
    op.addr = id(raw) + _HEADER if _FAST else abi.address(raw)
    op.op_flags, op.keep = flags, (raw,)
    return op


def close(fd: int, *, fixed: bool = False) -> Op:
    """Prepare ``close(fd)``, or the release of registered slot *fd* with *fixed*."""
    op = Op(abi.OP_CLOSE, 0 if fixed else fd)
    if fixed:
        op.file_index = fd + 1
    op.fds = ()  # a close must not wait for itself: the caller no longer uses this fd
    op.success = 0
    return op


class Statx:
    """The fields of a completed :func:`statx` the engine uses."""

    __slots__ = ("ino", "mode", "nlink", "size", "uid")

    def __init__(self, raw: bytes) -> None:
        fields = abi.STATX_HEAD.unpack_from(raw)
        self.nlink, self.uid, self.mode = fields[3], fields[4], fields[6]
        self.ino, self.size = fields[8], fields[9]


def statx(dfd: int, path: Path, flags: int = 0, mask: int = abi.STATX_BASIC_STATS) -> Op:
    """Prepare ``statx(dfd, path, flags, mask)``; read it with :func:`statx_result`."""
    op = Op(abi.OP_STATX, dfd)
    raw = _path(path)
    out = ctypes.create_string_buffer(abi.STATX_SIZE)
    op.addr, op.length, op.addr2 = abi.address(raw), mask, ctypes.addressof(out)
    op.op_flags, op.keep = flags, (raw, out)
    return op


def statx_result(op: Op) -> Statx:
    """Return what a completed :func:`statx` *op* filled in."""
    out = op.keep[1]
    assert isinstance(out, ctypes.Array)
    return Statx(bytes(out))
