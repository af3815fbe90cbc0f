"""The public face: :class:`Maildir` and the one-shot :func:`deliver`."""

from __future__ import annotations

import os
from pathlib import Path

from ._folders import folder_dirname
from ._naming import format_flags
from ._session import Delivery, DeliverySession
from ._sources import Source, feed
from ._sys import DEFAULT_SYSCALLS, Syscalls
from ._writer import Layout

__all__ = ["Maildir", "deliver"]


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
        syscalls: the table of blocking calls to use (fault injection, compat hooks).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        fsync: bool = True,
        max_size: int | None = None,
        size_stamp: bool = False,
        syscalls: Syscalls = DEFAULT_SYSCALLS,
    ) -> None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        if not isinstance(syscalls, Syscalls):
            raise TypeError("syscalls must be a maildrop.Syscalls table")
        self._layout = Layout(
            root=os.path.abspath(os.fspath(path)),
            folder=None,
            create=bool(create),
            fsync=bool(fsync),
            syscalls=syscalls,
        )
        self._max_size = _check_max_size(max_size)
        self._size_stamp = bool(size_stamp)

    @property
    def path(self) -> Path:
        """The maildir's directory."""
        return Path(self._layout.path)

    @property
    def syscalls(self) -> Syscalls:
        """The syscall table this maildir uses."""
        return self._layout.syscalls

    def __repr__(self) -> str:
        return f"Maildir({self._layout.path!r})"

    def folder(self, name: str) -> Maildir:
        """Return the Maildir++ subfolder *name* (``"Lists.python"`` is ``.Lists.python``).

        The folder (and, with ``create=True``, the maildir above it) is created on its first
        delivery. A folder of a folder is a deeper level of the same maildir.

        Raises:
            InvalidFolderNameError: *name* is empty, malformed or reserved.
        """
        lay = self._layout
        if lay.folder is not None:
            name = f"{lay.folder[1:]}.{name}" if isinstance(name, str) else name
        dirname = folder_dirname(name)
        sub = object.__new__(Maildir)
        sub._layout = Layout(lay.root, dirname, lay.create, lay.fsync, lay.syscalls)
        sub._max_size = self._max_size
        sub._size_stamp = self._size_stamp
        return sub

    def open_delivery(self, *, flags: str | None = None) -> DeliverySession:
        """Return a session to feed a message into chunk by chunk.

        ``async with md.open_delivery() as w: await w.write(chunk); ...; d = await
        w.commit()``. With *flags* (e.g. ``"S"``) the message goes to ``cur/`` with the
        ``:2,<flags>`` info suffix instead of ``new/``.
        """
        return DeliverySession(
            self._layout,
            flags=None if flags is None else format_flags(flags),
            size_stamp=self._size_stamp,
            max_size=self._max_size,
        )

    async def deliver(self, source: Source, *, flags: str | None = None) -> Delivery:
        """Deliver *source* and return where it landed, once it is durable.

        *source* may be bytes-like, a binary file, an object with an async ``read(n)``, an
        async iterable of bytes-like chunks or an anyio ``ByteReceiveStream``.

        Raises:
            TypeError: *source* (or one of its chunks) is not bytes-like.
            MessageTooLargeError: the message passed ``max_size``.
            MaildirNotFoundError: the maildir is missing and ``create=False``.
            OSError: a disk error, with its original errno.
            Exception: whatever *source* raised, as the same object.

        Every failure leaves nothing behind in ``tmp/`` or ``new/``.

        **Cancellation:** the delivery is abandoned and its tmp file removed (after any write
        already running in a worker thread finished). If cancelled after the message was
        linked into ``new/``, it stays there: it is complete, and becomes durable with the
        next directory fsync.
        """
        session = self.open_delivery(flags=flags)
        async with session:
            await feed(session, source)
            return await session.commit()


async def deliver(
    path: str | os.PathLike[str],
    source: Source,
    *,
    create: bool = True,
    fsync: bool = True,
    max_size: int | None = None,
    size_stamp: bool = False,
    syscalls: Syscalls = DEFAULT_SYSCALLS,
    flags: str | None = None,
) -> Delivery:
    """Deliver *source* into the maildir at *path*: ``Maildir(path, ...).deliver(source)``.

    **Cancellation:** as :meth:`Maildir.deliver`.
    """
    md = Maildir(
        path, create=create, fsync=fsync, max_size=max_size, size_stamp=size_stamp,
        syscalls=syscalls,
    )  # fmt: skip
    return await md.deliver(source, flags=flags)
