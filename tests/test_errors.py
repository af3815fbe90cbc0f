"""The exception hierarchy and the one outcome function."""

from __future__ import annotations

import errno

import pytest

from maildrop import (
    InvalidFolderNameError,
    MaildirNotFoundError,
    MaildropError,
    MessageTooLargeError,
    QuotaExceededError,
    outcome,
)


def test_leaves_subclass_the_builtins_callers_catch() -> None:
    """Each leaf is a MaildropError and the builtin users already catch."""
    assert issubclass(MaildirNotFoundError, FileNotFoundError)
    assert issubclass(InvalidFolderNameError, ValueError)
    assert issubclass(MessageTooLargeError, ValueError)
    assert issubclass(QuotaExceededError, OSError)
    for cls in (MaildirNotFoundError, InvalidFolderNameError, MessageTooLargeError):
        assert issubclass(cls, MaildropError)
    q = QuotaExceededError("over quota")
    assert q.errno == errno.EDQUOT
    assert not q.permanent


@pytest.mark.parametrize(
    ("exc", "temporary", "reply", "exit_code"),
    [
        (OSError(errno.ENOSPC, "full"), True, "452 4.3.1", 75),
        (OSError(errno.EDQUOT, "quota"), True, "452 4.2.2", 75),
        (OSError(errno.EIO, "io"), True, "451 4.3.0", 75),
        (OSError(errno.EROFS, "ro"), True, "451 4.3.0", 75),
        (OSError(errno.ENAMETOOLONG, "long"), True, "451 4.3.0", 75),
        (PermissionError(errno.EACCES, "denied"), True, "451 4.3.0", 77),
        (OSError(errno.EPERM, "denied"), True, "451 4.3.0", 77),
        (MessageTooLargeError(10), False, "552 5.3.4", 65),
        (QuotaExceededError("q"), True, "452 4.2.2", 75),
        (QuotaExceededError("q", permanent=True), False, "552 5.2.2", 73),
        (MaildirNotFoundError(errno.ENOENT, "gone"), False, "550 5.1.1", 67),
        (InvalidFolderNameError("bad"), False, "550 5.1.3", 64),
        (RuntimeError("bug"), True, "451 4.3.0", 75),
    ],
)
def test_outcome_mapping(exc: BaseException, temporary: bool, reply: str, exit_code: int) -> None:
    """Local problems are temporary; only the message, a hard quota or no mailbox are not."""
    o = outcome(exc)
    assert o.temporary is temporary
    assert o.reply.startswith(reply)
    assert o.exit_code == exit_code
    assert (o.smtp_code < 500) is temporary


def test_message_too_large_says_what_to_do() -> None:
    """The message names the limit and what to do."""
    e = MessageTooLargeError(100)
    assert e.max_size == 100
    assert "max_size=100" in str(e)
