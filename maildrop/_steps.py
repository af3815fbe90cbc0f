"""The worker-side steps of one delivery: write, copy a file, publish.

A :class:`Steps` drives one :class:`~maildrop._writer.DeliveryFiles` from the message's bytes to
its published name, checking ``max_size`` and the quota as the bytes arrive and running the
streaming transform. It is plain synchronous code: the async session runs it in worker
threads (one call at a time), and ``maildrop deliver`` runs it in its own thread, so both
deliver through one implementation of the protocol. Nothing here imports asyncio or anyio.
"""

from __future__ import annotations

import errno
import io
import os

from ._errors import MessageTooLargeError
from ._naming import published_name
from ._writer import UNSUPPORTED, Aborted, DeliveryFiles, Settings

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO

    from ._quota_io import QuotaGuard
    from ._transform import Transform

__all__ = ["BATCH", "WOULD_BLOCK", "Steps", "as_chunk"]

#: Bytes buffered before a hop writes them (large messages are written in batches this big).
BATCH = 1 << 20

#: Why a non-blocking source that had no data is refused (it is not the end of the message).
WOULD_BLOCK = (
    errno.EAGAIN,
    "the source file is non-blocking and had no data; pass a blocking file or an async source",
)

# copy_file_range errnos that mean "not between these two files": fall back to read/write.
_NO_COPY = UNSUPPORTED | {errno.EXDEV, errno.EINVAL}


