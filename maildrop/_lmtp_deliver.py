"""What both LMTP/SMTP front ends share: recipient names, streamed delivery, replies.

maildrop's own server (``_lmtp_protocol``) and the aiosmtpd handler (``_lmtp_handler``) both
deliver through :class:`Transaction`: one message, streamed in as it arrives, to the maildirs
of the accepted recipients, with one result per recipient and one reply line each.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import time
import unicodedata
from collections.abc import AsyncIterator, Sequence

from . import _log
from ._errors import MaildirNotFoundError, outcome
from ._folders import NAME_MAX, has_control
from ._maildir import Maildir
from ._many import deliver_many
from ._session import Delivery, DeliverySession

__all__ = [
    "SHUTTING_DOWN",
    "Failed",
    "Transaction",
    "mailbox_name",
    "reply_for",
    "smtp_reply",
    "where",
]

log = logging.getLogger("maildrop.lmtp")

#: Bytes queued for :func:`deliver_many` before the sender waits.
_FEED_LIMIT = 1 << 20
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
ALREADY = "250 2.0.0 Already delivered"


def mailbox_name(address: str, *, recipient_delimiter: str | None = "+") -> str | None:
    """Return the mailbox directory name for *address*, or ``None`` if it cannot be one.

    The name is the local part (everything before the last ``@``) without the extension
    after *recipient_delimiter* (``alice+lists`` is ``alice``), in Unicode NFC and
    casefolded (``Alice`` is ``alice``, ``ÉLODIE`` is ``élodie``). A local part whose
    folding turns a non-ASCII character into ASCII (the Kelvin sign ``K`` into ``k``, ``ß``
    into ``ss``, the long s into ``s``) is refused: it would reach another user's mailbox. The
    name is also refused when it is empty, contains ``/``, NUL or another control
    character, contains ``..``, starts with ``.`` or is longer than one directory entry.
    """
    local = address.rpartition("@")[0] if "@" in address else address
    if recipient_delimiter and not local.startswith(recipient_delimiter):
        local = local.split(recipient_delimiter, 1)[0]
    if local.isascii():
        folded = local.lower()
    elif any(_to_ascii(ch) for ch in local):
        return None
    else:
        folded = unicodedata.normalize("NFC", unicodedata.normalize("NFC", local).casefold())
    if not folded or folded.startswith(".") or ".." in folded or "/" in folded:
        return None
    if has_control(folded):
        return None
    # A mailbox is one directory entry under the root.
    if len(folded.encode("utf-8", "surrogateescape")) > NAME_MAX:
        return None
    return folded


def _to_ascii(ch: str) -> bool:
    """Whether folding the non-ASCII *ch* yields ASCII (a look-alike of another name)."""
    if ch.isascii():
        return False
    return any(c.isascii() for c in unicodedata.normalize("NFC", ch).casefold())


def where(md: Maildir) -> str:
    """Return the directory of *md* as a string (``str(md.path)`` without a ``Path``)."""
    return md._settings.path


def _ascii(text: str) -> str:
    return text if text.isascii() and text.isprintable() else "(non-ASCII)"


class _Feed:
    """A bounded byte channel from the protocol to :func:`deliver_many` (an async iterable)."""

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._gone = False  # the reader stopped: drop what comes
        self._reader: asyncio.Future[None] | None = None
        self._writer: asyncio.Future[None] | None = None

    @staticmethod
    def _wake(fut: asyncio.Future[None] | None) -> None:
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def put(self, data: bytes) -> None:
        if self._gone:
            return
        self._chunks.append(data)
        self._size += len(data)
        self._wake(self._reader)
        while self._size > _FEED_LIMIT and not self._gone:
            self._writer = asyncio.get_running_loop().create_future()
            await self._writer

    def close(self) -> None:
        self._eof = True
        self._wake(self._reader)

    def gone(self) -> None:
        self._gone = True
        self._chunks.clear()
        self._wake(self._writer)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while not self._chunks:
            if self._eof:
                raise StopAsyncIteration
            self._reader = asyncio.get_running_loop().create_future()
            await self._reader
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        if self._size <= _FEED_LIMIT:
            self._wake(self._writer)
        return chunk


class Transaction:
    """One message streamed to the maildirs of its recipients.

    *targets* holds one maildir (or ``None``: refused now) per accepted recipient, in RCPT
    order; recipients sharing a maildir get it once. One maildir gets a plain delivery
    session (with ``Delivered-To``); several share one staged file hard-linked into each
    (:func:`deliver_many`, no ``Delivered-To``), unless *separate* gives each its own
    session (and its own ``Delivered-To`` when *delivered_to*).
    """

    def __init__(
        self,
        rcpts: Sequence[str],
        targets: Sequence[Maildir | None],
        *,
        return_path: str | None,
        delivered_to: bool,
        crlf_to_lf: bool,
        separate: bool,
    ) -> None:
        self.rcpts = list(rcpts)
        self.targets = list(targets)
        self.started = time.monotonic()
        unique: dict[str, tuple[Maildir, str]] = {}
        for address, md in zip(self.rcpts, self.targets, strict=True):
            if md is not None:
                unique.setdefault(where(md), (md, address))
        self._keys = list(unique)
        groups = list(unique.values())
        self._results: dict[str, Delivery | Exception] = {}
        self._sessions: dict[str, DeliverySession] = {}
        self._many: asyncio.Task[list[Delivery | Exception]] | None = None
        self._feed: _Feed | None = None
        if len(groups) > 1 and not separate:
            self._feed = _Feed()
            self._many = asyncio.get_running_loop().create_task(
                deliver_many(
                    self._feed,
                    [md for md, _ in groups],
                    return_path=return_path,
                    crlf_to_lf=crlf_to_lf,
                )
            )
            self._many.add_done_callback(lambda _: self._feed.gone() if self._feed else None)
            return
        for key, (md, address) in zip(self._keys, groups, strict=True):
            self._sessions[key] = md.open_delivery(
                return_path=return_path,
                delivered_to=address if delivered_to else None,
                crlf_to_lf=crlf_to_lf,
            )

    @property
    def elapsed(self) -> float:
        """Seconds since the transaction started."""
        return time.monotonic() - self.started

    @property
    def failed(self) -> bool:
        """Whether every maildir has failed already (the rest of the message can be dropped)."""
        if self._many is not None:
            return self._many.done()
        return not self._sessions

    async def write(self, data: bytes) -> None:
        """Stream *data* to every maildir still going; a failing one records its error.

        **Cancellation:** as :meth:`abort` afterwards.
        """
        if self._feed is not None:
            await self._feed.put(data)
            return
        for key, session in list(self._sessions.items()):
            try:
                await session.write(data)
            except Exception as exc:  # the session aborted itself
                del self._sessions[key]
                self._results[key] = exc

    async def finish(self, skip: frozenset[str] = frozenset()) -> list[Delivery | Exception]:
        """Commit; return one result per recipient (maildirs in *skip* are left out).

        A maildir in *skip* (by path; only for separate sessions) is answered with
        :data:`ALREADY`'s meaning: the caller knows it holds this message already.

        **Cancellation:** deliveries not yet linked are removed (see :meth:`abort`).
        """
        try:
            if self._many is not None:
                assert self._feed is not None
                self._feed.close()
                for key, res in zip(self._keys, await self._many, strict=True):
                    self._results[key] = res
            for key, session in list(self._sessions.items()):
                del self._sessions[key]
                if key in skip:
                    await session.abort()
                    continue
                try:
                    self._results[key] = await session.commit()
                except Exception as exc:
                    self._results[key] = exc
        finally:
            if self._sessions or (self._many is not None and not self._many.done()):
                await self.abort()  # (cancelled or failed before every session was done)
        return [
            MaildirNotFoundError(address) if md is None else self._result(where(md), skip)
            for address, md in zip(self.rcpts, self.targets, strict=True)
        ]

    def _result(self, key: str, skip: frozenset[str]) -> Delivery | Exception:
        """The result for the maildir *key*: skipped only when the caller said so; a maildir
        that has none (its delivery was aborted) failed, and must never read as delivered."""
        if key in skip:
            return _Skipped()
        return self._results.get(key) or OSError(
            errno.EIO, "the delivery was aborted before it was committed"
        )

    async def abort(self) -> None:
        """Remove every delivery not yet committed.

        **Cancellation:** the cleanup still runs for what it reached.
        """
        if self._many is not None and not self._many.done():
            self._many.cancel()
            await asyncio.gather(self._many, return_exceptions=True)
        sessions = list(self._sessions.values())
        self._sessions.clear()
        for session in sessions:
            await session.abort()


class Failed(Transaction):
    """A transaction that could not start: every recipient gets *error*'s reply."""

    def __init__(self, rcpts: Sequence[str], error: Exception) -> None:
        super().__init__(rcpts, [None] * len(rcpts), return_path=None, delivered_to=False,
                         crlf_to_lf=False, separate=True)  # fmt: skip
        self.error = error

    async def finish(self, skip: frozenset[str] = frozenset()) -> list[Delivery | Exception]:
        """Return the error once per recipient."""
        return [self.error] * len(self.rcpts)


