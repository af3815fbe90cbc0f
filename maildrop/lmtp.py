"""maildrop's LMTP/SMTP server: deliver mail received over the network into maildirs, durably.

:class:`MaildirServer` speaks LMTP (or SMTP) with maildrop's own streaming protocol engine:
each message goes from the socket into its maildirs as it arrives (memory per connection
is a small constant), and the reply comes once it is durable, under LMTP once per accepted
recipient (RFC 2033). It advertises PIPELINING, ENHANCEDSTATUSCODES, 8BITMIME, SMTPUTF8,
BINARYMIME, CHUNKING and the exact ``SIZE``.

:class:`MaildirHandler` maps recipients to maildirs (``<root>/<local-part>/``, refusing
unknown or invalid ones with ``550 5.1.1``), honours Maildir++ quotas and maps every
failure with :func:`maildrop.outcome`, so a full disk is ``452 4.3.1`` and a local problem
is never a permanent ``5xx``. It is also an aiosmtpd handler, for people who run aiosmtpd
themselves (``pip install '.[server]'`` from a checkout); aiosmtpd holds each message in memory.
"""

from __future__ import annotations

from ._lmtp_deliver import mailbox_name
from ._lmtp_handler import MaildirHandler
from ._lmtp_retry import RetryMemory
from ._lmtp_server import MaildirServer, parse_hostport

__all__ = ["MaildirHandler", "MaildirServer", "RetryMemory", "mailbox_name", "parse_hostport"]
