"""The io_uring kernel ABI that maildrop's ring driver uses: numbers, layouts, system calls.

Values come from ``include/uapi/linux/io_uring.h``; only what the driver needs is here. The
three system calls go through libc's ``syscall()`` with ``ctypes`` (no compiler, no binding):
:func:`call` is the one place they are made, so tests can make it fail the way seccomp or a
locked-down kernel would.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys
from typing import Any

# System call numbers of the generic table (x86-64 shares them).
SYS_SETUP = 425
SYS_ENTER = 426
SYS_REGISTER = 427

# Opcodes (enum io_uring_op).
OP_NOP = 0
OP_WRITEV = 2
OP_FSYNC = 3
OP_SYNC_FILE_RANGE = 8
OP_OPENAT = 18
OP_CLOSE = 19
OP_STATX = 21
OP_WRITE = 23
OP_OPENAT2 = 28
OP_RENAMEAT = 35
OP_UNLINKAT = 36
OP_LINKAT = 39

OP_NAMES = {
    OP_NOP: "nop",
    OP_WRITEV: "writev",
    OP_FSYNC: "fsync",
    OP_SYNC_FILE_RANGE: "sync_file_range",
    OP_OPENAT: "openat",
    OP_CLOSE: "close",
    OP_STATX: "statx",
    OP_WRITE: "write",
    OP_OPENAT2: "openat2",
    OP_RENAMEAT: "renameat2",
    OP_UNLINKAT: "unlinkat",
    OP_LINKAT: "linkat",
}
#: The opcodes a delivery cannot do without; openat2 is optional (probed separately).
REQUIRED_OPS: tuple[int, ...] = (OP_WRITEV, OP_FSYNC, OP_OPENAT, OP_CLOSE, OP_STATX, OP_WRITE)
REQUIRED_OPS += (OP_RENAMEAT, OP_UNLINKAT, OP_LINKAT)

# Per-SQE flags.
IOSQE_FIXED_FILE = 1 << 0
IOSQE_IO_LINK = 1 << 2
IOSQE_CQE_SKIP_SUCCESS = 1 << 6

# io_uring_setup flags and features.
SETUP_CLAMP = 1 << 4
SETUP_SUBMIT_ALL = 1 << 7
FEAT_SINGLE_MMAP = 1 << 0
FEAT_NODROP = 1 << 1
FEAT_CQE_SKIP = 1 << 11

ENTER_GETEVENTS = 1 << 0
SQ_CQ_OVERFLOW = 1 << 1  # in the SQ ring's flags: completions wait in the kernel's overflow list

OFF_SQ_RING = 0
OFF_CQ_RING = 0x8000000
OFF_SQES = 0x10000000

REGISTER_FILES = 2
REGISTER_EVENTFD = 4
REGISTER_PROBE = 8
REGISTER_IOWQ_MAX_WORKERS = 19
PROBE_OP_SUPPORTED = 1

# Flags of the operations themselves.
RWF_SYNC = 0x4
FSYNC_DATASYNC = 1
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RENAME_NOREPLACE = 1
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400
STATX_BASIC_STATS = 0x7FF

#: One submission queue entry (64 bytes): opcode, flags, ioprio, fd, off/addr2, addr, len,
#: op flags, user_data, buf_index, personality, file_index, addr3, pad.
SQE = struct.Struct("<BBHiQQIIQHHiQQ")
#: One completion queue entry (16 bytes): user_data, res, flags.
CQE = struct.Struct("<QiI")
#: struct open_how: flags, mode, resolve.
OPEN_HOW = struct.Struct("<QQQ")
#: The leading fields of struct statx the driver reports (mask, blksize, attributes, nlink,
#: uid, gid, mode, pad, ino, size).
STATX_HEAD = struct.Struct("<IIQIIIHHQQ")
STATX_SIZE = 256
U64 = 0xFFFF_FFFF_FFFF_FFFF


def _offsets(*names: str) -> list[tuple[str, type[ctypes.c_uint32] | type[ctypes.c_uint64]]]:
    # Both ring offset structures: eight 32-bit offsets, then a 64-bit user address.
    fields: list[tuple[str, type[ctypes.c_uint32] | type[ctypes.c_uint64]]]
    fields = [(name, ctypes.c_uint32) for name in names]
    return [*fields, ("resv1", ctypes.c_uint32), ("user_addr", ctypes.c_uint64)]


class SqOffsets(ctypes.Structure):
    """struct io_sqring_offsets."""

    _fields_ = _offsets("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array")


class CqOffsets(ctypes.Structure):
    """struct io_cqring_offsets."""

    _fields_ = _offsets("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags")


class Params(ctypes.Structure):
    """struct io_uring_params."""

    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", SqOffsets),
        ("cq_off", CqOffsets),
    ]


def _load_syscall() -> Any:
    """Return libc's ``syscall()``, or None where there is none (Windows, odd C libraries)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, TypeError, AttributeError):
        return None
    function.restype = ctypes.c_long
    return function