class _Skipped(Exception):
    """A recipient left out because its maildir already holds the message."""


def reply_for(address: str, result: Delivery | Exception, elapsed: float) -> str:
    """Log one recipient's result and return its reply line."""
    if isinstance(result, Delivery):
        _log.info(
            log, "delivered to=<%s> path=%s size=%d time=%.3fs",
            address, os.fspath(result), result.size, elapsed,
        )  # fmt: skip
        return f"250 2.0.0 Delivered as {_ascii(result.name)}"
    if isinstance(result, _Skipped):
        log.info("already delivered to=<%s> (an SMTP retry)", address)
        return ALREADY
    reply = outcome(result).reply
    log.warning("failed to=<%s> reply=%r error=%r time=%.3fs", address, reply, result, elapsed)
    return reply


def smtp_reply(replies: list[str]) -> str:
    """Fold per-recipient replies into SMTP's one reply for the transaction.

    All delivered: ``250``. Otherwise the failure, preferring a temporary one: the client
    retries (or bounces) the whole message. The SMTP server remembers who got it
    (``_lmtp_retry``), so a retry reaches only the others; LMTP needs none of this.
    """
    failed = [r for r in replies if not r.startswith("2")]
    if not failed:
        return "250 2.0.0 OK" if len(replies) != 1 else replies[0]
    temporary = [r for r in failed if r.startswith("4")]
    return (temporary or failed)[0]
