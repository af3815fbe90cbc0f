"""compat: Twisted's maildir append task (IConsumer + Deferred), backed by maildrop.

``MaildirMailboxAppendMessageTask`` is a drop-in for
``twisted.mail.maildir._MaildirMailboxAppendMessageTask`` that delivers durably and never
blocks the reactor. It runs on asyncio: under Twisted, install
``twisted.internet.asyncioreactor``; without Twisted, use it from asyncio code, where its
``defer`` is a :class:`Deferred` of this package. Either way asyncio code waits for it with
``await compat.as_future(d)``. Importing ``compat`` never imports or
installs a Twisted reactor.
"""

from ._deferred import AlreadyCalledError, Deferred, Failure, as_future
from ._mailbox import MaildirMailbox
from ._task import DeliveryAborted, MaildirMailboxAppendMessageTask
from ._twisted import HAVE_TWISTED, IConsumer

__all__ = [
    "HAVE_TWISTED",
    "AlreadyCalledError",
    "Deferred",
    "DeliveryAborted",
    "Failure",
    "IConsumer",
    "MaildirMailbox",
    "MaildirMailboxAppendMessageTask",
    "as_future",
]
