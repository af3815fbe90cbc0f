"""Pure parsing of ``MAIL``/``RCPT`` arguments for :mod:`maildrop._wire`."""

from __future__ import annotations

import re

__all__ = [
    "CONTROL",
    "MAX_COMMAND",
    "CommandError",
    "check_address",
    "parse_mail_params",
    "parse_path",
    "parse_rcpt_params",
    "split_keyword",
]

#: The longest command line accepted (RFC 5321's 512 plus room for extension parameters
#: and UTF-8 addresses).
MAX_COMMAND = 4096
#: NUL, CR, LF and every other C0 or C1 control character (and DEL).
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_BODIES = frozenset({"7BIT", "8BITMIME", "BINARYMIME"})


class CommandError(Exception):
    """A command is refused; ``str(exc)`` is the whole reply line."""


def parse_path(text: str, *, allow_empty: bool) -> tuple[str, list[str]]:
    """Split ``<address> PARAM=... `` into the address and its parameters.

    A source route (``<@a,@b:user@host>``) is dropped, as RFC 5321 asks. A ``>`` inside a
    quoted local part does not end the path.
    """
    if not text.startswith("<"):
        raise CommandError("501 5.5.4 Syntax: the address must be in <angle brackets>")
    quoted = False
    end = -1
    for i, ch in enumerate(text):
        if ch == '"' and text[i - 1] != "\\":
            quoted = not quoted
        elif ch == ">" and not quoted:
            end = i
            break
    if end < 0:
        raise CommandError("501 5.5.4 Syntax: missing > after the address")
    address = text[1:end]
    if address.startswith("@") and ":" in address:
        address = address.split(":", 1)[1]
    if not address and not allow_empty:
        raise CommandError("501 5.1.3 Empty recipient address")
    return address, text[end + 1 :].split()


def check_address(address: str, code: str) -> None:
    """Refuse an address with NUL, CR, LF or another control character (*code* 5.1.3)."""
    if CONTROL.search(address):
        raise CommandError(f"{code} 5.1.3 Control characters are not allowed in an address")


def parse_mail_params(params: list[str]) -> tuple[int | None, str | None, bool]:
    """Return ``(SIZE, BODY, SMTPUTF8)`` from ``MAIL`` parameters; refuse unknown ones."""
    size: int | None = None
    body: str | None = None
    utf8 = False
    for param in params:
        key, eq, value = param.partition("=")
        key = key.upper()
        if key == "SIZE" and eq and value.isascii() and value.isdigit():
            size = int(value)
        elif key == "BODY" and value.upper() in _BODIES:
            body = value.upper()
        elif key == "SMTPUTF8" and not eq:
            utf8 = True
        elif key in ("SIZE", "BODY", "SMTPUTF8"):
            raise CommandError(f"501 5.5.4 Bad value for {key}")
        else:
            raise CommandError(f"555 5.5.4 Unsupported MAIL parameter {_ascii(key)}")
    return size, body, utf8


def parse_rcpt_params(params: list[str]) -> None:
    """Refuse any ``RCPT`` parameter: none is advertised."""
    if params:
        key = params[0].partition("=")[0]
        raise CommandError(f"555 5.5.4 Unsupported RCPT parameter {_ascii(key)}")


def _ascii(text: str) -> str:
    return text[:40] if text.isascii() and text.isprintable() else "(non-ASCII)"


def split_keyword(arg: str, keyword: str) -> str:
    """Return what follows ``FROM:``/``TO:`` (case-insensitive, spaces tolerated)."""
    if arg[: len(keyword)].upper() != keyword:
        verb = "MAIL FROM" if keyword == "FROM:" else "RCPT TO"
        raise CommandError(f"501 5.5.4 Syntax: {verb}:<address>")
    return arg[len(keyword) :].lstrip(" ")
