"""The mailbox the append task delivers into: the part of Twisted's ``MaildirMailbox`` it uses."""

from __future__ import annotations

from typing import Any

from ._hooks import PathT
from ._task import MaildirMailboxAppendMessageTask

__all__ = ["MaildirMailbox"]


class MaildirMailbox:
    """A maildir mailbox to append to: the part of Twisted's ``MaildirMailbox`` the task uses.

    Creating one does no I/O; the maildir is created on first delivery. ``list`` holds the
    paths of the messages appended through this object (Twisted's lists the existing ones).
    """

    AppendFactory: type[MaildirMailboxAppendMessageTask] = MaildirMailboxAppendMessageTask

    def __init__(self, path: PathT) -> None:
        self.path = path
        self.list: list[str | bytes] = []

    def __repr__(self) -> str:
        return f"compat.MaildirMailbox({self.path!r})"

    def appendMessage(self, msg: bytes | Any) -> Any:
        """Add *msg* (bytes or a binary file) and return ``defer`` of the task doing it."""
        task = self.AppendFactory(self, msg)
        result = task.defer
        task.startUp()
        return result
