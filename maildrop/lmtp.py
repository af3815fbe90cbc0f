"""Deliver mail received by aiosmtpd's LMTP or SMTP server into maildirs, durably.

:class:`MaildirHandler` is an aiosmtpd handler: it resolves each ``RCPT TO`` to a maildir
(``<root>/<local-part>/`` by default, refusing unknown or invalid recipients with
``550 5.1.1``), delivers the message with ``await`` once ``DATA`` ends and replies only after
the delivery is durable. Under LMTP it answers once per accepted recipient (RFC 2033), which
aiosmtpd itself does not do. Every failure is mapped by :func:`maildrop.outcome`, so a full
disk is ``452 4.3.1`` and a local problem is never a permanent ``500``.

:class:`MaildirServer` runs the handler on TCP or Unix sockets with :class:`LMTP` /
:class:`SMTP`, aiosmtpd's classes plus two fixes: aiosmtpd's own errors after ``DATA`` (too
much data, line too long) get one reply per recipient under LMTP, and :meth:`MaildirServer.
shutdown` finishes the deliveries in flight before it closes connections.

Needs the ``server`` extra: ``pip install 'maildrop[server]'``.
"""

from __future__ import annotations

from ._lmtp_handler import MaildirHandler, mailbox_name
from ._lmtp_server import LMTP, SMTP, MaildirServer, parse_hostport

__all__ = ["LMTP", "SMTP", "MaildirHandler", "MaildirServer", "mailbox_name", "parse_hostport"]
