"""Pure streaming transforms applied while a message is written: header stamps, CRLF to LF.

Nothing here does I/O. A :class:`Transform` takes the message chunk by chunk and returns
what to write, so a message is never buffered whole:

* ``Return-Path:`` and ``Delivered-To:`` headers are prepended. They end with the line ending
  of the message's own first line (CRLF if it ends in CRLF, LF otherwise, and LF for a
  message without any line ending), so a CRLF message stays consistently CRLF; with
  ``crlf_to_lf`` everything is LF. To see that first line ending, up to :data:`PEEK` bytes
  are held back until the first LF arrives.
* ``crlf_to_lf`` turns every CRLF into LF (SMTP wire format to the maildir convention). A CR
  at the end of a chunk is held back until the next chunk shows whether an LF follows, so a
  CRLF split across two chunks converts like one that is not; a lone CR is kept.
"""

from __future__ import annotations

import functools
import re

TYPE_CHECKING = False
if TYPE_CHECKING:  # (`maildrop deliver` does not load collections.abc for this)
    from collections.abc import Sequence

__all__ = ["PEEK", "Transform", "crlf_to_lf", "header_lines", "make_transform"]

#: Bytes held back at most while looking for the message's first line ending.
PEEK = 4096


def _check_value(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    bad = [ch for ch in ("\r", "\n", "\0") if ch in value]
    if bad:
        raise ValueError(
            f"{what}={value!r} contains {', '.join(repr(b) for b in bad)}; a header value "
            "must be one line (strip CR, LF and NUL from it)"
        )
    return value


def header_lines(return_path: str | None, delivered_to: str | None) -> list[bytes]:
    """Return the header lines to prepend, without line endings, in delivery-agent order.

    ``return_path`` becomes ``Return-Path: <addr>`` (``""`` gives ``<>``, the null sender;
    one pair of surrounding angle brackets is accepted and not doubled); ``delivered_to``
    becomes ``Delivered-To: addr``. Values are encoded as UTF-8 (SMTPUTF8 addresses).

    Raises:
        ValueError: a value contains CR, LF or NUL (it would inject a header).
        TypeError: a value is not a str.
    """
    lines: list[bytes] = []
    if return_path is not None:
        addr = _check_value("return_path", return_path)
        if addr.startswith("<") and addr.endswith(">") and len(addr) >= 2:
            addr = addr[1:-1]
        lines.append(b"Return-Path: <" + addr.encode("utf-8") + b">")
    if delivered_to is not None:
        addr = _check_value("delivered_to", delivered_to)
        lines.append(b"Delivered-To: " + addr.encode("utf-8"))
    return lines


def _plain(value: object) -> bool:
    return value is None or type(value) is str


@functools.lru_cache(maxsize=256)  # a server stamps the same few senders and recipients
def _known_lines(return_path: str | None, delivered_to: str | None) -> tuple[bytes, ...]:
    return tuple(header_lines(return_path, delivered_to))


_LONE_CR = re.compile(rb"\r[^\n]")  # a CR at the very end is checked apart (faster)


def crlf_to_lf(raw: bytes) -> bytes:
    """Return *raw* with every CRLF turned into LF; a CR not followed by LF stays."""
    # When every CR starts a CRLF (mail as SMTP carries it), deleting the CRs is the same:
    # replace() of one byte by nothing copies the runs between them with memchr, while a
    # two-byte pattern (or translate()) goes byte by byte, several times slower.
    if _LONE_CR.search(raw) is None and not raw.endswith(b"\r"):
        return raw.replace(b"\r", b"")
    return raw.replace(b"\r\n", b"\n")


class Transform:
    """The state of one message's transforms; feed it chunks in order, then ``finish()``."""

    def __init__(self, headers: Sequence[bytes], *, crlf_to_lf: bool) -> None:
        self._headers = headers
        self._crlf = crlf_to_lf
        self._cr = False  # a CR held back from the end of the previous chunk
        # Until the first line ending is known the headers cannot be written.
        self._peek: bytearray | None = bytearray() if headers and not crlf_to_lf else None
        self._prefix = b"" if self._peek is not None else self._stamp(b"\n")

    def _stamp(self, eol: bytes) -> bytes:
        return b"".join([line + eol for line in self._headers])

    def feed(self, chunk: bytes | memoryview) -> bytes | memoryview:
        """Return what to write for *chunk* (possibly empty while bytes are held back)."""
        if self._peek is not None:
            self._peek += chunk
            lf = self._peek.find(b"\n")
            if lf < 0 and len(self._peek) < PEEK:
                return b""
            eol = b"\r\n" if lf > 0 and self._peek[lf - 1] == 0x0D else b"\n"
            out = self._stamp(eol) + bytes(self._peek)
            self._peek = None
            return out
        data: bytes | memoryview = chunk  # passed through without a copy unless converted
        if self._crlf:
            raw = bytes(chunk)
            if self._cr:
                raw = b"\r" + raw
                self._cr = False
            if raw.endswith(b"\r"):
                raw = raw[:-1]
                self._cr = True
            data = crlf_to_lf(raw)
        if self._prefix:
            prefix, self._prefix = self._prefix, b""
            return prefix + data
        return data

    def finish(self) -> bytes:
        """Return what is still held back; call once, after the last chunk."""
        out = b""
        if self._peek is not None:
            # No line ending in the whole (short) message: LF, the maildir convention.
            out = self._stamp(b"\n") + bytes(self._peek)
            self._peek = None
        out += self._prefix
        self._prefix = b""
        if self._cr:
            out += b"\r"
            self._cr = False
        return out


def make_transform(
    *, return_path: str | None, delivered_to: str | None, crlf_to_lf: bool
) -> Transform | None:
    """Validate the options and return a :class:`Transform`, or None when there is none."""
    if _plain(return_path) and _plain(delivered_to):
        headers: Sequence[bytes] = _known_lines(return_path, delivered_to)
    else:
        headers = header_lines(return_path, delivered_to)  # raises the TypeError
    if not headers and not crlf_to_lf:
        return None
    return Transform(headers, crlf_to_lf=bool(crlf_to_lf))
