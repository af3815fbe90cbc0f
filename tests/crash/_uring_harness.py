"""What the io_uring rows of the crash suite share: skip reasons and a traced maildir."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from maildrop import Maildir
from maildrop._uring import availability

from ._uring_trace import Recorder, install


def backend_reason() -> str | None:
    """Return why the io_uring backend cannot run here, or None when it can."""
    avail = availability()
    return None if avail.ok else f"io_uring is unavailable here: {avail.reason}"


def require_uring() -> None:
    """Skip, printing the reason, unless the io_uring backend can run here."""
    reason = backend_reason()
    if reason is not None:
        pytest.skip(reason)


def uring_maildir(path: str | Path, **kwargs: Any) -> Maildir:
    """Return a Maildir on the io_uring backend."""
    return Maildir(path, backend="uring", **kwargs)


@contextmanager
def traced(recorder: Recorder | None = None) -> Iterator[Recorder]:
    """Make every ring opened inside the block report to *recorder* (a fresh one by default)."""
    rec = recorder or Recorder()
    undo = install(rec)
    try:
        yield rec
    finally:
        undo()


async def chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """Yield *data* in pieces of *size* bytes (a streamed source)."""
    for i in range(0, len(data), size):
        yield data[i : i + size]
