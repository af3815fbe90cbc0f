"""The public face: :class:`Maildir` and the one-shot :func:`deliver`."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypedDict, Unpack

from ._backend import backend_for, requested, run_sync
from ._folders import folder_dirname
from ._naming import format_flags
from ._quota import Quota
from ._quota_io import QuotaGuard
from ._record import replace
from ._session import Delivery, DeliverySession
from ._sources import Source, feed
from ._steps import Steps
from ._sweep import TMP_MAX_AGE, sweep_tmp
from ._sys import DEFAULT_SYSCALLS, Syscalls
from ._transform import make_transform
from ._writer import Settings

__all__ = ["Maildir", "deliver"]


class MaildirOptions(TypedDict, total=False):
    """The keywords of :class:`Maildir`, which :func:`deliver` passes through to it."""

    create: bool
    fsync: bool
    max_size: int | None
    size_stamp: bool
    quota: Quota | None
    syscalls: Syscalls
    backend: str


class DeliveryOptions(TypedDict, total=False):
    """The keywords of :meth:`Maildir.open_delivery` that :meth:`Maildir.deliver` passes on."""

    flags: str | None
    return_path: str | None
    delivered_to: str | None
    crlf_to_lf: bool


def _check_max_size(max_size: int | None) -> int | None:
    if max_size is None:
        return None
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
        raise ValueError(f"max_size must be a non-negative int or None, not {max_size!r}")
    return max_size


class Maildir:
    """A maildir to deliver into. Creating one does no I/O.

    Args:
        path: the maildir's directory (``tmp/ new/ cur/`` live in it). A symlink as its
            last component is refused; pass the real path.
        create: make the maildir (and ``tmp/ new/ cur/``, mode 0700, durably) on first
            delivery when missing; with ``False`` a missing maildir raises
            :class:`MaildirNotFoundError`.
        fsync: with ``False`` skip every fsync (tests, bulk imports): fast, not durable.
        max_size: refuse messages larger than this many bytes (checked while streaming).
        size_stamp: add the Maildir++ ``,S=<size>`` stamp to delivered names.
        quota: enforce and maintain a Maildir++ quota (``maildirsize``), see :class:`Quota`;
            over-quota deliveries raise :class:`QuotaExceededError` while streaming.
        syscalls: the table of blocking calls to use (fault injection, compat hooks).
        backend: what runs the disk calls: ``"auto"`` (io_uring on Linux asyncio loops where
            the kernel allows it, else worker threads; the environment variable
            ``MAILDROP_BACKEND`` may replace it), ``"uring"`` (raises
            :class:`UringUnavailableError` where it cannot run, saying why) or ``"threads"``.
            A custom *syscalls* table always runs in threads.

    Raises:
        ValueError: a bad *backend* or ``MAILDROP_BACKEND`` value, or a bad *max_size*.
        UringUnavailableError: ``backend="uring"`` with a custom *syscalls* table.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        fsync: bool = True,
        max_size: int | None = None,
        size_stamp: bool = False,
        quota: Quota | None = None,
        syscalls: Syscalls = DEFAULT_SYSCALLS,
        backend: str = "auto",
    ) -> None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        if not isinstance(syscalls, Syscalls):
            raise TypeError("syscalls must be a maildrop.Syscalls table")
        max_size = _check_max_size(max_size)
        if quota is not None and not isinstance(quota, Quota):
            raise TypeError(f"quota must be a maildrop.Quota or None, not {quota!r}")
        self._settings = Settings(
            root=os.path.abspath(os.fspath(path)),
            folder=None,
            create=bool(create),
            fsync=bool(fsync),
            syscalls=syscalls,
            max_size=max_size,
            size_stamp=bool(size_stamp),
            quota=quota,
            backend=requested(backend, syscalls),
        )

    @property
    def path(self) -> Path:
        """The maildir's directory."""
        return Path(self._settings.path)

    @property
    def syscalls(self) -> Syscalls:
        """The syscall table this maildir uses."""
        return self._settings.syscalls

    def __repr__(self) -> str:
        return f"Maildir({self._settings.path!r})"

    def folder(self, name: str) -> Maildir:
        """Return the Maildir++ subfolder *name* (``"Lists.python"`` is ``.Lists.python``).

        The folder (and, with ``create=True``, the maildir above it) is created on its first
        delivery. A folder of a folder is a deeper level of the same maildir.

        Raises:
            InvalidFolderNameError: *name* is empty, malformed or reserved.
        """
        cfg = self._settings
        if cfg.folder is not None:
            name = f"{cfg.folder[1:]}.{name}" if isinstance(name, str) else name
        dirname = folder_dirname(name)
        sub = object.__new__(Maildir)
        sub._settings = replace(cfg, folder=dirname)
        return sub

    def open_delivery(
        self,
        *,
        flags: str | None = None,
        return_path: str | None = None,
        delivered_to: str | None = None,
        crlf_to_lf: bool = False,
        pipeline: bool = False,
    ) -> DeliverySession:
        """Return a session to feed a message into chunk by chunk.

        ``async with md.open_delivery() as w: await w.write(chunk); ...; d = await
        w.commit()``. With *flags* (e.g. ``"S"``) the message goes to ``cur/`` with the
        ``:2,<flags>`` info suffix instead of ``new/``.

        *return_path* prepends ``Return-Path: <addr>`` (``""`` is the null sender ``<>``),
        *delivered_to* prepends ``Delivered-To: addr``; the added lines end like the
        message's first line (CRLF or LF). *crlf_to_lf* converts CRLF line endings to LF
        (SMTP wire format to the maildir convention), and then every line ends in LF. Both
        are applied while streaming; sizes, ``max_size`` and the quota count the bytes
        written.

        With *pipeline*, ``write()`` may return while a worker still writes its batch (at
        most one batch in flight; its error comes from the next call): for a caller that
        drives a source itself. Without it, ``write()`` returns once its batch is on disk.

        Raises:
            ValueError: a flag is not one of ``DFPRST``, or a header value contains CR, LF
                or NUL (checked before any I/O).
        """
        flags = None if flags is None else format_flags(flags)
        transform = make_transform(
            return_path=return_path, delivered_to=delivered_to, crlf_to_lf=crlf_to_lf
        )
        cfg = self._settings
        quota = None if cfg.quota is None else QuotaGuard(cfg.quota, cfg)
        steps = Steps(cfg, flags=flags, transform=transform, quota=quota)
        return DeliverySession(steps, pipeline=pipeline)

    async def deliver(self, source: Source, **options: Unpack[DeliveryOptions]) -> Delivery:
        """Deliver *source* and return where it landed, once it is durable.

        *source* may be bytes-like, a binary file, an object with an async ``read(n)``, an
        async iterable of bytes-like chunks or an anyio ``ByteReceiveStream``. *options* are
        :meth:`open_delivery`'s (``flags``, ``return_path``, ``delivered_to``, ``crlf_to_lf``).

        Raises:
            TypeError: *source* (or one of its chunks) is not bytes-like.
            ValueError: a bad flag or header value (before any I/O).
            MessageTooLargeError: the message passed ``max_size``.
            QuotaExceededError: the message does not fit in the quota (``.permanent`` says
                whether to bounce).
            MaildirNotFoundError: the maildir is missing and ``create=False``.
            OSError: a disk error, with its original errno.
            Exception: whatever *source* raised, as the same object.

        Every failure leaves nothing behind in ``tmp/`` or ``new/``.

        **Cancellation:** the delivery is abandoned and its tmp file removed (after any write
        already running in a worker thread finished). If cancelled after the message was
        linked into ``new/``, it stays there: it is complete, and becomes durable with the
        next directory fsync.
        """
        if not options and type(source) is bytes:
            whole = _whole(self._settings, source)
            if whole is not None:
                return await whole
        session = self.open_delivery(**options, pipeline=True)
        async with session:
            await feed(session, source)
            return await session.commit()

    async def clean_tmp(
        self, older_than: float = TMP_MAX_AGE, *, now: float | None = None
    ) -> list[str]:
        """Remove stale files from ``tmp/`` and return their names.

        A file is stale when its access, modification and change times are all more than
        *older_than* seconds (default 36 hours, as the maildir spec recommends) before
        *now* (default: the current time). Files that a delivery of this process is still
        writing are never removed; directories are left alone; a missing maildir has
        nothing to clean. Folders are separate maildirs: clean each one.

        **Cancellation:** the sweep runs to completion in its worker thread; the caller
        stops waiting and does not get the list.
        """
        if isinstance(older_than, bool) or not isinstance(older_than, int | float):
            raise TypeError(f"older_than must be a number of seconds, not {older_than!r}")
        if older_than < 0:
            raise ValueError(f"older_than must not be negative, not {older_than!r}")
        cutoff = (time.time() if now is None else now) - older_than
        return await run_sync(sweep_tmp, self._settings, cutoff)


