"""Self-checking test messages: each carries its own id, length and sha256.

Kept free of pytest so the child processes (``child.py``) can import it too.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["Corrupt", "make", "parse", "scan"]

_HEAD = b"X-Crash-Id: "


class Corrupt(AssertionError):
    """A file in new/ or cur/ is not a complete test message (C1 violated)."""


def make(ident: str, size: int) -> bytes:
    """Return a message of *size* body bytes that names *ident* and checks itself."""
    seed = hashlib.sha256(ident.encode()).hexdigest().encode()
    body = (seed * (size // len(seed) + 1))[:size]
    digest = hashlib.sha256(body).hexdigest()
    head = f"X-Crash-Id: {ident}\nX-Crash-Length: {size}\nX-Crash-Sha256: {digest}\n\n"
    return head.encode() + body


def parse(data: bytes) -> str:
    """Return the id of the complete message *data*; raise :class:`Corrupt` otherwise."""
    head, sep, body = data.partition(b"\n\n")
    if not sep or not head.startswith(_HEAD):
        raise Corrupt(f"no complete header ({len(data)} bytes)")
    try:
        fields = dict(line.split(b": ", 1) for line in head.split(b"\n"))
        size = int(fields[b"X-Crash-Length"])
        fields[b"X-Crash-Sha256"]
    except (ValueError, KeyError):
        raise Corrupt(f"malformed header ({len(data)} bytes)") from None
    if len(body) != size:
        raise Corrupt(f"{fields[b'X-Crash-Id']!r}: body has {len(body)} of {size} bytes")
    if hashlib.sha256(body).hexdigest().encode() != fields[b"X-Crash-Sha256"]:
        raise Corrupt(f"{fields[b'X-Crash-Id']!r}: sha256 mismatch")
    return fields[b"X-Crash-Id"].decode()


def scan(md: str | os.PathLike[str]) -> dict[str, str]:
    """Check every file in new/ and cur/ (C1) and return {id: relative path}.

    Raises:
        Corrupt: a file is incomplete or corrupt, or two files carry the same id.
    """
    out: dict[str, str] = {}
    for sub in ("new", "cur"):
        d = Path(md, sub)
        if not d.is_dir():
            continue
        for name in os.listdir(d):
            p = d / name
            try:
                ident = parse(p.read_bytes())
            except Corrupt as exc:
                raise Corrupt(f"{p}: {exc}") from None
            if ident in out:
                raise Corrupt(f"{ident} is in {md} twice: {out[ident]} and {sub}/{name}")
            out[ident] = f"{sub}/{name}"
    return out
