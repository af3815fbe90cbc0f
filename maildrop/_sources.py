"""Feed any supported message source into a :class:`DeliverySession`.

Supported: bytes-like objects; synchronous binary files (regular files are read, or copied
with ``copy_file_range``, in the worker that writes the message; pipes, sockets and terminals
are read in the backend's source lane, so a source that blocks holds no delivery worker);
objects with an async ``read(n)``
(aiofiles and anyio files, ``asyncio.StreamReader``); async iterables of bytes-like chunks,
which includes anyio's ``ByteReceiveStream``.
"""

from __future__ import annotations

import inspect
import io
import os
import stat
from collections.abc import AsyncIterable
from typing import IO, Any, cast

from anyio.abc import ByteReceiveStream

from ._backend import current
from ._session import DeliverySession
from ._steps import BATCH, WOULD_BLOCK

__all__ = ["Source", "feed"]

#: Anything :meth:`Maildir.deliver` accepts.
Source = (
    bytes
    | bytearray
    | memoryview
    | IO[bytes]
    | AsyncIterable[bytes | bytearray | memoryview]
    | ByteReceiveStream
    | Any
)

_WHAT = (
    "bytes, bytearray, memoryview, a binary file, an object with an async read(n) "
    "(aiofiles, anyio, asyncio.StreamReader), an async iterable of bytes, or an anyio "
    "ByteReceiveStream"
)


async def feed(session: DeliverySession, source: object) -> None:
    """Write all of *source* into *session* (without committing it).

    The session should be opened with ``pipeline=True``: the engine drives the source
    itself, so a step can write each batch while the next one is read.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        await session.write(source)
        return
    if isinstance(source, str):
        raise TypeError(
            "deliver() takes bytes, not str; encode the message first (e.g. msg.encode())"
        )
    if isinstance(source, io.TextIOBase):
        raise TypeError(
            "deliver() needs a binary file; open it in binary mode ('rb'), not text mode"
        )
    if isinstance(source, ByteReceiveStream):
        async for chunk in source:
            await session.write(chunk)
        return
    read = getattr(source, "read", None)
    if read is not None and inspect.iscoroutinefunction(read):
        while True:
            chunk = await read(BATCH)
            if chunk is not None and not chunk:
                return  # EOF (None is not EOF: write() refuses it with a TypeError)
            await session.write(chunk)
    if inspect.isasyncgen(source):
        # An async generator handed to us is ours to finish: close it if we stop early
        # (a bad chunk, max_size, a disk error), so it is not left suspended.
        try:
            async for piece in source:
                await session.write(cast(bytes, piece))  # write() validates the type
        finally:
            await source.aclose()
        return
    if isinstance(source, AsyncIterable):
        async for chunk in source:
            await session.write(chunk)
        return
    if read is not None and callable(read):
        if _may_block(source):
            while True:
                data = await current().read_source(read, BATCH)
                if data is None:  # a non-blocking file without data now: not the end
                    raise BlockingIOError(*WOULD_BLOCK)
                if not data:
                    return
                await session.write(data)
        # A regular file or an in-memory one: read (or copy_file_range) it in the worker
        # thread, in the same hop that publishes the message.
        session.write_from(cast(IO[bytes], source))
        return
    raise TypeError(f"cannot deliver a {type(source).__name__}; pass {_WHAT}")


def _may_block(source: object) -> bool:
    """Whether a synchronous file's ``read()`` can wait for a writer: a pipe, socket, tty."""
    try:
        fd = source.fileno()  # type: ignore[attr-defined]
        mode = os.fstat(fd).st_mode  # of an open fd: answered from memory, never blocks
    except (AttributeError, OSError, ValueError):  # no fd (BytesIO), closed, detached
        return False
    return not stat.S_ISREG(mode)
