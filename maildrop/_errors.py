"""maildrop's exceptions, and the one function that maps any exception to its outcome.

Every leaf also subclasses the builtin that callers already catch, so ``except OSError`` or
``except ValueError`` keeps working. Disk errors are never wrapped: they surface as the
original ``OSError`` with its errno, after cleanup.

The outcomes (the library, the LMTP/SMTP servers and the ``maildrop`` command agree):

======================================  =========  ===============  ===========
condition                               exit       SMTP/LMTP        retry?
======================================  =========  ===============  ===========
delivered                               0 (OK)     250 2.0.0        n/a
message larger than ``max_size``        65         552 5.3.4        no
empty message (the command only)        65         n/a              no
mailbox full (quota, the default)       75         452 4.2.2        yes
mailbox full, ``permanent=True``        73         552 5.2.2        no
maildir or folder does not exist        67         550 5.1.1        no
maildir path is a file or a symlink     73         550 5.2.0        no
invalid folder name                     64         550 5.1.3        no
disk full, I/O error, read-only fs,     75         452 4.3.1 /      yes
permission problem, any other error                451 4.3.0
======================================  =========  ===============  ===========

A permission problem is temporary: a wrong owner or mode is a local mistake an
administrator fixes, and mail must wait for that instead of bouncing (Postfix bounces on
77, EX_NOPERM, which maildrop therefore never returns).
"""

from __future__ import annotations

import errno
import os

from ._record import record

__all__ = [
    "EmptyMessageError",
    "InvalidFolderNameError",
    "MaildirNotFoundError",
    "MaildropError",
    "MessageTooLargeError",
    "NotAMaildirError",
    "Outcome",
    "QuotaExceededError",
    "UnusableQuotaFile",
    "outcome",
]


class MaildropError(Exception):
    """Base class of maildrop's own errors."""


class MaildirNotFoundError(MaildropError, FileNotFoundError):
    """The maildir (or folder) does not exist and ``create=False`` forbids making it."""


class InvalidFolderNameError(MaildropError, ValueError):
    """A Maildir++ folder name is empty, malformed, reserved or would escape the maildir."""


class NotAMaildirError(MaildropError, NotADirectoryError):
    """The maildir, a folder or one of its ``tmp/ new/ cur/`` is a file or a symlink.

    maildrop never follows symlinks inside a maildir; retrying cannot help, so delivery
    fails permanently. ``errno`` is ``ENOTDIR`` or ``ELOOP``, as the kernel said.
    """

    def __init__(self, err: int, path: str, is_link: bool = False) -> None:
        if is_link:
            text = (
                f"{path!r} is a symbolic link; maildrop does not follow symlinks in a maildir "
                "(pass the real path)"
            )
        else:
            text = f"{path!r} is not a directory (a maildir and its tmp/ new/ cur/ must be)"
        super().__init__(err, text)


class EmptyMessageError(MaildropError, ValueError):
    """The message has no bytes at all: nothing was delivered."""


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


class UnusableQuotaFile(OSError):
    """``maildirsize`` exists but is not a regular file with one link; it is never used."""

    def __init__(self, root: str, what: str, err: int = errno.EINVAL) -> None:
        super().__init__(
            err,
            f"{os.path.join(root, 'maildirsize')!r} is {what}, not a regular file with one link; "
            "maildrop neither reads nor writes it: replace it with a regular file (or remove "
            "it and set the limits again)",
        )


@record(frozen=True, slots=True)
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


def outcome(exc: BaseException) -> Outcome:
    """Map *exc* (raised by a delivery) to its outcome.

    Local problems are temporary: a full disk, an I/O error, a read-only filesystem, a
    permission problem or a bug of ours must never bounce mail. Permanent outcomes are
    reserved for what retrying cannot fix: the message itself (too large, empty), a
    permanent quota, a mailbox that does not exist or is not a directory (see the table in
    this module's docstring and in README).
    """
    if isinstance(exc, MessageTooLargeError):
        return Outcome(False, 552, "5.3.4", "Message too big for system", EX_DATAERR)
    if isinstance(exc, EmptyMessageError):
        return Outcome(False, 554, "5.6.0", "Empty message", EX_DATAERR)
    if isinstance(exc, QuotaExceededError):
        if exc.permanent:
            return Outcome(False, 552, "5.2.2", "Mailbox full", EX_CANTCREAT)
        return Outcome(True, 452, "4.2.2", "Mailbox full, try again later", EX_TEMPFAIL)
    if isinstance(exc, MaildirNotFoundError):
        return Outcome(False, 550, "5.1.1", "Mailbox unavailable", EX_NOUSER)
    if isinstance(exc, NotAMaildirError):
        return Outcome(False, 550, "5.2.0", "Mailbox is not a maildir", EX_CANTCREAT)
    if isinstance(exc, InvalidFolderNameError):
        return Outcome(False, 550, "5.1.3", "Invalid mailbox folder name", EX_USAGE)
    if isinstance(exc, OSError):
        if exc.errno in _TEMP_STORAGE:
            return Outcome(True, 452, "4.3.1", "Insufficient system storage", EX_TEMPFAIL)
        if exc.errno in _TEMP_QUOTA:
            return Outcome(True, 452, "4.2.2", "Mailbox full, try again later", EX_TEMPFAIL)
        if exc.errno in (errno.EACCES, errno.EPERM):
            return Outcome(True, 451, "4.3.0", "Mailbox permission problem", EX_TEMPFAIL)
        return Outcome(True, 451, "4.3.0", "Local error in processing", EX_TEMPFAIL)
    return Outcome(True, 451, "4.3.0", "Local error in processing", EX_TEMPFAIL)
