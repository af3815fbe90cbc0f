"""Pure Maildir++ folder rules: validate a folder name and encode it for the disk.

A Maildir++ folder ``Lists.python`` lives in the directory ``.Lists.python`` inside the
maildir; ``.`` separates levels. Names are encoded the way Courier and Dovecot store them:
modified UTF-7 (RFC 3501 section 5.1.3) for anything outside printable ASCII and for ``&``.
"""

from __future__ import annotations

import base64

from ._errors import InvalidFolderNameError

__all__ = ["NAME_MAX", "encode_folder_name", "folder_dirname", "has_control"]

_RESERVED = frozenset({"tmp", "new", "cur"})
#: ``NAME_MAX`` on every filesystem a maildir lives on: the longest directory entry, in bytes.
NAME_MAX = 255
# C0 (with NUL), DEL and C1: Unicode's control characters (category Cc).
_CONTROL = frozenset(map(chr, (*range(0x20), *range(0x7F, 0xA0))))


def has_control(text: str) -> bool:
    """Return whether *text* contains a control character (NUL, C0, DEL or C1)."""
    return not _CONTROL.isdisjoint(text)


def encode_folder_name(name: str) -> str:
    """Return *name* in IMAP modified UTF-7 (``&`` becomes ``&-``)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            b64 = base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")
            out.append(f"&{b64}-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def folder_dirname(name: str) -> str:
    """Validate the Maildir++ folder *name* and return its directory name (``.Name``).

    Raises:
        InvalidFolderNameError: *name* is empty, has an empty level (``a..b``, ``.x``,
            ``x.``), contains ``/``, NUL or another control character, starts with ``~``,
            names a reserved level (``tmp``, ``new``, ``cur``, ``.``, ``..``), is not a
            ``str``, or is too long for one directory entry.
    """
    if not isinstance(name, str):
        raise InvalidFolderNameError(
            f"folder name must be a str such as 'Lists.python', not {type(name).__name__}"
        )
    problem = _problem(name)
    if problem is not None:
        raise InvalidFolderNameError(f"invalid folder name {name!r}: {problem}")
    dirname = "." + encode_folder_name(name)
    if len(dirname.encode("utf-8")) > NAME_MAX:
        raise InvalidFolderNameError(
            f"invalid folder name {name!r}: longer than {NAME_MAX} bytes once encoded"
        )
    return dirname


def _problem(name: str) -> str | None:
    if not name:
        return "it is empty"
    if "/" in name:
        return "'/' is not allowed (use '.' to separate levels, e.g. 'Lists.python')"
    if has_control(name):
        return "control characters (including NUL) are not allowed"
    if name.startswith("~"):
        return "a leading '~' is not allowed"
    levels = name.split(".")
    if any(level == "" for level in levels):
        return "it has an empty level ('.' separates levels; no leading, trailing or doubled '.')"
    reserved = sorted(_RESERVED.intersection(levels))
    if reserved:
        return f"{reserved[0]!r} is reserved by the maildir layout"
    return None
