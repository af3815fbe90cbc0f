"""The DATA byte stream of :mod:`maildrop._wire`: find its end, undo the dot-stuffing, and
measure its lines, in whole buffers.

The end of ``DATA`` is found with ``bytes.find(b"\\r\\n.\\r\\n")`` and the dot-stuffing is
undone with one ``replace(b"\\r\\n.", b"\\r\\n")`` per buffer (after one scan for a line that
starts with a dot: most buffers have none). Only CRLF ends a line: a bare CR or LF is data,
so ``\\n.\\n`` cannot end a message (no SMTP smuggling). A tail that may be the start of
``\\r\\n.\\r\\n`` (at most four bytes) is held back until the next bytes arrive. Lines are
measured, never collected.
"""

from __future__ import annotations

__all__ = ["MAX_LINE", "DotReader", "find_dot_line"]

#: The longest DATA line (on the wire, without its CRLF) that a message may have.
MAX_LINE = 65536
_END = b"\r\n.\r\n"
_TAILS = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")


#: Dots looked at one by one before the search for a dot line goes byte by byte.
_DOT_TRIES = 8


def find_dot_line(buf: bytearray) -> int:
    """Return ``buf.find(b"\\r\\n.")``, found faster where few dots start no line.

    A search for one byte runs at memchr's speed; a search for three bytes in mail, where
    CRLF comes every line, is many times slower. So the first few dots are looked at
    one by one, and only a buffer with more dots than that inside lines is searched the
    slow way (from the last dot looked at).
    """
    pos = buf.find(b".", 2)
    for _ in range(_DOT_TRIES):
        if pos < 0:
            return -1
        if buf[pos - 1] == 0x0A and buf[pos - 2] == 0x0D:
            return pos - 2
        pos = buf.find(b".", pos + 1)
    return -1 if pos < 0 else buf.find(b"\r\n.", pos - 2)


class DotReader:
    """One message's DATA: call :meth:`start` with the buffer, then :meth:`read` as bytes
    arrive in it."""

    def __init__(self) -> None:
        self.size = 0
        """Message bytes so far."""
        self.too_long = False
        """Whether a line was longer than :data:`MAX_LINE`."""
        self._skip = 0  # bytes at the buffer's start that are context, not message
        self._line_len = 0

    def start(self, buf: bytearray) -> None:
        """Begin a message whose bytes follow in *buf*."""
        buf[0:0] = b"\r\n"  # the DATA line's own CRLF: the first line starts a line
        self._skip = 2
        self._line_len = self.size = 0
        self.too_long = False

    def read(self, buf: bytearray) -> tuple[bytes | None, bool]:
        """Take what can be taken from *buf*; return ``(message bytes or None, ended)``.

        After the end, *buf* holds what followed the final ``.`` line (commands).
        """
        dot = find_dot_line(buf)
        end = -1 if dot < 0 else buf.find(_END, dot)
        if end >= 0:
            cut = end + 2
        else:
            cut = len(buf) - next((len(t) for t in _TAILS if buf.endswith(t)), 0)
            if cut <= self._skip:
                return None, False
        self._measure(buf, cut)
        with memoryview(buf) as view, view[:cut] as part:
            body = bytes(part)
        del buf[: end + 5 if end >= 0 else cut]
        # A stuffed dot lies inside the body: the "\r\n." of the end line (dot == end)
        # does not count, nor one whose dot is still held back.
        if dot >= 0 and dot + 2 < cut:
            body = body.replace(b"\r\n.", b"\r\n")
        if self._skip:
            body = body[self._skip :]
            self._skip = 0
        self.size += len(body)
        return body, end >= 0

    def _measure(self, buf: bytearray, cut: int) -> None:
        """Note a line over :data:`MAX_LINE` bytes in ``buf[:cut]`` (and the one before)."""
        last = buf.rfind(b"\r\n", 0, cut)
        if last < 0:
            self._line_len += cut
            self.too_long |= self._line_len > MAX_LINE
            return
        first = buf.find(b"\r\n", 0, cut)
        self.too_long |= self._line_len + first > MAX_LINE
        pos = first + 2
        while last - pos > MAX_LINE and not self.too_long:
            k = buf.rfind(b"\r\n", pos, pos + MAX_LINE + 2)
            self.too_long = k < 0
            pos = k + 2
        self._line_len = cut - last - 2
