"""The pure LMTP/SMTP state machine: commands, replies and the DATA/BDAT byte streams."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from maildrop._wire import (
    MAX_LINE,
    NEED_DATA,
    Body,
    Conversation,
    DataEnd,
    Mail,
    Rcpt,
    Reply,
)
from maildrop._wire_data import find_dot_line
from maildrop._wire_parse import MAX_COMMAND

OK = "250 2.0.0 OK"
#: A reply line: a code, then an enhanced status code (RFC 2034), except where exempt.
ENHANCED = re.compile(rb"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3} ")


def run(
    conv: Conversation, data: bytes, chunks: list[int] | None = None, answer: str = OK
) -> tuple[bytes, bytes]:
    """Feed *data* (split at *chunks*), answer MAIL/RCPT with *answer* and every end with
    OK; return (replies, body)."""
    out, body = bytearray(), bytearray()
    pieces = _split(data, chunks or [])
    for piece in pieces:
        conv.receive(piece)
        while True:
            ev = conv.next_event()
            if ev is NEED_DATA:
                break
            if isinstance(ev, Reply):
                out += ev.data
            elif isinstance(ev, Body):
                body += ev.data
            elif isinstance(ev, DataEnd):
                n = conv.recipients if conv.lmtp and ev.last else 1
                out += conv.answer([OK] * n)
            else:
                assert isinstance(ev, Mail | Rcpt)
                out += conv.answer(answer)
    return bytes(out), bytes(body)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


def stuffed(message: bytes) -> bytes:
    """Return *message* (ending in CRLF, or empty) dot-stuffed and terminated for DATA."""
    wire = (b"\r\n" + message).replace(b"\r\n.", b"\r\n..")[2:]
    return wire + b".\r\n"


def conv(**kw: object) -> Conversation:
    """A conversation past LHLO with a sender and one recipient."""
    c = Conversation("mx.test", **kw)  # type: ignore[arg-type]
    run(c, b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\n" if c.lmtp else
        b"EHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\n")  # fmt: skip
    return c


PIECES = st.sampled_from(
    [b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n", b"\r\n.\r\n", b"x" * 999]
)


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(PIECES, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_data_round_trips_through_any_segmentation(parts: list[bytes], cuts: list[int]) -> None:
    """Dot-stuffed DATA split anywhere comes out as the message, and pipelining goes on."""
    message = b"".join(parts)
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    c = conv()
    replies, body = run(c, b"DATA\r\n" + stuffed(message) + b"NOOP\r\n", cuts)
    assert body == message
    assert replies == b"354 Start mail input; end with <CRLF>.<CRLF>\r\n" + b"250 2.0.0 OK\r\n" * 2
    assert not c.in_transaction


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(
        st.sampled_from([0, 1, 999, 1000, MAX_LINE - 1, MAX_LINE, MAX_LINE + 1, 3 * MAX_LINE]),
        min_size=1,
        max_size=5,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=300_000), max_size=6),
)
def test_long_lines_are_found_wherever_they_are_split(lengths: list[int], cuts: list[int]) -> None:
    """A line over MAX_LINE bytes is reported at the end of DATA, never one shorter."""
    message = b"".join(b"y" * n + b"\r\n" for n in lengths)
    c = conv()
    ends: list[DataEnd] = []
    c.receive(b"DATA\r\n")
    assert isinstance(c.next_event(), Reply)
    for piece in _split(stuffed(message), cuts):
        c.receive(piece)
        while (ev := c.next_event()) is not NEED_DATA:
            if isinstance(ev, DataEnd):
                ends.append(ev)
                c.answer([OK])
    assert [e.line_too_long for e in ends] == [max(lengths) > MAX_LINE]
    assert ends[0].size == len(message)


def test_bare_lf_dot_does_not_end_the_data() -> None:
    """Only CRLF.CRLF ends DATA: LF.LF and a bare CR stay in the message (no smuggling)."""
    c = conv()
    replies, body = run(c, b"DATA\r\nhi\n.\nMAIL FROM:<evil@x>\r\n\r.\r\n.\r\n")
    assert body == b"hi\n.\nMAIL FROM:<evil@x>\r\n\r.\r\n"
    assert replies.count(b"250") == 1


def test_pipelined_transaction_is_answered_in_order() -> None:
    """Many commands in one segment get their replies in order, each with a status code."""
    c = Conversation("mx.test", lmtp=True, max_size=1000)
    replies, body = run(
        c,
        b"LHLO c\r\nMAIL FROM:<s@x> SIZE=10 BODY=8BITMIME SMTPUTF8\r\nRCPT TO:<a@x>\r\n"
        b"RCPT TO:<b@x>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n",
    )
    lines = replies.split(b"\r\n")[:-1]
    assert lines[0] == b"250-mx.test"
    assert b"250 SIZE 1000" in lines
    assert {b"250-PIPELINING", b"250-ENHANCEDSTATUSCODES", b"250-8BITMIME", b"250-SMTPUTF8",
            b"250-CHUNKING", b"250-BINARYMIME"} <= set(lines)  # fmt: skip
    rest = lines[lines.index(b"250 SIZE 1000") + 1 :]
    assert [r[:3] for r in rest] == [b"250", b"250", b"250", b"354", b"250", b"250", b"221"]
    assert all(ENHANCED.match(r) for r in rest if not r.startswith(b"354"))
    assert body == b"hi\r\n"
    assert c.closed
    assert c.next_event() is NEED_DATA


@pytest.mark.parametrize(
    ("commands", "reply"),
    [
        (b"MAIL FROM:<s@x>\r\n", b"503 5.5.1 Say LHLO first"),
        (b"HELO c\r\n", b"500 5.5.1 HELO is not LMTP; say LHLO"),
        (b"LHLO\r\n", b"501 5.5.4 Syntax: LHLO hostname"),
        (b"LHLO c\r\nRCPT TO:<a@x>\r\n", b"503 5.5.1 Need MAIL before RCPT"),
        (b"LHLO c\r\nMAIL TO:<a@x>\r\n", b"501 5.5.4 Syntax: MAIL FROM:<address>"),
        (b"LHLO c\r\nMAIL FROM:s@x\r\n", b"501 5.5.4 Syntax: the address must be in"),
        (b"LHLO c\r\nMAIL FROM:<s@x\r\n", b"501 5.5.4 Syntax: missing >"),
        (b"LHLO c\r\nMAIL FROM:<s\x00@x>\r\n", b"501 5.1.3 Control characters"),
        (b"LHLO c\r\nMAIL FROM:<s@x> SIZE=1001\r\n", b"552 5.3.4 Message size exceeds"),
        (b"LHLO c\r\nMAIL FROM:<s@x> SIZE=big\r\n", b"501 5.5.4 Bad value for SIZE"),
        (b"LHLO c\r\nMAIL FROM:<s@x> BODY=9BIT\r\n", b"501 5.5.4 Bad value for BODY"),
        (b"LHLO c\r\nMAIL FROM:<s@x> RET=FULL\r\n", b"555 5.5.4 Unsupported MAIL parameter RET"),
        (
            b"LHLO c\r\nMAIL FROM:<s@x> \xc3\xa9=1\r\n",
            b"555 5.5.4 Unsupported MAIL parameter (non",
        ),
        (b"LHLO c\r\nMAIL FROM:<s@x>\r\nMAIL FROM:<s@x>\r\n", b"503 5.5.1 Nested MAIL"),
        (b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<>\r\n", b"501 5.1.3 Empty recipient"),
        (b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a\rb@x>\r\n", b"553 5.1.3 Control"),
        (b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a\xc2\x85@x>\r\n", b"553 5.1.3 Control"),
        (b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x> NOTIFY=NEVER\r\n", b"555 5.5.4 Unsupp"),
        (b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT FROM:<a@x>\r\n", b"501 5.5.4 Syntax: RCPT TO"),
        (b"LHLO c\r\nMAIL FROM:<s@x>\r\nDATA\r\n", b"503 5.5.1 Need RCPT before DATA"),
        (b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA x\r\n", b"501 5.5.4 DATA takes"),
        (b"LHLO c\r\nBDAT 1\r\nx", b"503 5.5.1 Need MAIL before BDAT"),  # after its chunk
        (b"BDAT 4\r\nNOOP", b"503 5.5.1 Say LHLO first"),  # the chunk is dropped, not run
        (b"LHLO c\r\nMAIL FROM:<s@x>\r\nBDAT 2\r\nxy", b"503 5.5.1 Need RCPT before"),
        (b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nBDAT x\r\n", b"501 5.5.4 Syntax: BDAT"),
        (b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nBDAT 1 NOW\r\n", b"501 5.5.4 Syntax"),
        (
            b"LHLO c\r\nMAIL FROM:<s@x> BODY=BINARYMIME\r\nRCPT TO:<a@x>\r\nDATA\r\n",
            b"503 5.5.1 BODY=BINARYMIME needs BDAT",
        ),
        (
            b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nBDAT 1\r\nxDATA\r\n",
            b"503 5.5.1 DATA after BDAT",
        ),
        (
            b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nBDAT 1\r\nxRCPT TO:<b@x>\r\n",
            b"503 5.5.1 RCPT after BDAT",
        ),
        (b"FOO\r\n", b"500 5.5.1 Command unrecognized"),
        (b"NOOP \xff\r\n", b"500 5.5.2 Command is not valid UTF-8"),
        (b"VRFY a\r\n", b"252 2.5.0"),
        (b"HELP\r\n", b"214 2.0.0"),
        (b"RSET\r\n", b"250 2.0.0 OK"),
        (b"X" * (MAX_COMMAND + 10) + b"\r\n", b"500 5.5.2 Line too long"),
    ],
)
def test_bad_commands_get_a_clear_reply(commands: bytes, reply: bytes) -> None:
    """Each refusal names the problem, with its enhanced status code."""
    c = Conversation("mx.test", max_size=1000)
    replies, _ = run(c, commands)
    last = replies.split(b"\r\n")[-2]
    assert last.startswith(reply), replies
    assert ENHANCED.match(last)


def test_command_line_too_long_across_segments_is_skipped() -> None:
    """An endless command line is dropped as it arrives and answered once it ends."""
    c = Conversation("mx.test")
    replies, _ = run(c, b"N" * (3 * MAX_COMMAND) + b"\r\nNOOP\r\n", [1000, 5000, 9000])
    assert replies == b"500 5.5.2 Line too long\r\n250 2.0.0 OK\r\n"
    assert c.buffered == 0


def test_smtp_speaks_ehlo_helo_and_folds_nothing() -> None:
    """SMTP: EHLO and HELO work, LHLO does not; one reply after the data."""
    c = Conversation("mx.test", lmtp=False)
    replies, _ = run(c, b"LHLO c\r\nHELO c\r\nEHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@x>\r\n"
                        b"RCPT TO:<b@x>\r\nDATA\r\nx\r\n.\r\n")  # fmt: skip
    assert replies.startswith(b"500 5.5.1 LHLO is not SMTP; say EHLO\r\n250 mx.test\r\n250-mx")
    assert replies.endswith(b"354 Start mail input; end with <CRLF>.<CRLF>\r\n250 2.0.0 OK\r\n")
    assert c.greeting() == b"220 mx.test maildrop SMTP ready\r\n"


def test_utf8_envelope_and_source_route() -> None:
    """UTF-8 addresses are accepted; a source route is dropped; quoted > stays."""
    c = Conversation("mx.test")
    c.receive("LHLO c\r\nMAIL FROM:<@relay,@r2:jörg@x> SMTPUTF8\r\n".encode())
    assert isinstance(c.next_event(), Reply)
    mail = c.next_event()
    assert mail == Mail("jörg@x", None, None, True)
    c.answer("250 2.1.0 OK")
    c.receive(b'RCPT TO:<"a>b"@x>\r\n')
    assert c.next_event() == Rcpt('"a>b"@x')


def test_refused_mail_and_rcpt_do_not_advance() -> None:
    """A non-2xx answer to MAIL or RCPT leaves the state as it was."""
    c = Conversation("mx.test")
    _replies, _ = run(c, b"LHLO c\r\n")
    c.receive(b"MAIL FROM:<s@x>\r\n")
    assert isinstance(c.next_event(), Mail)
    assert c.answer("421 4.3.2 Service shutting down") == b"421 4.3.2 Service shutting down\r\n"
    assert not c.in_transaction
    c.receive(b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA\r\n")
    assert isinstance(c.next_event(), Mail)
    c.answer("250 2.1.0 OK")
    assert isinstance(c.next_event(), Rcpt)
    c.answer("550 5.1.1 Mailbox unavailable")
    assert c.next_event() == Reply(b"503 5.5.1 Need RCPT before DATA\r\n")


def test_max_recipients() -> None:
    """RCPT beyond the limit gets 452 4.5.3."""
    c = Conversation("mx.test", max_recipients=2)
    replies, _ = run(c, b"LHLO c\r\nMAIL FROM:<s@x>\r\n" + b"RCPT TO:<a@x>\r\n" * 3)
    assert replies.endswith(b"250 2.0.0 OK\r\n452 4.5.3 Too many recipients\r\n")
    assert c.recipients == 2


def test_bdat_chunks_stream_raw_bytes() -> None:
    """BDAT bytes pass unstuffed and uninterpreted; each chunk is answered, LAST per rcpt."""
    c = conv()
    replies, body = run(c, b"BDAT 5\r\n.\r\n.\rBDAT 0\r\nBDAT 3 LAST\r\nabcNOOP\r\n", [9, 10, 14])
    assert body == b".\r\n.\rabc"
    assert replies == b"250 2.0.0 OK\r\n" * 4


def test_failed_bdat_chunk_ends_the_transaction() -> None:
    """A non-2xx answer to a chunk ends the transaction; later chunks are discarded."""
    c = conv()
    c.receive(b"BDAT 2\r\nab")
    assert c.next_event() == Body(b"ab")
    end = c.next_event()
    assert end == DataEnd(False, False, 2)
    assert c.answer("552 5.3.4 Message too big") == b"552 5.3.4 Message too big\r\n"
    assert not c.in_transaction
    replies, body = run(c, b"BDAT 2 LAST\r\ncd")
    assert (replies, body) == (b"503 5.5.1 Need MAIL before BDAT\r\n", b"")


def test_answer_misuse_raises() -> None:
    """answer() needs a pending event and the right number of replies."""
    c = conv()
    with pytest.raises(RuntimeError, match="no event waits"):
        c.answer(OK)
    c.receive(b"RCPT TO:<b@x>\r\n")
    ev = c.next_event()
    with pytest.raises(RuntimeError, match="answer Rcpt"):
        c.next_event()
    assert isinstance(ev, Rcpt)
    c.answer(OK)
    c.receive(b"DATA\r\n.\r\n")
    assert isinstance(c.next_event(), Reply)
    assert c.in_data
    assert isinstance(c.next_event(), DataEnd)
    with pytest.raises(RuntimeError, match="takes 2 replies, not 1"):
        c.answer([OK])


def test_idle_command_flood_is_capped() -> None:
    """More than 100 commands without a message close the session with 421."""
    c = Conversation("mx.test")
    replies, _ = run(c, b"NOOP\r\n" * 100 + b"NOOP\r\n")
    assert replies.endswith(b"250 2.0.0 OK\r\n421 4.7.0 Too many commands without mail\r\n")
    assert c.closed


def test_refused_recipient_flood_is_capped() -> None:
    """Refused RCPTs count as commands without a message; a delivered message resets."""
    c = conv()
    c.receive(b"DATA\r\n.\r\nMAIL FROM:<s@x>\r\n" + b"RCPT TO:<x@x>\r\n" * 101)
    out = bytearray()
    while (ev := c.next_event()) is not NEED_DATA:
        if isinstance(ev, Reply):
            out += ev.data
        elif isinstance(ev, DataEnd):
            out += c.answer([OK])
        else:
            out += c.answer(OK if isinstance(ev, Mail) else "550 5.1.1 Mailbox unavailable")
    assert out.count(b"550 5.1.1") == 100
    assert out.endswith(b"421 4.7.0 Too many commands without mail\r\n")
    replies, _ = run(Conversation("mx.test"), b"LHLO c\r\n" + b"RCPT TO:<x@x>\r\n" * 100)
    assert replies.endswith(b"503 5.5.1 Need MAIL before RCPT\r\n421 4.7.0 Too many commands "
                            b"without mail\r\n")  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    b"LHLO c", b"MAIL FROM:<s@x>", b"RCPT TO:<a@x>", b"DATA", b"x", b".", b"RSET", b"NOOP",
    b"BDAT 1", b"BDAT 0 LAST", b"QUIT", b"VRFY x", b"MAIL FROM:<a\x01b>", b"", b"\xff",
]), max_size=30))  # fmt: skip
def test_any_command_sequence_gets_well_formed_replies(lines: list[bytes]) -> None:
    """Whatever a client sends, every reply has a status code (and an enhanced code)."""
    c = Conversation("mx.test")
    replies, _ = run(c, b"".join(line + b"\r\n" for line in lines))
    for line in replies.split(b"\r\n")[:-1]:
        assert re.match(rb"^[2345]\d\d[ -]", line), line
        exempt = line.startswith((b"354", b"250-", b"250 mx.test", b"250 SIZE"))  # RFC 2034
        assert exempt or ENHANCED.match(line), line


class ConversationMachine(RuleBasedStateMachine):
    """A model of the transaction states against the core, one command at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = Conversation("mx.test", max_recipients=3)
        self.hello = self.mail = False
        self.rcpts = 0
        self.sent = 0  # commands since the last message (the 100-command cap)

    def send(self, line: bytes, answer: str = OK) -> bytes:
        """Send one command (answering what needs an answer); return the reply bytes."""
        replies, _ = run(self.conv, line + b"\r\n", answer=answer)
        self.sent += sum(not r.startswith(b"250-") for r in replies.split(b"\r\n")[:-1])
        return replies

    @precondition(lambda self: self.sent < 60)
    @rule()
    def lhlo(self) -> None:
        assert self.send(b"LHLO c").startswith(b"250-mx.test")
        self.hello, self.mail, self.rcpts = True, False, 0

    @precondition(lambda self: self.sent < 60)
    @rule(accept=st.booleans())
    def mail_from(self, accept: bool) -> None:
        got = self.send(b"MAIL FROM:<s@x>", OK if accept else "451 4.3.2 no")
        if not self.hello:
            assert got.startswith(b"503 5.5.1 Say LHLO")
        elif self.mail:
            assert got.startswith(b"503 5.5.1 Nested MAIL")
        else:
            assert got.startswith(b"250" if accept else b"451")
            self.mail = accept

    @precondition(lambda self: self.sent < 60)
    @rule(accept=st.booleans())
    def rcpt_to(self, accept: bool) -> None:
        got = self.send(b"RCPT TO:<a@x>", OK if accept else "550 5.1.1 no")
        if not self.hello or not self.mail:
            assert got.startswith(b"503 5.5.")
        elif self.rcpts >= 3:
            assert got.startswith(b"452 4.5.3")
        else:
            assert got.startswith(b"250" if accept else b"550")
            self.rcpts += accept

    @precondition(lambda self: self.sent < 60)
    @rule(body=st.binary(max_size=30))
    def data(self, body: bytes) -> None:
        message = body.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n"
        got = self.send(b"DATA\r\n" + stuffed(message)[:-2])
        if not (self.hello and self.mail and self.rcpts):
            assert got.startswith(b"503 5.5.1")
            return
        assert (
            got
            == b"354 Start mail input; end with <CRLF>.<CRLF>\r\n"
            + (OK.encode() + b"\r\n") * self.rcpts
        )
        self.mail, self.rcpts, self.sent = False, 0, 0

    @precondition(lambda self: self.sent < 60)
    @rule()
    def rset(self) -> None:
        assert self.send(b"RSET") == b"250 2.0.0 OK\r\n"
        self.mail, self.rcpts = False, 0

    @rule()
    def reconnect(self) -> None:
        assert self.send(b"QUIT") == b"221 2.0.0 mx.test closing connection\r\n"
        assert self.conv.closed
        self.conv = Conversation("mx.test", max_recipients=3)
        self.hello = self.mail = False
        self.rcpts = self.sent = 0

    @invariant()
    def core_agrees(self) -> None:
        assert self.conv.in_transaction == self.mail
        assert self.conv.recipients == self.rcpts
        assert not self.conv.in_data


TestConversationMachine = ConversationMachine.TestCase
TestConversationMachine.settings = settings(max_examples=100, deadline=None)


@given(st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n", b"\r\n."]), max_size=60))
def test_find_dot_line_is_find(parts: list[bytes]) -> None:
    """find_dot_line answers what buf.find(b"\\r\\n.") answers, however many dots come first."""
    buf = bytearray(b"".join(parts))
    assert find_dot_line(buf) == buf.find(b"\r\n.")


def test_find_dot_line_past_many_dots_inside_lines() -> None:
    """More dots inside lines than are looked at one by one: the dot line is still found,
    and a buffer without one answers -1."""
    lines = b"a.b.c.d.e.f.g.h.i.j.k\r\n" * 3
    assert find_dot_line(bytearray(lines + b"\r\n..x")) == len(lines)
    assert find_dot_line(bytearray(lines)) == -1
