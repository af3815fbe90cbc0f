"""Pure Maildir naming rules: unique names, hostname escaping, size stamps, flags.

Nothing here touches the clock, the pid or the network: the caller passes them in, so the
rules can be tested exhaustively (hypothesis) and reused by every driver.
"""

from __future__ import annotations

import functools

__all__ = [
    "VALID_FLAGS",
    "escape_host",
    "escaped_name",
    "format_flags",
    "published_name",
    "unique_name",
]

#: Flags defined by the maildir spec, in the order they must appear (ASCII order).
VALID_FLAGS = "DFPRST"


@functools.lru_cache(maxsize=16)  # called per delivery, with the same hostname each time
def escape_host(host: str) -> str:
    """Return *host* made safe for a maildir name.

    ``/`` becomes ``\\057`` and ``:`` becomes ``\\072`` (the spec's octal escapes, which
    Dovecot and Courier use too); a NUL or any other control character becomes its octal
    escape as well, and a leading dot is escaped so the name never looks hidden.
    """
    out: list[str] = []
    for ch in host:
        code = ord(ch)
        if ch in "/:\\" or code < 0x20 or code == 0x7F:
            out.append(f"\\{code:03o}")
        else:
            out.append(ch)
    escaped = "".join(out)
    if escaped.startswith("."):
        escaped = "\\056" + escaped[1:]
    return escaped or "localhost"


def unique_name(sec: int, usec: int, pid: int, counter: int, rand: int, host: str) -> str:
    """Return the unique base name ``<sec>.M<usec>P<pid>Q<n>R<rand>.<host>``.

    *host* is escaped here; the result never contains ``/``, ``:`` or NUL.
    """
    return escaped_name(sec, usec, pid, counter, rand, escape_host(host))


def escaped_name(sec: int, usec: int, pid: int, counter: int, rand: int, host: str) -> str:
    """:func:`unique_name` with *host* already escaped (``escape_host``)."""
    return f"{sec}.M{usec}P{pid}Q{counter}R{rand:016x}.{host}"


def format_flags(flags: str) -> str:
    """Return *flags* validated, de-duplicated and sorted as the maildir spec requires.

    Raises:
        ValueError: a character is not one of ``D F P R S T``.
    """
    bad = sorted({ch for ch in flags if ch not in VALID_FLAGS})
    if bad:
        raise ValueError(
            f"invalid maildir flag(s) {''.join(bad)!r}: use only {VALID_FLAGS!r} "
            "(D=draft, F=flagged, P=passed, R=replied, S=seen, T=trashed)"
        )
    return "".join(ch for ch in VALID_FLAGS if ch in flags)


def published_name(base: str, *, size: int | None = None, flags: str | None = None) -> str:
    """Return the name a message gets in ``new/`` or ``cur/``.

    *size* adds the Maildir++ ``,S=<size>`` stamp; *flags* (already formatted) adds the
    ``:2,<flags>`` info suffix used in ``cur/``.
    """
    name = base
    if size is not None:
        name = f"{name},S={size}"
    if flags is not None:
        name = f"{name}:2,{flags}"
    return name
