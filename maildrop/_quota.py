"""Pure Maildir++ quota rules (Courier's maildirquota(7) / README.maildirquota).

``maildirsize`` sits in the top maildir. Its first line holds the limits (``10000000S,1000C``:
bytes and/or messages); every further line holds two signed integers, a byte delta and a
message delta, and the usage is their sum. Writers append one line per delivery; the file is
recalculated from the directories when it is missing, 5120 bytes or longer, has a delta line
that does not parse (numbers are at most 18 digits), adds up to a negative usage, or says
the maildir is over quota while it has more than one delta line or is at least 15 minutes
old. This module parses, formats and decides; ``_quota_io`` does the I/O.
"""

from __future__ import annotations

from ._record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "MAX_DIGITS",
    "MAX_FILE",
    "RECALC_AGE",
    "Quota",
    "QuotaFile",
    "counts_toward_quota",
    "folder_entries",
    "format_delta",
    "format_maildirsize",
    "over_quota",
    "parse_limits",
    "parse_maildirsize",
    "size_from_name",
]

#: A maildirsize this long (or longer) is recalculated instead of summed.
MAX_FILE = 5120
#: Seconds after which an over-quota maildirsize is distrusted and recalculated.
RECALC_AGE = 15 * 60
#: Longest number read from maildirsize: Courier keeps 64-bit counters, so anything longer
#: is damage (and Python refuses to convert numbers past 4 300 digits at all).
MAX_DIGITS = 18


@record(frozen=True, slots=True)
class Quota:
    """A Maildir++ quota for :class:`~maildrop.Maildir` (``Maildir(path, quota=Quota(...))``).

    Args:
        bytes: the most bytes all messages may take, or None for no size limit.
        messages: the most messages, or None for no count limit.
        permanent: refuse over-quota mail permanently (``552 5.2.2``) instead of
            temporarily (``452 4.2.2``, the default: the owner may free space).

    With limits, maildrop keeps ``maildirsize`` in the maildir with these limits (creating
    or rewriting it). ``Quota()`` without limits enforces whatever limits an existing
    ``maildirsize`` declares, and nothing when there is none.
    """

    bytes: int | None = None
    messages: int | None = None
    permanent: bool = False

    def __post_init__(self) -> None:
        for name in ("bytes", "messages"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"Quota({name}=...) must be a positive int or None, not {value!r}"
                )

    @property
    def from_file(self) -> bool:
        """Whether the limits come from ``maildirsize`` (none given in code)."""
        return self.bytes is None and self.messages is None


@record(frozen=True, slots=True)
class QuotaFile:
    """What a ``maildirsize`` says."""

    limit_bytes: int | None
    limit_messages: int | None
    used_bytes: int
    used_messages: int
    lines: int
    """Delta lines after the limits line."""
    malformed: bool = False
    """A delta line did not parse: the file must be recalculated."""


def parse_limits(line: str) -> tuple[int | None, int | None]:
    """Return the (bytes, messages) limits of a quota definition such as ``100S,10C``.

    Unknown or malformed members are ignored and 0 means no limit, as Courier reads it.
    """
    limit_bytes: int | None = None
    limit_messages: int | None = None
    for member in line.split(","):
        member = member.strip()
        value = _int(member[:-1], signed=False)
        if value is None:
            continue
        value = value or None
        if member[-1] == "S":
            limit_bytes = value
        elif member[-1] == "C":
            limit_messages = value
    return limit_bytes, limit_messages


def _int(text: str, *, signed: bool = True) -> int | None:
    """Return the decimal integer *text*, or None if it is not one of at most MAX_DIGITS."""
    digits = text[1:] if signed and text.startswith("-") else text
    if not 0 < len(digits) <= MAX_DIGITS or not digits.isascii() or not digits.isdigit():
        return None
    return int(text)


def parse_maildirsize(data: bytes) -> QuotaFile:
    """Parse the contents of a ``maildirsize`` file.

    A delta line that does not parse adds nothing and marks the result ``malformed``: the
    Maildir++ rules then have the file recalculated rather than trusted.
    """
    text = data.decode("ascii", "replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    limit_bytes, limit_messages = parse_limits(lines[0]) if lines else (None, None)
    used_bytes = used_messages = 0
    malformed = False
    for line in lines[1:]:
        fields = line.split()
        b = _int(fields[0]) if len(fields) >= 2 else None
        c = _int(fields[1]) if len(fields) >= 2 else None
        if b is None or c is None:
            malformed = True
            continue
        used_bytes += b
        used_messages += c
    return QuotaFile(
        limit_bytes, limit_messages, used_bytes, used_messages, len(lines[1:]), malformed
    )


def format_maildirsize(
    limit_bytes: int | None, limit_messages: int | None, used_bytes: int, used_messages: int
) -> bytes:
    """Return a freshly calculated ``maildirsize``: the limits line and one usage line."""
    parts = []
    if limit_bytes is not None:
        parts.append(f"{limit_bytes}S")
    if limit_messages is not None:
        parts.append(f"{limit_messages}C")
    return f"{','.join(parts)}\n{used_bytes} {used_messages}\n".encode("ascii")


def format_delta(size: int, count: int) -> bytes:
    """Return the line appended after adding (or removing) *count* messages of *size*."""
    return f"{size} {count}\n".encode("ascii")


def over_quota(
    limit_bytes: int | None,
    limit_messages: int | None,
    used_bytes: int,
    used_messages: int,
) -> bool:
    """Whether a usage exceeds the limits (equal is still within quota)."""
    return (limit_bytes is not None and used_bytes > limit_bytes) or (
        limit_messages is not None and used_messages > limit_messages
    )


def folder_entries(names: Iterable[str]) -> list[str]:
    """Return the Maildir++ folder directories (``.Name``) among a maildir's *names*, sorted.

    (Here rather than in ``_folders``: the quota scan needs it and this module is loaded
    for it anyway; a ``maildrop deliver`` run pays for every module it imports.)
    """
    return sorted(n for n in names if n.startswith(".") and n not in (".", ".."))


def size_from_name(name: str) -> int | None:
    """Return the ``,S=<size>`` stamp of a message file name, or None."""
    base = name.split(":", 1)[0]
    for field in base.split(",")[1:]:
        if field.startswith("S=") and field[2:].isascii() and field[2:].isdigit():
            return int(field[2:])
    return None


def counts_toward_quota(name: str) -> bool:
    """Whether a file in ``new/`` or ``cur/`` counts: not hidden, not flagged trashed (T)."""
    if name.startswith("."):
        return False
    _, sep, info = name.partition(":2,")
    return not (sep and "T" in info)
