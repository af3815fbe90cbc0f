"""The LMTP/SMTP protocol as a pure state machine: bytes in; events and reply bytes out.

No I/O, no clock, no asyncio (h11's shape). The driver feeds received bytes with
:meth:`Conversation.receive`, pulls events with :meth:`Conversation.next_event` and answers
the events that need a decision (:class:`Mail`, :class:`Rcpt`, :class:`DataEnd`) with
:meth:`Conversation.answer`, which returns the bytes to send and moves the state on. Every
other reply is the core's own (:class:`Reply`). Events come out in command order, so
pipelined commands are answered in order.

The message body comes out as :class:`Body` chunks of whole received buffers, never line by
line (``_wire_data``). Memory is bounded by what the driver lets in before it reads the
events (it pauses reading).
"""

from __future__ import annotations

from ._wire_data import MAX_LINE, DotReader
from ._wire_events import NEED_DATA, Body, DataEnd, Event, Mail, Rcpt, Reply, _NeedData
from ._wire_parse import (
    MAX_COMMAND,
    CommandError,
    check_address,
    parse_mail_params,
    parse_path,
    parse_rcpt_params,
    split_keyword,
)

__all__ = [
    "MAX_LINE",
    "NEED_DATA",
    "Body",
    "Conversation",
    "DataEnd",
    "Mail",
    "Rcpt",
    "Reply",
]

#: Commands (NOOP, RSET, VRFY, HELO..., refused MAIL/RCPT) allowed between two messages.
MAX_IDLE_COMMANDS = 100


def _line(text: str) -> bytes:
    return text.encode("utf-8") + b"\r\n"


