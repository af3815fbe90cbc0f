"""maildrop: durable, streaming Maildir delivery for asyncio (and trio), via anyio."""

from ._errors import (
    InvalidFolderNameError,
    MaildirNotFoundError,
    MaildropError,
    MessageTooLargeError,
    Outcome,
    QuotaExceededError,
    outcome,
)
from ._maildir import Maildir, deliver
from ._many import deliver_many
from ._quota import Quota
from ._session import Delivery, DeliverySession
from ._sources import Source
from ._sys import DEFAULT_SYSCALLS, Syscalls

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SYSCALLS",
    "Delivery",
    "DeliverySession",
    "InvalidFolderNameError",
    "Maildir",
    "MaildirNotFoundError",
    "MaildropError",
    "MessageTooLargeError",
    "Outcome",
    "Quota",
    "QuotaExceededError",
    "Source",
    "Syscalls",
    "deliver",
    "deliver_many",
    "outcome",
]