_syscall = _load_syscall()


def call(number: int, *args: object, via: Any = None) -> int:
    """Make system call *number* (through the typed handle *via*, if given); return its
    result or raise ``OSError`` with its errno.

    ``EINTR`` is retried: none of the three calls has done anything when it reports it.
    """
    function = _syscall if via is None else via
    if function is None:
        raise OSError(errno.ENOSYS, "this C library has no syscall()")
    while True:
        result: int = function(number, *args)
        if result >= 0:
            return result
        code = ctypes.get_errno()
        if code != errno.EINTR:
            raise OSError(code, os.strerror(code))


def setup(entries: int, params: Params) -> int:
    """Create a ring of *entries* submission slots; return its fd (``params`` is filled in)."""
    return call(SYS_SETUP, ctypes.c_uint(entries), ctypes.byref(params))


def _typed(*argtypes: Any) -> Any:
    """Return another handle on ``syscall()`` that converts its arguments to *argtypes*."""
    if _syscall is None:  # pragma: no cover - a C library without syscall(): see call()
        return None
    function = ctypes.CDLL(None, use_errno=True)["syscall"]  # [] makes a new handle
    function.restype, function.argtypes = ctypes.c_long, argtypes
    return function


# io_uring_enter(fd, to_submit, min_complete, flags, sig, sigsz), the hot one: typed once
# instead of wrapping each argument in a ctypes object per call.
_enter = _typed(
    ctypes.c_long, ctypes.c_int, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p,
    ctypes.c_size_t,
)  # fmt: skip


def enter(fd: int, to_submit: int, min_complete: int, flags: int) -> int:
    """Submit *to_submit* queued entries and/or wait for *min_complete* completions."""
    return call(SYS_ENTER, fd, to_submit, min_complete, flags, None, 0, via=_enter)


def register(fd: int, opcode: int, arg: ctypes.Array[Any] | ctypes.c_int, nr: int) -> int:
    """Register *arg* (an fd array, an eventfd, a probe buffer, limits) with the ring."""
    return call(
        SYS_REGISTER, ctypes.c_int(fd), ctypes.c_uint(opcode), ctypes.byref(arg), ctypes.c_uint(nr)
    )


def probe(fd: int) -> frozenset[int]:
    """Return the opcodes the kernel supports on ring *fd* (``IORING_REGISTER_PROBE``)."""
    count = 256
    # struct io_uring_probe: last_op, ops_len, resv, resv2[3], then 8 bytes per op.
    buf = (ctypes.c_int * (4 + 2 * count))()
    register(fd, REGISTER_PROBE, buf, count)
    raw = bytes(buf)
    last = raw[0]
    ops = (raw[16 + 8 * i : 16 + 8 * i + 4] for i in range(last + 1))
    return frozenset(op[0] for op in ops if int.from_bytes(op[2:4], "little") & PROBE_OP_SUPPORTED)


def _address_by_ctypes(buffer: bytes) -> int:
    value = ctypes.cast(ctypes.c_char_p(buffer), ctypes.c_void_p).value
    assert value is not None  # a bytes object always has a buffer, even when empty
    return value


# CPython keeps a bytes object's data right after its fixed header, so its address is the
# object's plus that header: a third of the ctypes round trip, on the hot path of every op.
# Checked here against ctypes; anything else (another interpreter) uses ctypes.
_PROBE = b"maildrop"
_HEADER = bytes.__basicsize__ - 1
_FAST = sys.implementation.name == "cpython" and id(_PROBE) + _HEADER == _address_by_ctypes(_PROBE)
#: Whether a bytes object's data is at ``id(obj) + HEADER`` (CPython: hot paths inline it).
FAST, HEADER = _FAST, _HEADER


def address(buffer: bytes) -> int:
    """Return the address of *buffer*'s bytes (the caller keeps *buffer* alive)."""
    return id(buffer) + _HEADER if _FAST else _address_by_ctypes(buffer)