class Conversation:
    """One connection's protocol state, server side.

    Args:
        hostname: this server's name (greeting and hello replies).
        lmtp: speak LMTP (``LHLO``, one reply per recipient after the data) or SMTP.
        max_size: the ``SIZE`` to advertise and enforce at ``MAIL`` (``None``: no limit).
        max_recipients: more ``RCPT`` in one transaction get ``452 4.5.3``.
    """

    def __init__(
        self,
        hostname: str,
        *,
        lmtp: bool = True,
        max_size: int | None = None,
        max_recipients: int = 1000,
    ) -> None:
        self.hostname = hostname
        self.lmtp = lmtp
        self.proto = "LMTP" if lmtp else "SMTP"
        self.max_size = max_size
        self.max_recipients = max_recipients
        self._buf = bytearray()
        self._mode = "command"  # command | data | bdat | skip (an over-long command line)
        self.in_data = False
        """Whether message bytes are being received (DATA or BDAT): an attribute, not a
        property, since the driver asks for every buffer (kept by :meth:`_enter`)."""
        self._hello = False
        self._mail: Mail | None = None
        self.recipients = 0
        """Recipients accepted in the current transaction."""
        self._chunked = False  # this transaction's body came with BDAT
        self._waiting: Event | None = None
        self._pending_end = False  # the end of DATA came with the last Body
        self._dots = DotReader()
        self._size = 0  # BDAT
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_refused: bytes | None = None  # the reply for a chunk being discarded
        self._idle_commands = 0
        self.closed = False

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._buf)

    @property
    def line_too_long(self) -> bool:
        """Whether the message being received has a line over :data:`MAX_LINE` bytes (only
        DATA limits lines: BDAT carries the message as is)."""
        return self._dots.too_long and not self._chunked

    @property
    def in_transaction(self) -> bool:
        """Whether ``MAIL`` was accepted and the transaction has not ended."""
        return self._mail is not None

    def _enter(self, mode: str) -> None:
        self._mode = mode
        self.in_data = mode in ("data", "bdat")

    def greeting(self) -> bytes:
        """Return the ``220`` greeting."""
        return _line(f"220 {self.hostname} maildrop {self.proto} ready")

    def receive(self, data: bytes | memoryview) -> None:
        """Add received bytes (``b""`` is not special: closing is the driver's business)."""
        self._buf += data

    # -- events ---------------------------------------------------------------------------

    def next_event(self) -> Event | _NeedData:
        """Return the next event, or :data:`NEED_DATA`.

        Raises:
            RuntimeError: the previous event still waits for :meth:`answer`.
        """
        if self._waiting is not None:
            raise RuntimeError(f"answer {self._waiting!r} before asking for the next event")
        if self.closed:
            return NEED_DATA
        if self._pending_end:
            self._pending_end = False
            return self._end(last=True)
        if self._mode == "data":
            return self._data_event()
        if self._mode == "bdat":
            return self._bdat_event()
        if not self._buf:  # (the driver asks again after every answered command)
            return NEED_DATA
        return self._command_event()

    def _command_event(self) -> Event | _NeedData:
        buf = self._buf
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > MAX_COMMAND:
                del buf[:]
                self._enter("skip")
            return NEED_DATA
        raw = bytes(buf[:nl]).removesuffix(b"\r")
        del buf[: nl + 1]
        if self._mode == "skip":
            self._enter("command")
            return self._reply("500 5.5.2 Line too long")
        if len(raw) > MAX_COMMAND:
            return self._reply("500 5.5.2 Line too long")
        try:
            return self._command(raw)
        except CommandError as exc:
            self._idle_commands += 1
            return self._reply(str(exc))

    def _reply(self, text: str, *, close: bool = False) -> Reply:
        if close:
            self.closed = True
        return Reply(_line(text), close)

    def _command(self, raw: bytes) -> Event | _NeedData:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError("500 5.5.2 Command is not valid UTF-8") from None
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if verb != "QUIT" and self._idle_commands >= MAX_IDLE_COMMANDS:
            return self._reply("421 4.7.0 Too many commands without mail", close=True)
        if verb in ("MAIL", "RCPT", "DATA", "BDAT"):
            return self._transaction_command(verb, arg)
        if verb != "QUIT":
            self._idle_commands += 1
        if verb in ("LHLO", "EHLO", "HELO"):
            return self._hello_command(verb, arg.strip())
        if verb == "NOOP":
            return self._reply("250 2.0.0 OK")
        if verb == "RSET":
            self._reset()
            return self._reply("250 2.0.0 OK")
        if verb == "QUIT":
            return self._reply(f"221 2.0.0 {self.hostname} closing connection", close=True)
        if verb == "VRFY":
            return self._reply("252 2.5.0 Cannot VRFY user, but will accept message")
        if verb == "HELP":
            return self._reply("214 2.0.0 See RFC 5321 and RFC 2033")
        raise CommandError("500 5.5.1 Command unrecognized")

    def _hello_command(self, verb: str, name: str) -> Reply:
        if (verb == "LHLO") != self.lmtp:
            raise CommandError(f"500 5.5.1 {verb} is not {self.proto}; say "
                               f"{'LHLO' if self.lmtp else 'EHLO'}")  # fmt: skip
        if not name or not name.isprintable():
            raise CommandError(f"501 5.5.4 Syntax: {verb} hostname")
        self._reset()
        self._hello = True
        if verb == "HELO":
            return self._reply(f"250 {self.hostname}")
        caps = [self.hostname, "PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8",
                "BINARYMIME", "CHUNKING"]  # fmt: skip
        caps.append("SIZE" if self.max_size is None else f"SIZE {self.max_size}")
        lines = [f"250-{c}" for c in caps[:-1]] + [f"250 {caps[-1]}"]
        return Reply(b"".join(_line(x) for x in lines))

    def _transaction_command(self, verb: str, arg: str) -> Event | _NeedData:
        if verb == "BDAT":  # a refused chunk is still read and dropped (RFC 3030), never run
            return self._bdat_command(arg)
        if not self._hello:
            raise CommandError(f"503 5.5.1 Say {'LHLO' if self.lmtp else 'EHLO'} first")
        if verb == "MAIL":
            if self._mail is not None:
                raise CommandError("503 5.5.1 Nested MAIL command")
            rest = split_keyword(arg, "FROM:")
            sender, params = parse_path(rest, allow_empty=True)
            check_address(sender, "501")
            size, body, utf8 = parse_mail_params(params)
            if size is not None and self.max_size is not None and size > self.max_size:
                raise CommandError("552 5.3.4 Message size exceeds fixed maximum message size")
            self._waiting = Mail(sender, size, body, utf8)
            return self._waiting
        if self._mail is None:
            raise CommandError("503 5.5.1 Need MAIL before " + verb)
        if verb == "RCPT":
            if self._chunked:
                raise CommandError("503 5.5.1 RCPT after BDAT")
            rest = split_keyword(arg, "TO:")
            address, params = parse_path(rest, allow_empty=False)
            check_address(address, "553")
            parse_rcpt_params(params)
            if self.recipients >= self.max_recipients:
                raise CommandError("452 4.5.3 Too many recipients")
            self._waiting = Rcpt(address)
            return self._waiting
        return self._data_command(arg)

    def _data_command(self, arg: str) -> Event:
        if arg.strip():
            raise CommandError("501 5.5.4 DATA takes no arguments")
        if not self.recipients:
            raise CommandError("503 5.5.1 Need RCPT before DATA")
        if self._chunked:
            raise CommandError("503 5.5.1 DATA after BDAT")
        assert self._mail is not None
        if self._mail.body == "BINARYMIME":
            raise CommandError("503 5.5.1 BODY=BINARYMIME needs BDAT")
        self._enter("data")
        self._dots.start(self._buf)
        return self._reply("354 Start mail input; end with <CRLF>.<CRLF>")

    def _bdat_command(self, arg: str) -> Event | _NeedData:
        parts = arg.split()
        if (
            not 1 <= len(parts) <= 2
            or not parts[0].isascii()
            or not parts[0].isdigit()
            or (len(parts) == 2 and parts[1].upper() != "LAST")
        ):
            raise CommandError("501 5.5.4 Syntax: BDAT size [LAST]")
        self._enter("bdat")
        self._bdat_left = int(parts[0])
        self._bdat_last = len(parts) == 2
        self._bdat_refused = None
        if not self._hello:
            self._bdat_refused = _line(f"503 5.5.1 Say {'LHLO' if self.lmtp else 'EHLO'} first")
        elif self._mail is None:
            self._bdat_refused = _line("503 5.5.1 Need MAIL before BDAT")
        elif not self.recipients:
            self._bdat_refused = _line("503 5.5.1 Need RCPT before BDAT")
        elif not self._chunked:
            self._chunked = True
            self._size = 0
        return self._bdat_event()

    def _data_event(self) -> Event | _NeedData:
        body, ended = self._dots.read(self._buf)
        if ended:
            self._enter("command")
            if not body:
                return self._end(last=True)
            self._pending_end = True
        return NEED_DATA if body is None else Body(body)

    def _bdat_event(self) -> Event | _NeedData:
        if self._bdat_left:
            if not self._buf:
                return NEED_DATA
            n = min(self._bdat_left, len(self._buf))
            data = bytes(self._buf[:n])
            del self._buf[:n]
            self._bdat_left -= n
            if self._bdat_refused is None:
                self._size += n
                return Body(data)
            if self._bdat_left:
                return NEED_DATA
        self._enter("command")
        if self._bdat_refused is not None:
            return Reply(self._bdat_refused)
        return self._end(last=self._bdat_last)

    def _end(self, *, last: bool) -> DataEnd:
        if self._chunked:
            self._waiting = DataEnd(last, False, self._size)
        else:
            self._waiting = DataEnd(last, self._dots.too_long, self._dots.size)
        return self._waiting

    # -- answers --------------------------------------------------------------------------

    def answer(self, reply: str | list[str]) -> bytes:
        """Answer the pending event; return the bytes to send.

        *reply* is one reply line, or after the last data of an LMTP transaction one per
        accepted recipient. A ``2xx`` answer to ``MAIL``/``RCPT`` takes the step; after
        the message (or a failed chunk) the transaction ends.

        Raises:
            RuntimeError: no event waits for an answer, or the number of replies is wrong.
        """
        ev = self._waiting
        if ev is None:
            raise RuntimeError("no event waits for an answer")
        replies = [reply] if isinstance(reply, str) else list(reply)
        lmtp_end = isinstance(ev, DataEnd) and ev.last and self.lmtp
        want = self.recipients if lmtp_end else 1
        if len(replies) != want:
            raise RuntimeError(f"{ev!r} takes {want} replies, not {len(replies)}")
        self._waiting = None
        ok = replies[0].startswith("2")
        if not ok and isinstance(ev, Mail | Rcpt):
            self._idle_commands += 1  # a flood of refused recipients is no message either
        if isinstance(ev, Mail) and ok:
            self._mail = ev
        elif isinstance(ev, Rcpt) and ok:
            self.recipients += 1
        elif isinstance(ev, DataEnd) and (ev.last or not ok):
            self._reset()
            self._idle_commands = 0
        if len(replies) == 1:
            return _line(replies[0])
        return b"".join([_line(r) for r in replies])

    def _reset(self) -> None:
        self._mail = None
        self.recipients = 0
        self._chunked = False
        self._dots.too_long = False  # a refused DATA's long line is not the next message's
