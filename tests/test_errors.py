"""The exception hierarchy and the one outcome function."""

from __future__ import annotations

import errno

import pytest

from maildrop import (
    EmptyMessageError,
    InvalidFolderNameError,
    MaildirNotFoundError,
    MaildropError,
    MessageTooLargeError,
    NotAMaildirError,
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
        (PermissionError(errno.EACCES, "denied"), True, "451 4.3.0", 75),
        (OSError(errno.EPERM, "denied"), True, "451 4.3.0", 75),
        (EmptyMessageError("empty"), False, "554 5.6.0", 65),
        (NotAMaildirError(errno.ENOTDIR, "/m"), False, "550 5.2.0", 73),
        (MessageTooLargeError(10), False, "552 5.3.4", 65),
        (QuotaExceededError("q"), True, "452 4.2.2", 75),
        (QuotaExceededError("q", permanent=True), False, "552 5.2.2", 73),
        (MaildirNotFoundError(errno.ENOENT, "gone"), False, "550 5.1.1", 67),
        (InvalidFolderNameError("bad"), False, "550 5.1.3", 64),
        (RuntimeError("bug"), True, "451 4.3.0", 75),
    ],
)
def test_outcome_mapping(exc: BaseException, temporary: bool, reply: str, exit_code: int) -> None:
    """Local problems (permissions too) are temporary; only what retrying cannot fix is not."""
    o = outcome(exc)
    assert o.temporary is temporary
    assert o.reply.startswith(reply)
    assert o.exit_code == exit_code
    assert (o.smtp_code < 500) is temporary
    assert o.exit_code != 77  # EX_NOPERM: Postfix bounces on it


def test_not_a_maildir_says_which() -> None:
    """A file and a symlink get different messages; both are NotADirectoryError."""
    assert issubclass(NotAMaildirError, NotADirectoryError)
    assert issubclass(EmptyMessageError, ValueError)
    assert "is not a directory" in str(NotAMaildirError(errno.ENOTDIR, "/m"))
    link = NotAMaildirError(errno.ELOOP, "/m/tmp", True)
    assert "symbolic link" in str(link)
    assert link.errno == errno.ELOOP


def test_message_too_large_says_what_to_do() -> None:
    """The message names the limit and what to do."""
    e = MessageTooLargeError(100)
    assert e.max_size == 100
    assert "max_size=100" in str(e)
