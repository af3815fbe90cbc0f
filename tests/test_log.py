"""The servers' log handler: whole lines, one write per event-loop turn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maildrop._log import (
    _PIPE_BUF,
    LineFormatter,
    LineHandler,
    _pieces,
    flush_all,
    info,
    install_direct,
)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


def logger_to(handler: logging.Handler) -> logging.Logger:
    lg = logging.getLogger(f"maildrop.test_log.{id(handler)}")
    lg.propagate = False
    lg.setLevel(logging.INFO)
    lg.addHandler(handler)
    return lg


def readable(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""
    finally:
        os.set_blocking(fd, True)


def test_lines_of_one_loop_turn_are_written_at_its_end(pipe: tuple[int, int]) -> None:
    """Nothing is written while the turn runs; all its lines are there after it."""
    r, w = pipe
    log = logger_to(LineHandler(w))

    async def main() -> tuple[bytes, bytes]:
        log.info("one")
        log.info("two %d", 2)
        during = readable(r)
        await asyncio.sleep(0)
        return during, readable(r)

    during, after = asyncio.run(main())
    assert during == b""
    assert after == b"one\ntwo 2\n"


def test_without_a_loop_a_line_is_written_at_once(pipe: tuple[int, int]) -> None:
    """Outside an event loop (or in another thread) each line goes out when logged."""
    r, w = pipe
    log = logger_to(LineHandler(w))
    log.info("now")
    assert readable(r) == b"now\n"
    t = threading.Thread(target=log.warning, args=("from a thread",))
    t.start()
    t.join()
    assert readable(r) == b"from a thread\n"


def test_close_writes_what_is_left(pipe: tuple[int, int]) -> None:
    """Closing the handler (the server's log undo) writes the last turn's lines."""
    r, w = pipe
    handler = LineHandler(w)
    log = logger_to(handler)

    async def main() -> None:
        log.info("last words")
        handler.close()

    asyncio.run(main())
    assert readable(r) == b"last words\n"


def test_a_broken_record_is_reported_not_raised(
    pipe: tuple[int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    """A record that cannot be formatted goes to logging's handleError; nothing is written."""
    r, w = pipe
    log = logger_to(LineHandler(w))
    log.info("%d", "not a number")
    assert readable(r) == b""
    assert "TypeError" in capsys.readouterr().err


def test_a_closed_reader_drops_the_lines(pipe: tuple[int, int]) -> None:
    """EPIPE (nobody reads the log any more) drops the lines instead of failing a delivery."""
    r, w = pipe
    os.close(r)
    log = logger_to(LineHandler(w))
    log.info("into the void")  # no exception


def test_a_full_non_blocking_log_waits_for_room(pipe: tuple[int, int]) -> None:
    """An inherited non-blocking stderr that is full is waited on, never dropped."""
    r, w = pipe
    os.set_blocking(w, False)
    filler = b"x" * 65536
    while True:
        try:
            os.write(w, filler)
        except BlockingIOError:
            break
    got = bytearray()

    def drain() -> None:
        while not got.endswith(b"after the wait\n"):
            got.extend(os.read(r, 65536))

    t = threading.Thread(target=drain)
    t.start()
    logger_to(LineHandler(w)).info("after the wait")
    t.join(10)
    assert got.endswith(b"x" + b"after the wait\n")


@given(st.lists(st.binary(max_size=5000).map(lambda b: b.replace(b"\n", b"") + b"\n")))
def test_pieces_keep_lines_whole_and_small(lines: list[bytes]) -> None:
    """Pieces are whole lines in order; only a single line may pass PIPE_BUF."""
    pieces = _pieces(lines)
    assert b"".join(pieces) == b"".join(lines)
    for piece in pieces:
        assert piece.endswith(b"\n")
        assert len(piece) <= _PIPE_BUF or piece.count(b"\n") == 1


def records() -> list[logging.LogRecord]:
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("maildrop.lmtp", 40, "", 0, "failed %s", ("x",), sys.exc_info())
    stacked = logging.LogRecord("maildrop", 30, "", 0, "hm", (), None, sinfo="Stack (x)")
    plain = logging.LogRecord("maildrop.lmtp", 20, "", 0, "delivered to=<%s> %d%%", ("a", 5), None)
    return [plain, failed, stacked]


@pytest.mark.parametrize("record", records(), ids=["plain", "exception", "stack"])
def test_line_formatter_says_what_the_format_string_says(record: logging.LogRecord) -> None:
    """LineFormatter's line is the %-format's, exception and stack included; a % in the
    host name is just a character."""
    host = "mx%1"
    ref = logging.Formatter(
        f"%(asctime)s {host.replace('%', '%%')} %(name)s[%(process)d]: %(message)s"
    )
    fast = LineFormatter(host)
    assert fast.format(record) == ref.format(record)
    record.created += 1  # the next second: the date is made again
    record.msecs = 7.9
    assert fast.format(record) == ref.format(record)


def test_a_flush_lost_with_its_loop_is_made_up_on_the_next(pipe: tuple[int, int]) -> None:
    """Lines of a loop that stopped before its queued flush ran go out with the next loop's
    first line, and flush_all() writes what is held before os._exit."""
    r, w = pipe
    handler = LineHandler(w)
    log = logger_to(handler)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(asyncio.sleep(0))
    loop.call_soon(log.info, "last turn")
    loop.call_soon(loop.stop)
    loop.run_forever()  # stops before the flush queued by "last turn" runs
    loop.close()
    assert readable(r) == b""

    async def main() -> None:
        log.info("next loop")
        await asyncio.sleep(0)

    asyncio.run(main())
    assert readable(r) == b"last turn\nnext loop\n"
    logging.getLogger("maildrop").addHandler(handler)
    try:
        handler._lines.append(b"held\n")
        flush_all()
    finally:
        logging.getLogger("maildrop").removeHandler(handler)
    assert readable(r) == b"held\n"


def test_info_without_a_direct_handler_goes_through_logging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With no handler installed, info() is logger.info(): a record, with its arguments."""
    lg = logging.getLogger("maildrop.test_log.plain")
    with caplog.at_level(logging.INFO, logger="maildrop.test_log.plain"):
        info(lg, "delivered to=<%s> size=%d", "a@x", 5)
    assert [(r.getMessage(), r.args) for r in caplog.records] == [
        ("delivered to=<a@x> size=5", ("a@x", 5))
    ]


def test_info_writes_the_line_a_record_would_make(
    pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The direct line equals the formatted record's (time, host, name, pid), and a logger
    below INFO's level writes nothing."""
    r, w = pipe
    handler = LineHandler(w)
    handler.setFormatter(LineFormatter("mx"))
    log = logger_to(handler)
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.25)
    install_direct(handler)
    try:
        info(log, "delivered to=<%s> size=%d", "a@x", 5)
        log.setLevel(logging.WARNING)
        info(log, "not %s", "this")
    finally:
        install_direct(None)
    record = logging.LogRecord(log.name, 20, "", 0, "delivered to=<%s> size=%d", ("a@x", 5), None)
    assert readable(r) == (LineFormatter("mx").format(record) + "\n").encode()


def test_a_direct_handler_with_another_formatter_makes_a_record(pipe: tuple[int, int]) -> None:
    """A handler whose formatter is not a LineFormatter still gets its own format."""
    r, w = pipe
    handler = LineHandler(w)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logger_to(handler)
    install_direct(handler)
    try:
        info(log, "hello %s", "you")
    finally:
        install_direct(None)
    assert readable(r) == b"INFO hello you\n"
