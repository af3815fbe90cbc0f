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

__all__ = ["LineHandler"]

_PIPE_BUF = getattr(select, "PIPE_BUF", 4096)


class LineHandler(logging.Handler):
    """Write each formatted record as one line to *fd*, batched per event-loop turn."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self._lines: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop a flush is queued on

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:  # logging's rule: a broken record never breaks the caller
            self.handleError(record)
            return
        self._lines.append(line)
        if self._loop is not None:
            return  # a flush is queued already
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
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
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        except BlockingIOError:
            # A non-blocking stderr (inherited): wait until it takes more.
            select.select([], [fd], [])
            continue
        except OSError:
            return  # the log cannot be written (EPIPE: nobody reads it): drop the lines
        view = view[n:]