def _whole(cfg: Settings, data: bytes) -> Awaitable[Delivery] | None:
    """Return the delivery of *data* from the backend's own callbacks, where it has them
    (io_uring: ``_uring_commit``) and nothing needs a session (no quota, within
    ``max_size``); else None."""
    if cfg.backend == "threads" or cfg.quota is not None:
        return None
    if cfg.max_size is not None and len(data) > cfg.max_size:
        return None
    deliver: Callable[[Settings, bytes], Awaitable[Delivery] | None] | None
    deliver = getattr(backend_for(cfg.backend), "deliver", None)
    return None if deliver is None else deliver(cfg, data)


async def deliver(
    path: str | os.PathLike[str],
    source: Source,
    *,
    flags: str | None = None,
    return_path: str | None = None,
    delivered_to: str | None = None,
    crlf_to_lf: bool = False,
    **options: Unpack[MaildirOptions],
) -> Delivery:
    """Deliver *source* into the maildir at *path*: ``Maildir(path, **options).deliver(source)``.

    *options* are :class:`Maildir`'s keywords (``create``, ``fsync``, ``max_size``,
    ``size_stamp``, ``quota``, ``syscalls``); the others are :meth:`Maildir.deliver`'s.

    **Cancellation:** as :meth:`Maildir.deliver`.
    """
    return await Maildir(path, **options).deliver(
        source, flags=flags, return_path=return_path, delivered_to=delivered_to,
        crlf_to_lf=crlf_to_lf,
    )  # fmt: skip
