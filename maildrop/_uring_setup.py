"""Setting up an io_uring instance for maildrop's driver, and why it may be unavailable.

``create`` makes the ring and maps it; ``check_ops`` probes the opcodes the driver needs. Every
refusal becomes a :class:`UringUnavailableError` whose message says why (no io_uring in the
kernel, ``kernel.io_uring_disabled``, a seccomp filter, an old kernel), so the caller can fall
back to threads and tell the operator.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import _uring_abi as abi
from ._errors import MaildropError

__all__ = [
    "Availability",
    "UringUnavailableError",
    "check_ops",
    "create",
    "discard",
    "max_workers",
    "probe",
]

#: 0: io_uring for everyone, 1: only for CAP_SYS_ADMIN or the io_uring_group, 2: for nobody.
SYSCTL = "/proc/sys/kernel/io_uring_disabled"


class UringUnavailableError(MaildropError, OSError):
    """io_uring cannot be used here; the message says why."""


@dataclass(frozen=True)
class Availability:
    """Whether the driver can run here and, if not, why; what optional ops the kernel has."""

    reason: str | None
    openat2: bool = False

    @property
    def ok(self) -> bool:
        """Return True when a ring can be opened."""
        return self.reason is None


def _sysctl() -> str:
    try:
        with open(SYSCTL, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return "absent"


def _setup_error(exc: OSError) -> UringUnavailableError:
    disabled = f"kernel.io_uring_disabled={_sysctl()}"
    if exc.errno == errno.ENOSYS:
        why = "the kernel has no io_uring or a seccomp filter (Docker's default) hides it"
    elif exc.errno == errno.EPERM:
        why = f"forbidden by {disabled} or by a seccomp filter"
    else:
        why = f"{exc.strerror} ({disabled})"
    return UringUnavailableError(exc.errno, f"io_uring_setup failed: {why}")


def _map(fd: int, params: abi.Params) -> tuple[mmap.mmap, ...]:
    sq_size = params.sq_off.array + params.sq_entries * 4
    cq_size = params.cq_off.cqes + params.cq_entries * abi.CQE.size
    share = mmap.MAP_SHARED | mmap.MAP_POPULATE
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if params.features & abi.FEAT_SINGLE_MMAP:
        sq = cq = mmap.mmap(fd, max(sq_size, cq_size), share, prot, offset=abi.OFF_SQ_RING)
    else:  # pragma: no cover - kernels before 5.4 (the CI kernel maps both rings at once)
        sq = mmap.mmap(fd, sq_size, share, prot, offset=abi.OFF_SQ_RING)
        cq = mmap.mmap(fd, cq_size, share, prot, offset=abi.OFF_CQ_RING)
    sqes = mmap.mmap(fd, params.sq_entries * abi.SQE.size, share, prot, offset=abi.OFF_SQES)
    array = (ctypes.c_uint32 * params.sq_entries).from_buffer(sq, params.sq_off.array)
    array[:] = range(params.sq_entries)  # entry i of the ring is always slot i: written once
    del array
    maps = (sq, cq, sqes)
    for m in maps:
        m.madvise(mmap.MADV_DONTFORK)
    return maps


def create(entries: int) -> tuple[int, abi.Params, tuple[mmap.mmap, ...]]:
    """Set up a ring of *entries* submission slots; return its fd, parameters and maps."""
    # No IORING_SETUP_DEFER_TASKRUN: completions would wait for the next io_uring_enter and
    # the eventfd that wakes the loop would never fire.
    params = abi.Params(flags=abi.SETUP_CLAMP | abi.SETUP_SUBMIT_ALL)
    try:
        fd = abi.setup(entries, params)
    except OSError as exc:
        raise _setup_error(exc) from exc
    try:
        return fd, params, _map(fd, params)
    except BaseException:
        os.close(fd)
        raise


def discard(fd: int, maps: tuple[mmap.mmap, ...]) -> None:
    """Unmap and close a ring that never went into service."""
    for m in maps:
        m.close()
    os.close(fd)


def check_ops(fd: int) -> bool:
    """Raise unless ring *fd* supports every op the driver needs; return whether it has openat2."""
    try:
        supported = abi.probe(fd)
    except OSError as exc:  # IORING_REGISTER_PROBE came with 5.6
        raise UringUnavailableError(exc.errno, "the kernel's io_uring is too old") from exc
    missing = [abi.OP_NAMES[op] for op in abi.REQUIRED_OPS if op not in supported]
    if missing:
        raise UringUnavailableError(
            errno.ENOSYS, f"the kernel's io_uring lacks {', '.join(missing)}"
        )
    return abi.OP_OPENAT2 in supported


class _Probe(Protocol):
    has_openat2: bool

    def close(self) -> None: ...


def probe(open_ring: Callable[[], _Probe]) -> Availability:
    """Return whether a ring opened by *open_ring* works here, and if not why."""
    if sys.platform != "linux":
        return Availability(f"io_uring needs Linux, this is {sys.platform}")
    machine = platform.machine()
    if machine != "x86_64":
        return Availability(
            f"the ring driver relies on x86-64 memory ordering and has no barriers for {machine}"
        )
    try:
        ring = open_ring()
    except UringUnavailableError as exc:
        return Availability(str(exc))
    ring.close()
    return Availability(None, openat2=ring.has_openat2)


def max_workers(fd: int, bounded: int, unbounded: int = 0) -> tuple[int, int]:
    """Set ring *fd*'s io-wq worker limits (0 keeps one); return the previous limits.

    Bounded workers run regular-file I/O (a write with ``RWF_SYNC``, an fsync): the kernel's
    default allows a few per CPU, which caps how many synced writes are in flight at once.
    """
    limits = (ctypes.c_uint32 * 2)(bounded, unbounded)
    abi.register(fd, abi.REGISTER_IOWQ_MAX_WORKERS, limits, 2)
    return limits[0], limits[1]
