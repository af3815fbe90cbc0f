"""The recipients-to-maildirs handler: maildrop's server uses it, and so can aiosmtpd.

Import it from :mod:`maildrop.lmtp`. The aiosmtpd hooks (``handle_MAIL``/``RCPT``/``DATA``)
need aiosmtpd only when aiosmtpd calls them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from ._backend import requested, run_sync, server_backend
from ._errors import MaildirNotFoundError, QuotaExceededError, outcome
from ._lmtp_deliver import (
    SHUTTING_DOWN,
    Transaction,
    mailbox_name,
    reply_for,
    smtp_reply,
    where,
)
from ._maildir import Maildir
from ._quota import Quota
from ._quota_io import QuotaGuard
from ._sys import DEFAULT_SYSCALLS, Syscalls, stat_or_none
from ._writer import DIR_FLAGS

__all__ = ["SHUTTING_DOWN", "MaildirHandler", "mailbox_name"]

log = logging.getLogger("maildrop.lmtp")

#: Honour the limits of an existing ``maildirsize`` (and nothing where there is none).
FROM_FILE = Quota()
#: Seconds a maildir found by :meth:`MaildirHandler.lookup` (and whether it has a
#: ``maildirsize``) is reused for the next recipient of the same mailbox.
FOUND_FOR = 1.0
#: Mailboxes remembered at most (the memory is cleared when it fills).
_FOUND_MAX = 4096

_T = TypeVar("_T")


def _recalled(
    memory: dict[str, tuple[float, _T]], key: str, look: Callable[[], _T],
    *, keep: Callable[[_T], bool],
) -> _T:  # fmt: skip
    """Return what *memory* holds for *key* from less than :data:`FOUND_FOR` seconds ago,
    else ``look()``, remembered when ``keep(answer)`` (at most :data:`_FOUND_MAX` keys: the
    memory starts again when it fills)."""
    now = time.monotonic()
    known = memory.get(key)
    if known is not None and now - known[0] < FOUND_FOR:
        return known[1]
    answer = look()
    if keep(answer):
        if len(memory) >= _FOUND_MAX:
            memory.clear()
        memory[key] = (now, answer)
    return answer


class MaildirHandler:
    """Deliver each message into its recipients' maildirs (``<root>/<local-part>/``).

    :class:`~maildrop.lmtp.MaildirServer` runs it with maildrop's own streaming protocol
    engine. It is also an aiosmtpd handler (``handle_MAIL``/``RCPT``/``DATA``) for people
    who run aiosmtpd themselves; aiosmtpd holds each whole message in memory before the
    handler sees it, so bound it with aiosmtpd's ``data_size_limit``.

    Args:
        root: the directory holding one maildir per user; ``RCPT TO:<alice@example.org>``
            is ``<root>/alice/`` and must exist as a directory (its ``tmp/ new/ cur/`` are
            created when missing). Override :meth:`resolve` for another mapping.
        fsync: with ``False`` skip every fsync (tests only: not durable).
        max_size: refuse larger messages with ``552 5.3.4`` (counted as stored).
        quota: the Maildir++ quota of every maildir; the default honours an existing
            ``maildirsize`` (its limits), ``None`` ignores quotas. Over quota is ``452
            4.2.2`` (``552 5.2.2`` with ``Quota(permanent=True)``), at ``RCPT`` when the
            mailbox is full already, else at the end of the data.
        return_path: prepend ``Return-Path: <sender>`` (``<>`` for bounces).
        delivered_to: prepend ``Delivered-To: <recipient>`` when a message has a single
            recipient maildir, or when *single_copy* is off.
        single_copy: write a message for several maildirs once and hard-link it into the
            others (copied across filesystems). Such a shared file cannot carry a
            per-recipient ``Delivered-To`` without showing each recipient the others (a
            Bcc leak), so it has none, as in Dovecot's LMTP. With ``False`` (and
            *delivered_to* on) every maildir gets its own copy with its own
            ``Delivered-To``.
        crlf_to_lf: store lines ending in LF, as maildir readers expect (SMTP sends CRLF).
        recipient_delimiter: ``alice+tag`` is delivered to ``alice`` (``None``: off).
        syscalls: the syscall table for the maildirs (fault injection).
        backend: the maildirs' backend (``Maildir(backend=...)``). The default, ``None``,
            is threads unless ``MAILDROP_BACKEND`` names one: a server's worker processes
            (one per CPU) cost more CPU per message on io_uring, whose io-wq threads
            compete with the other workers (``_backend.server_backend``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fsync: bool = True,
        max_size: int | None = None,
        quota: Quota | None = FROM_FILE,
        return_path: bool = True,
        delivered_to: bool = True,
        single_copy: bool = True,
        crlf_to_lf: bool = True,
        recipient_delimiter: str | None = "+",
        syscalls: Syscalls = DEFAULT_SYSCALLS,
        backend: str | None = None,
    ) -> None:
        if backend is not None:
            requested(backend, syscalls)  # a bad choice fails here, not at every recipient
        self.backend = backend
        self.root = os.path.abspath(os.fspath(root))
        self.fsync = fsync
        self.max_size = max_size
        self.quota = quota
        self.return_path = return_path
        self.delivered_to = delivered_to
        self.single_copy = single_copy
        self.crlf_to_lf = crlf_to_lf
        self.recipient_delimiter = recipient_delimiter
        self.syscalls = syscalls
        self.closing = False
        self._targets: weakref.WeakKeyDictionary[Any, dict[str, Maildir]] = (
            weakref.WeakKeyDictionary()
        )
        self._delivering = 0
        # address -> (when found, its Maildir); maildir path -> (when, has maildirsize)
        self._found: dict[str, tuple[float, Maildir | None]] = {}
        self._quota_files: dict[str, tuple[float, bool]] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def delivering(self) -> int:
        """How many messages are being delivered right now."""
        return self._delivering

    async def wait_idle(self) -> None:
        """Return once no delivery is in flight.

        **Cancellation:** only the wait stops; the deliveries go on.
        """
        while self._delivering:
            await self._idle.wait()

    def lookup(self, address: str) -> Maildir | None:
        """Return the maildir for *address* now, or ``None``; the default :meth:`resolve`.

        ``<root>/<mailbox_name(address)>`` must be a directory; a symlink there is followed
        once, here. The ``stat`` calls go through the handler's syscall table, on the event
        loop: one ``lstat`` (two for a symlink) costs less than a thread hop; a root on a
        filesystem that can hang (NFS) wants :meth:`resolve` overridden to run this in a
        thread.

        Raises:
            OSError: the directory cannot be examined (a temporary refusal).
        """
        name = mailbox_name(address, recipient_delimiter=self.recipient_delimiter)
        if name is None:
            return None
        path = os.path.join(self.root, name)
        try:
            mode = self.syscalls.stat(path, follow_symlinks=False).st_mode
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
                return None
            raise
        if stat.S_ISLNK(mode):
            target = stat_or_none(self.syscalls, path)
            if target is None or not stat.S_ISDIR(target.st_mode):
                return None
            # The maildir is opened without following a last symlink: pass where it leads
            # (realpath reads the links; it has no entry in the table).
            path = os.path.realpath(path)
        elif not stat.S_ISDIR(mode):
            return None
        return self.maildir(path)

    def maildir(self, path: str) -> Maildir:
        """Return the :class:`Maildir` at *path* with this handler's settings."""
        return Maildir(
            path, fsync=self.fsync, max_size=self.max_size, quota=self.quota,
            syscalls=self.syscalls, backend=self.backend or server_backend(),
        )  # fmt: skip

    async def resolve(self, address: str) -> Maildir | None:
        """Return the maildir for *address*, or ``None`` to refuse it with ``550 5.1.1``.

        The default is :meth:`lookup`. An ``OSError`` raised here (say ``EIO``) refuses
        the recipient temporarily (``451 4.3.0``).

        **Cancellation:** nothing to undo (it only looks at the filesystem).
        """
        return self.lookup(address)

    async def check_quota(self, md: Maildir) -> None:
        """Raise :class:`QuotaExceededError` if *md* cannot take even an empty message.

        Any other problem is left for the delivery to find (and report).

        **Cancellation:** the check runs to its end in a worker thread.
        """
        quota = self.quota
        if quota is None:
            return
        if quota.from_file and not self._has_quota_file(md):
            return
        error = await run_sync(_quota_refusal, md, quota)
        if error is not None:
            raise error

    def transaction(self, sender: str | None, rcpts: list[str], targets: list[Maildir | None],
                    *, separate: bool = False) -> Transaction:  # fmt: skip
        """Start streaming a message from *sender* to *targets* (one per recipient)."""
        return_path = None
        if self.return_path and sender is not None:
            return_path = "" if sender in ("", "<>") else sender
        return Transaction(
            rcpts, targets, return_path=return_path, delivered_to=self.delivered_to,
            crlf_to_lf=self.crlf_to_lf,
            separate=separate or (self.delivered_to and not self.single_copy),
        )  # fmt: skip

    def begin(self) -> None:
        """Count a delivery in flight (:meth:`wait_idle` waits for it)."""
        self._delivering += 1
        self._idle.clear()

    def end(self) -> None:
        """Count a delivery as done."""
        self._delivering -= 1
        if not self._delivering:
            self._idle.set()

    async def rcpt_reply(self, address: str) -> tuple[str, Maildir | None]:
        """Resolve *address* and check its quota; return the reply and the maildir.

        **Cancellation:** nothing to undo.
        """
        now = self.rcpt_reply_now(address)
        if now is not None:
            return now
        try:
            md = await self.resolve(address)
            if md is not None:
                await self.check_quota(md)
        except Exception as exc:
            return _refused(address, exc), None
        if md is None:
            return _refused(address, None), None
        return "250 2.1.5 OK", md

    def rcpt_reply_now(self, address: str) -> tuple[str, Maildir | None] | None:
        """Return :meth:`rcpt_reply`'s answer when it needs no waiting, else ``None``.

        It does not wait with the default :meth:`resolve` when the mailbox has no
        ``maildirsize`` to check (or quotas are off).
        """
        if type(self).resolve is not MaildirHandler.resolve:
            return None
        try:
            md = self._lookup_recent(address)
        except OSError as exc:
            return _refused(address, exc), None
        if md is None:
            return _refused(address, None), None
        quota = self.quota
        if quota is not None and (not quota.from_file or self._has_quota_file(md)):
            return None
        return "250 2.1.5 OK", md

    def _lookup_recent(self, address: str) -> Maildir | None:
        """:meth:`lookup`, reusing a maildir found for the same address within
        :data:`FOUND_FOR` seconds (with the default syscall table): a mailbox removed
        meanwhile is refused that much later; one not found is looked for every time."""
        default = self.syscalls is DEFAULT_SYSCALLS
        return _recalled(
            self._found, address, lambda: self.lookup(address),
            keep=lambda md: default and md is not None,
        )  # fmt: skip

    def _has_quota_file(self, md: Maildir) -> bool:
        # One stat on the loop (as in lookup) spares a thread hop when there is no quota;
        # its answer is reused for FOUND_FOR seconds (the delivery checks the file anyway).
        path = where(md)
        return _recalled(
            self._quota_files, path,
            lambda: stat_or_none(md.syscalls, os.path.join(path, "maildirsize")) is not None,
            keep=lambda _: md.syscalls is DEFAULT_SYSCALLS,
        )  # fmt: skip

    # -- aiosmtpd hooks ------------------------------------------------------------------

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        """Refuse new transactions while shutting down; accept the sender otherwise."""
        if self.closing:
            return SHUTTING_DOWN
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        """Accept *address* if :meth:`resolve` maps it to a maildir with room."""
        reply, md = await self.rcpt_reply(address)
        if md is not None:
            self._targets.setdefault(envelope, {})[address] = md
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Deliver to every accepted recipient; return their replies once durable.

        **Cancellation:** (aiosmtpd cancels when the client disconnects) deliveries not yet
        linked into ``new/`` are removed; the client gets no reply and will retry.
        """
        from aiosmtpd.lmtp import LMTP

        self.begin()
        try:
            replies = await self._deliver(envelope)
        finally:
            self.end()
        if isinstance(server, LMTP):
            return "\r\n".join(replies)
        return smtp_reply(replies)

    async def handle_exception(self, error: Exception) -> str:
        """Answer an unexpected error with a temporary reply, never a permanent ``500``."""
        log.error("unexpected error: %r", error, exc_info=error)
        return outcome(error).reply

    async def _deliver(self, envelope: Any) -> list[str]:
        rcpts = list(envelope.rcpt_tos)
        known = self._targets.pop(envelope, {})
        try:
            targets: list[Maildir | None] = []
            for address in rcpts:
                md = known.get(address)
                targets.append(md if md is not None else await self.resolve(address))
            txn = self.transaction(envelope.mail_from, rcpts, targets)
        except Exception as exc:
            log.error("cannot start a delivery: %r", exc, exc_info=exc)
            return [outcome(exc).reply] * len(rcpts)
        await txn.write(envelope.original_content or b"")
        results = await txn.finish()
        return [reply_for(a, r, txn.elapsed) for a, r in zip(rcpts, results, strict=True)]


def _refused(address: str, exc: Exception | None) -> str:
    """Log a refused recipient; return its reply (``550 5.1.1`` when *exc* is None)."""
    if exc is None:
        reply = outcome(MaildirNotFoundError(address)).reply
        log.info("refused to=<%s> reply=%r", address, reply)
    else:
        reply = outcome(exc).reply
        log.warning("refused to=<%s> reply=%r error=%r", address, reply, exc)
    return reply


def _quota_refusal(md: Maildir, quota: Quota) -> QuotaExceededError | None:
    """Check (in a worker) whether *md* is full; drop the reservation the check makes."""
    settings = md._settings
    try:
        fd = settings.syscalls.open(settings.path, DIR_FLAGS)
    except OSError:
        return None
    guard = QuotaGuard(quota, settings)
    try:
        guard.check(fd, 0)
    except QuotaExceededError as exc:
        return exc
    except OSError:
        return None
    finally:
        guard.release()
        settings.syscalls.close_dir(fd)
    return None
