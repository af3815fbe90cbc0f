"""The aiosmtpd handler of :mod:`maildrop.lmtp`: recipients to maildirs, one reply each.

Import it from :mod:`maildrop.lmtp`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Sequence

try:
    from aiosmtpd.lmtp import LMTP as _AioLMTP
    from aiosmtpd.smtp import SMTP as _AioSMTP
    from aiosmtpd.smtp import Envelope, Session
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "maildrop.lmtp needs aiosmtpd; install the server extra: pip install 'maildrop[server]'"
    ) from exc

from . import (
    DEFAULT_SYSCALLS,
    Delivery,
    Maildir,
    MaildirNotFoundError,
    MessageTooLargeError,
    Syscalls,
    deliver_many,
    outcome,
)

__all__ = ["SHUTTING_DOWN", "MaildirHandler", "mailbox_name"]

log = logging.getLogger("maildrop.lmtp")

#: ``NAME_MAX``: a mailbox is one directory entry under the root.
_NAME_MAX = 255
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"


def mailbox_name(address: str, *, recipient_delimiter: str | None = "+") -> str | None:
    """Return the mailbox directory name for *address*, or ``None`` if it cannot be one.

    The name is the local part (everything before the last ``@``), lowercased, without the
    extension after *recipient_delimiter* (``alice+lists`` is ``alice``). It is refused
    when it is empty, contains ``/``, NUL or another control character, contains ``..``,
    starts with ``.`` or is longer than one directory entry may be.
    """
    local = address.rpartition("@")[0] if "@" in address else address
    if recipient_delimiter and not local.startswith(recipient_delimiter):
        local = local.split(recipient_delimiter, 1)[0]
    local = local.lower()
    if not local or local.startswith(".") or ".." in local or "/" in local:
        return None
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in local):
        return None
    if len(local.encode("utf-8", "surrogateescape")) > _NAME_MAX:
        return None
    return local


def _ascii(text: str) -> str:
    return text if text.isascii() and text.isprintable() else "(non-ASCII)"


class MaildirHandler:
    """An aiosmtpd handler that delivers each message into its recipients' maildirs.

    Use it with aiosmtpd's ``LMTP`` or ``SMTP`` (or this module's :class:`LMTP` /
    :class:`SMTP`, which :class:`MaildirServer` uses).

    Args:
        root: the directory holding one maildir per user; ``RCPT TO:<alice@example.org>``
            is ``<root>/alice/`` and must exist as a directory (its ``tmp/ new/ cur/`` are
            created when missing). Override :meth:`resolve` for another mapping.
        fsync: with ``False`` skip every fsync (tests only: not durable).
        max_size: refuse larger messages with ``552 5.3.4`` (counted before the added
            headers). Also set the server's ``data_size_limit``, which bounds memory.
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
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fsync: bool = True,
        max_size: int | None = None,
        return_path: bool = True,
        delivered_to: bool = True,
        single_copy: bool = True,
        crlf_to_lf: bool = True,
        recipient_delimiter: str | None = "+",
        syscalls: Syscalls = DEFAULT_SYSCALLS,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.fsync = fsync
        self.max_size = max_size
        self.return_path = return_path
        self.delivered_to = delivered_to
        self.single_copy = single_copy
        self.crlf_to_lf = crlf_to_lf
        self.recipient_delimiter = recipient_delimiter
        self.syscalls = syscalls
        self.closing = False
        self._targets: weakref.WeakKeyDictionary[Envelope, dict[str, Maildir]] = (
            weakref.WeakKeyDictionary()
        )
        self._delivering = 0
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

    async def resolve(self, address: str) -> Maildir | None:
        """Return the maildir for *address*, or ``None`` to refuse it with ``550 5.1.1``.

        The default is ``<root>/<mailbox_name(address)>``, which must be a directory; a
        symlink there is followed once, here. An ``OSError`` raised here (say ``EIO``)
        refuses the recipient temporarily (``451 4.3.0``).

        **Cancellation:** nothing to undo (it only looks at the filesystem).
        """
        name = mailbox_name(address, recipient_delimiter=self.recipient_delimiter)
        if name is None:
            return None
        path = os.path.join(self.root, name)

        def probe() -> str | None:
            real = os.path.realpath(path)
            return real if os.path.isdir(real) else None

        real = await asyncio.get_running_loop().run_in_executor(None, probe)
        if real is None:
            return None
        return Maildir(real, fsync=self.fsync, syscalls=self.syscalls)

    # -- aiosmtpd hooks ------------------------------------------------------------------

    async def handle_MAIL(
        self,
        server: _AioSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """Refuse new transactions while shutting down; accept the sender otherwise."""
        if self.closing:
            return SHUTTING_DOWN
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: _AioSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Accept *address* if :meth:`resolve` maps it to a maildir."""
        try:
            md = await self.resolve(address)
        except Exception as exc:
            reply = outcome(exc).reply
            log.warning("refused to=<%s> reply=%r error=%r", address, reply, exc)
            return reply
        if md is None:
            reply = outcome(MaildirNotFoundError(address)).reply
            log.info("refused to=<%s> reply=%r", address, reply)
            return reply
        self._targets.setdefault(envelope, {})[address] = md
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: _AioSMTP, session: Session, envelope: Envelope) -> str:
        """Deliver to every accepted recipient; return their replies once durable.

        **Cancellation:** (aiosmtpd cancels when the client disconnects) deliveries not yet
        linked into ``new/`` are removed; the client gets no reply and will retry.
        """
        self._delivering += 1
        self._idle.clear()
        try:
            replies = await self._deliver(envelope)
        finally:
            self._delivering -= 1
            if not self._delivering:
                self._idle.set()
        if isinstance(server, _AioLMTP):
            return "\r\n".join(replies)
        return _smtp_reply(replies)

    async def handle_exception(self, error: Exception) -> str:
        """Answer an unexpected error with a temporary reply, never a permanent ``500``."""
        log.error("unexpected error: %r", error, exc_info=error)
        return outcome(error).reply

    # -- delivery -----------------------------------------------------------------------

    async def _deliver(self, envelope: Envelope) -> list[str]:
        rcpts = list(envelope.rcpt_tos)
        content = envelope.original_content
        if content is None:  # pragma: no cover - aiosmtpd always sets it before DATA
            content = b""
        start = time.monotonic()
        try:
            if self.max_size is not None and len(content) > self.max_size:
                raise MessageTooLargeError(self.max_size)
            known = self._targets.pop(envelope, {})
            targets: list[Maildir | None] = []
            for address in rcpts:
                md = known.get(address)
                targets.append(md if md is not None else await self.resolve(address))
            results = await self._deliver_to(content, envelope, rcpts, targets)
        except Exception as exc:
            results = [exc] * len(rcpts)
        elapsed = time.monotonic() - start
        replies = []
        for address, result in zip(rcpts, results, strict=True):
            if isinstance(result, Delivery):
                log.info(
                    "delivered to=<%s> path=%s size=%d time=%.3fs",
                    address, result.path, result.size, elapsed,
                )  # fmt: skip
                replies.append(f"250 2.0.0 Delivered as {_ascii(result.name)}")
            else:
                reply = outcome(result).reply
                log.warning(
                    "failed to=<%s> reply=%r error=%r time=%.3fs", address, reply, result, elapsed
                )
                replies.append(reply)
        return replies

    async def _deliver_to(
        self,
        content: bytes,
        envelope: Envelope,
        rcpts: list[str],
        targets: Sequence[Maildir | None],
    ) -> list[Delivery | Exception]:
        """Deliver *content* once per distinct maildir; return one result per recipient."""
        sender = envelope.mail_from
        return_path = None
        if self.return_path and sender is not None:
            return_path = "" if sender == "<>" else sender
        unique: dict[str, tuple[Maildir, str]] = {}
        for address, md in zip(rcpts, targets, strict=True):
            if md is not None:
                unique.setdefault(str(md.path), (md, address))
        groups = list(unique.values())
        results: list[Delivery | Exception]
        if len(groups) == 1 or (len(groups) > 1 and self.delivered_to and not self.single_copy):
            results = list(
                await asyncio.gather(
                    *(self._one(content, md, return_path, address) for md, address in groups)
                )
            )
        elif groups:
            results = await deliver_many(
                content,
                [md for md, _ in groups],
                return_path=return_path,
                crlf_to_lf=self.crlf_to_lf,
            )
        else:
            results = []
        by_path = {key: result for key, result in zip(unique, results, strict=True)}
        return [
            MaildirNotFoundError(address) if md is None else by_path[str(md.path)]
            for address, md in zip(rcpts, targets, strict=True)
        ]

    async def _one(
        self, content: bytes, md: Maildir, return_path: str | None, address: str
    ) -> Delivery | Exception:
        try:
            return await md.deliver(
                content,
                return_path=return_path,
                delivered_to=address if self.delivered_to else None,
                crlf_to_lf=self.crlf_to_lf,
            )
        except Exception as exc:
            return exc


def _smtp_reply(replies: list[str]) -> str:
    """Fold per-recipient replies into SMTP's one reply for the transaction.

    All delivered: ``250``. Otherwise the failure, preferring a temporary one: the client
    retries (or bounces) the whole message, and recipients already served may get it
    twice, which beats losing it. LMTP exists to avoid this; prefer it.
    """
    failed = [r for r in replies if not r.startswith("2")]
    if not failed:
        return "250 2.0.0 OK" if len(replies) != 1 else replies[0]
    temporary = [r for r in failed if r.startswith("4")]
    return (temporary or failed)[0]
