"""What a committed delivery returns: where the message is, its name and size."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["Delivery"]


class Delivery:
    """A message that is durable in the maildir (immutable; compares by its fields).

    Attributes:
        path: where the message is (in ``new/``, or ``cur/`` when delivered with flags).
        name: the file's basename.
        size: bytes written.

    ``os.fspath(delivery)`` is the path as a string. The :class:`~pathlib.Path` is made on
    first use of :attr:`path`: a server that only logs where a message went never makes it.
    """

    __slots__ = ("_path", "_where", "name", "size")
    __match_args__ = ("path", "name", "size")

    name: str
    size: int
    _where: str
    _path: Path | None

    def __init__(self, path: str | os.PathLike[str], name: str, size: int) -> None:
        put = object.__setattr__
        put(self, "_where", os.fspath(path))
        put(self, "_path", path if isinstance(path, Path) else None)
        put(self, "name", name)
        put(self, "size", size)

    @property
    def path(self) -> Path:
        """Where the message is (in ``new/``, or ``cur/`` when delivered with flags)."""
        path = self._path
        if path is None:
            path = Path(self._where)
            object.__setattr__(self, "_path", path)
        return path

    def __fspath__(self) -> str:
        return self._where

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: a Delivery is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: a Delivery is immutable")

    def _key(self) -> tuple[str, str, int]:
        return (self._where, self.name, self.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Delivery):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self) -> tuple[type[Delivery], tuple[str, str, int]]:
        return (Delivery, self._key())  # pickle and copy make it anew through __init__

    def __repr__(self) -> str:
        return f"Delivery(path={self.path!r}, name={self.name!r}, size={self.size!r})"
