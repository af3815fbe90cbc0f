"""The servers' log handler: whole lines to a file descriptor, one write per loop turn.

A server logs a line per delivery. Written one by one (``logging.StreamHandler`` on a
line-buffered ``sys.stderr``), each line is a ``write`` syscall on the event loop's thread,
which gives up the GIL to the delivery workers and waits to get it back. This handler
gathers the lines of one event-loop turn and writes them at its end, in pieces that end at
a line end and, where lines allow, fit in ``PIPE_BUF`` (so several worker processes sharing
one pipe never interleave inside a line). Off the loop's thread (or without a loop) a line
is written at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import time

__all__ = ["LineFormatter", "LineHandler", "flush_all", "info", "install_direct"]

_PIPE_BUF = getattr(select, "PIPE_BUF", 4096)

#: The server's own handler (``maildrop lmtp``/``smtp`` install it, see :func:`install_direct`):
#: :func:`info` hands it lines without making a ``logging.LogRecord``.
_direct: LineHandler | None = None


def install_direct(handler: LineHandler | None) -> None:
    """Make *handler* the one :func:`info` writes to straight (None: go through logging).

    Only for a handler whose loggers have no filters and no other handlers: the command
    line server's, which owns its process's logging configuration.
    """
    global _direct
    _direct = handler


def info(logger: logging.Logger, msg: str, *args: object) -> None:
    """Log ``msg % args`` at INFO on *logger*: the same line as ``logger.info`` would write.

    With a handler installed by :func:`install_direct`, the line goes to it without a
    ``LogRecord`` (a server logs a line per delivery); otherwise through ``logging``.
    """
    handler = _direct
    if handler is None:
        logger.info(msg, *args)
    elif logger.isEnabledFor(logging.INFO):
        handler.line(logger.name, msg % args)


class LineHandler(logging.Handler):
    """Write each formatted record as one line to *fd*, batched per event-loop turn."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self._lines: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop a flush is queued on

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # logging's rule: a broken record never breaks the caller
            self.handleError(record)
            return
        self._add(line)

    def line(self, name: str, message: str) -> None:
        """Write *message* from the logger *name*, as a record of it would be written."""
        fmt = self.formatter
        if not isinstance(fmt, LineFormatter):
            logging.getLogger(name).info("%s", message)  # any other format needs a record
            return
        now = time.time()
        msecs = int((now - int(now)) * 1000)  # what logging.LogRecord.msecs holds
        with self.lock:  # type: ignore[union-attr] # as in flush
            self._add(fmt.text(now, msecs, name, os.getpid(), message))

    def _add(self, line: str) -> None:
        self._lines.append((line + "\n").encode("utf-8", "backslashreplace"))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._loop is not loop:  # none queued, or on a loop that ended before it ran
            self._loop = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the lines gathered so far."""
        with self.lock:  # type: ignore[union-attr] # Handler.__init__ made it (an RLock)
            self._loop = None
            lines, self._lines = self._lines, []
        for piece in _pieces(lines):
            _write_all(self.fd, piece)

    def close(self) -> None:
        self.flush()
        super().close()


def flush_all() -> None:
    """Write every line a :class:`LineHandler` of maildrop's loggers still holds (before
    ``os._exit``, which skips the event loop's last turns and logging's shutdown)."""
    for name in ("maildrop", "asyncio"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, LineHandler):
                handler.flush()


def _pieces(lines: list[bytes]) -> list[bytes]:
    """Join *lines* into pieces of whole lines of at most PIPE_BUF bytes (a longer line is a
    piece of its own)."""
    out: list[bytes] = []
    piece: list[bytes] = []
    size = 0
    for line in lines:
        if piece and size + len(line) > _PIPE_BUF:
            out.append(b"".join(piece))
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if piece:
        out.append(b"".join(piece))
    return out


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            # A non-blocking stderr (inherited): wait until it takes more.
            select.select([], [fd], [])
            continue
        except OSError:
            return  # the log cannot be written (EPIPE: nobody reads it): drop the lines
        view = view[n:]


class LineFormatter(logging.Formatter):
    """``time host name[pid]: message``, syslog's shape, made cheaply.

    The same text as ``logging.Formatter("%(asctime)s HOST %(name)s[%(process)d]:
    %(message)s")``, but the date is formatted once per second, not per line, and the line
    is put together directly (a server logs a line per delivery).
    """

    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        line = self.text(
            record.created, int(record.msecs), record.name, record.process, record.message
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line

    def text(self, created: float, msecs: int, name: str, pid: int | None, message: str) -> str:
        """Return the line for *message* logged at *created* (and its *msecs*) by *name* in
        process *pid*."""
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._second = second
        return f"{self._stamp},{msecs:03d} {self.host} {name}[{pid}]: {message}"