def as_chunk(data: object) -> bytes | memoryview:
    """Return *data* as an immutable bytes-like chunk, or raise a helpful ``TypeError``."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray):
        return bytes(data)  # the caller may reuse its buffer once write() returns
    if isinstance(data, memoryview):
        # Only a view of bytes is immutable; keep a fresh view of it (the caller may
        # release its own), copy anything else (its buffer may change after write()).
        if isinstance(data.obj, bytes) and data.c_contiguous and data.format in ("B", "b", "c"):
            return data.cast("B")[:]
        return data.tobytes()
    if isinstance(data, str):
        raise TypeError(
            "maildrop takes bytes, not str; encode the message first (e.g. msg.encode()) "
            "or open files in binary mode ('rb')"
        )
    raise TypeError(
        f"message data must be bytes, bytearray or memoryview, not {type(data).__name__}"
    )


class Steps:
    """One delivery's worker-side state and steps (one thread at a time calls them).

    Args:
        settings: the maildir's frozen settings; its ``max_size`` and ``size_stamp`` apply.
        flags: publish into ``cur/`` with these ``:2,`` flags (``None``: into ``new/``).
        transform: the streaming header stamps and CRLF conversion, if any.
        quota: the delivery's quota guard; its lock is held around the link.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        flags: str | None = None,
        transform: Transform | None = None,
        quota: QuotaGuard | None = None,
    ) -> None:
        self.tmp = DeliveryFiles(settings, "new" if flags is None else "cur")
        self._flags = flags
        self._size_stamp = settings.size_stamp
        self._max_size = settings.max_size
        self._transform = transform
        self._quota = quota
        if quota is not None:
            quota.tmp = self.tmp
            self.tmp.ledger_lock = quota
        #: Bytes per batch: what a hop writes, what a file copy reads at once.
        self.batch = BATCH
        #: A synchronous file whose rest is copied after the buffered chunks (see write_rest).
        self.file: IO[bytes] | None = None
        self.started = False

    @property
    def transform(self) -> Transform | None:
        """The streaming header stamps and CRLF conversion, if any."""
        return self._transform

    @property
    def quota(self) -> QuotaGuard | None:
        """The delivery's quota guard, if any (the session releases its reservation)."""
        return self._quota

    def accept(self, data: object, size: int) -> bytes | memoryview:
        """Return *data* transformed, as a chunk to write after *size* bytes already taken.

        Raises:
            TypeError: *data* is not bytes-like.
            MessageTooLargeError: the message would pass ``max_size``.
        """
        chunk = as_chunk(data)
        if self._transform is not None:
            chunk = self._transform.feed(chunk)
        if self._max_size is not None and size + len(chunk) > self._max_size:
            raise MessageTooLargeError(self._max_size)
        return chunk

    def write(self, chunks: list[bytes | memoryview]) -> None:
        """Write one batch (the first opens the directories and creates the tmp file),
        checking the quota first."""
        tmp = self.tmp
        if not self.started:
            tmp.open_dirs()
            if self._quota is not None:
                self._quota.check(tmp.root_fd, sum(len(c) for c in chunks))
            tmp.create()
            self.started = True
        elif self._quota is not None and chunks:
            self._quota.check(tmp.root_fd, tmp.size + sum(len(c) for c in chunks))
        tmp.write(chunks)

    def write_rest(self, chunks: list[bytes | memoryview]) -> None:
        """Write the last batch, an attached file and the transform's tail (in the worker)."""
        self.write(chunks)
        if self.file is not None:
            self.copy_file(self.file)
        tail = self.tail(self.tmp.size)
        if tail:
            self.write([tail])

    def tail(self, size: int) -> bytes | memoryview:
        """Return the transform's last bytes (none without a transform), to write after
        *size* bytes; raise ``MessageTooLargeError`` if they pass ``max_size``."""
        if self._transform is None:
            return b""
        tail = self._transform.finish()
        if self._max_size is not None and size + len(tail) > self._max_size:
            raise MessageTooLargeError(self._max_size)
        return tail

    @property
    def threads_only(self) -> bool:
        """Whether the steps must run in threads: they copy a synchronous file or keep a
        quota ledger (blocking calls that no io_uring chain makes). A quota whose limits
        would come from a missing ``maildirsize`` keeps none (``QuotaGuard.absent``)."""
        return self.file is not None or (self._quota is not None and not self._quota.absent())

    def name_for(self, base: str, size: int) -> str:
        """Return the published name of a message of *size* bytes whose base name is *base*."""
        return published_name(base, size=size if self._size_stamp else None, flags=self._flags)

    def finish(self, chunks: list[bytes | memoryview], sync_new: bool) -> str:
        """Write the rest and publish; *sync_new*: fsync the destination and close the
        directories here (no group commit shares that fsync). Return the published name."""
        self.write_rest(chunks)
        return self.publish(sync_new)

    def publish(self, sync_new: bool) -> str:
        """Publish the written message (see :meth:`finish`); return the published name."""
        final = self.tmp.publish(size_stamp=self._size_stamp, flags=self._flags, sync_dir=sync_new)
        if sync_new:
            self.tmp.close_dirs()
        return final

    def copy_file(self, f: IO[bytes]) -> None:
        """Copy the rest of the synchronous file *f* (runs in the worker)."""
        tmp = self.tmp
        limit = self._max_size
        # Only a plain file object's fd holds what read() returns: gzip, bz2, lzma and
        # other wrappers expose the fd of the file they decode.
        raw = f.raw if isinstance(f, io.BufferedReader | io.BufferedRandom) else f
        try:
            src_fd = f.fileno()
            is_regular = isinstance(raw, io.FileIO) and os.path.isfile(f"/proc/self/fd/{src_fd}")
        except (AttributeError, OSError, ValueError):
            is_regular = False
        # A transform must see every byte, so it reads; the quota is checked per batch.
        is_regular = is_regular and self._transform is None
        if is_regular:
            offset = f.tell()
            while True:
                if tmp.aborted:
                    raise Aborted
                budget = self.batch if limit is None else min(self.batch, limit + 1 - tmp.size)
                before = tmp.size
                try:
                    n = tmp.copy_from(src_fd, offset, budget)
                except OSError as exc:
                    # copy_file_range refuses some pairs (EXDEV: a file on another kind
                    # of filesystem, e.g. tmpfs to ext4); read the rest instead.
                    if exc.errno not in _NO_COPY:
                        raise
                    offset += tmp.size - before
                    is_regular = False
                    break
                offset += n
                if limit is not None and tmp.size > limit:
                    raise MessageTooLargeError(limit)
                if self._quota is not None:
                    self._quota.check(tmp.root_fd, tmp.size)
                if n < budget:
                    break
            f.seek(offset)
        if not is_regular:
            while True:
                if tmp.aborted:
                    raise Aborted
                data = f.read(self.batch)
                if data is None:  # a non-blocking file without data now: not the end
                    raise BlockingIOError(*WOULD_BLOCK)
                if not data:
                    break
                chunk = as_chunk(data)
                if self._transform is not None:
                    chunk = self._transform.feed(chunk)
                if limit is not None and tmp.size + len(chunk) > limit:
                    raise MessageTooLargeError(limit)
                self.write([chunk])  # checks the quota too
