"""A Twisted ESMTP server that delivers through the compat task; run by test_smtp.py.

Usage: ``python _smtp_server.py MAILDIR``. Prints ``{"port": N}``, serves on 127.0.0.1
until SIGTERM, then prints one JSON line with what happened to each message. Each received
line is written into the task as it arrives (the transport is its push producer), and the
reply is sent when the task's Deferred fires: 250 on success, maildrop's temporary reply on
a disk error (Twisted's stock server answers 550 to any IMessage failure, which would bounce
mail for a full disk). Recipient ``eio@`` gets a failing file fsync, ``enospc@`` a failing
``oswrite`` hook.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any

from twisted.internet import asyncioreactor

asyncioreactor.install()

from twisted.internet import reactor  # noqa: E402 - after the reactor, on purpose
from twisted.mail import smtp  # noqa: E402
from zope.interface import implementer  # noqa: E402

import compat  # noqa: E402
import maildrop  # noqa: E402

MAILDIR = sys.argv[1]
records: list[dict[str, Any]] = []


def failing_fsync(fd: int) -> None:
    raise OSError(errno.EIO, "injected EIO in fsync")


class EIOTask(compat.MaildirMailboxAppendMessageTask):
    syscalls = maildrop.DEFAULT_SYSCALLS.replace(fsync=failing_fsync)


class ENOSPCTask(compat.MaildirMailboxAppendMessageTask):
    def oswrite(self, fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "injected ENOSPC in oswrite")


TASKS = {b"eio": EIOTask, b"enospc": ENOSPCTask}


@implementer(smtp.IMessage)
class StreamingMessage:
    """Streams each received line into a compat task; eomReceived returns its Deferred."""

    def __init__(self, proto: Server, local: bytes) -> None:
        self.mbox = compat.MaildirMailbox(MAILDIR)
        self.task = TASKS.get(local, compat.MaildirMailboxAppendMessageTask)(self.mbox, b"")
        self.task.createTempFile()
        # The transport is the push producer: paused above the task's high-water mark.
        self.task.registerProducer(proto.transport, True)
        self.lines = 0
        self.fired = False
        self.task.defer.addBoth(self._fired)
        proto.messages.append(self)

    def _fired(self, result: Any) -> Any:
        self.fired = True
        return result

    def lineReceived(self, line: bytes) -> None:
        self.lines += 1
        self.task.write(line + b"\n")

    def eomReceived(self) -> Any:
        self.task.unregisterProducer()
        return self.task.defer

    def connectionLost(self) -> None:
        self.task.stopProducing()


@implementer(smtp.IMessageDelivery)
class Delivery:
    def __init__(self, proto: Server) -> None:
        self.proto = proto

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Any:
        return lambda: StreamingMessage(self.proto, user.dest.local)


class Server(smtp.ESMTP):
    def connectionMade(self) -> None:
        self.messages: list[StreamingMessage] = []
        self.delivery = Delivery(self)
        super().connectionMade()

    def _messageHandled(self, resultList: Any) -> None:
        msgs, self.messages = self.messages, []
        failures = [r for ok, r in resultList if not ok]
        for m in msgs:
            rec: dict[str, Any] = {"fired": m.fired, "lines": m.lines}
            if m.mbox.list:
                path = m.mbox.list[-1]
                rec["path"] = os.fsdecode(path)
                rec["in_new_at_reply"] = os.path.exists(path)
            records.append(rec)
        if failures:
            out = maildrop.outcome(failures[0].value)
            records[-1]["error"] = repr(failures[0].value)
            records[-1]["reply"] = out.reply
            self.sendCode(out.smtp_code, f"{out.enhanced} {out.text}".encode())
        else:
            super()._messageHandled(resultList)


factory = smtp.SMTPFactory()
factory.protocol = Server
factory.domain = b"localhost"
port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
print(json.dumps({"port": port.getHost().port}), flush=True)
reactor.run()  # type: ignore[attr-defined]
print(json.dumps(records), flush=True)
