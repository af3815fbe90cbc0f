"""maildrop's exceptions, and the one function that maps any exception to its outcome.

Every leaf also subclasses the builtin that callers already catch, so ``except OSError`` or
``except ValueError`` keeps working. Disk errors are never wrapped: they surface as the
original ``OSError`` with its errno, after cleanup.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

__all__ = [
    "InvalidFolderNameError",
    "MaildirNotFoundError",
    "MaildropError",
    "MessageTooLargeError",
    "Outcome",
    "QuotaExceededError",
    "outcome",
]


class MaildropError(Exception):
    """Base class of maildrop's own errors."""


class MaildirNotFoundError(MaildropError, FileNotFoundError):
    """The maildir (or folder) does not exist and ``create=False`` forbids making it."""


class InvalidFolderNameError(MaildropError, ValueError):
    """A Maildir++ folder name is empty, malformed, reserved or would escape the maildir."""


class MessageTooLargeError(MaildropError, ValueError):
    """The message grew past ``max_size`` while streaming; nothing was delivered."""

    def __init__(self, max_size: int) -> None:
        super().__init__(
            f"message exceeds max_size={max_size} bytes; it was not delivered "
            "(raise max_size or reject the message earlier)"
        )
        self.max_size = max_size


class QuotaExceededError(MaildropError, OSError):
    """Delivering the message would exceed the mailbox quota.

    ``permanent`` says whether the sender should give up (``552 5.2.2``) or retry later
    (``452 4.2.2``, the default: the owner may free space).
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(errno.EDQUOT, message)
        self.permanent = permanent


# sysexits.h
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a failed delivery means to a sender, an SMTP/LMTP client and an MTA."""

    temporary: bool
    smtp_code: int
    enhanced: str
    text: str
    exit_code: int

    @property
    def reply(self) -> str:
        """The SMTP/LMTP reply line, e.g. ``452 4.3.1 Insufficient system storage``."""
        return f"{self.smtp_code} {self.enhanced} {self.text}"


_TEMP_STORAGE = frozenset({errno.ENOSPC})
_TEMP_QUOTA = frozenset({errno.EDQUOT})
_PERMISSION = frozenset({errno.EACCES, errno.EPERM})


def outcome(exc: BaseException) -> Outcome:
    """Map *exc* (raised by a delivery) to its outcome.

    Local problems are temporary: a full disk, an I/O error, a read-only filesystem or a
    bug of ours must never bounce mail. Permanent outcomes are reserved for the message
    itself (too large), a permanent quota, and a mailbox that does not exist.
    """
    if isinstance(exc, MessageTooLargeError):
        return Outcome(False, 552, "5.3.4", "Message too big for system", EX_DATAERR)
    if isinstance(exc, QuotaExceededError):
        if exc.permanent:
            return Outcome(False, 552, "5.2.2", "Mailbox full", EX_CANTCREAT)
        return Outcome(True, 452, "4.2.2", "Mailbox full, try again later", EX_TEMPFAIL)
    if isinstance(exc, MaildirNotFoundError):
        return Outcome(False, 550, "5.1.1", "Mailbox unavailable", EX_NOUSER)
    if isinstance(exc, InvalidFolderNameError):
        return Outcome(False, 550, "5.1.3", "Invalid mailbox folder name", EX_USAGE)
    if isinstance(exc, OSError):
        if exc.errno in _TEMP_STORAGE:
            return Outcome(True, 452, "4.3.1", "Insufficient system storage", EX_TEMPFAIL)
        if exc.errno in _TEMP_QUOTA:
            return Outcome(True, 452, "4.2.2", "Mailbox full, try again later", EX_TEMPFAIL)
        if exc.errno in _PERMISSION:
            return Outcome(True, 451, "4.3.0", "Mailbox permission problem", EX_NOPERM)
        return Outcome(True, 451, "4.3.0", "Local error in processing", EX_TEMPFAIL)
    return Outcome(True, 451, "4.3.0", "Local error in processing", EX_TEMPFAIL)
