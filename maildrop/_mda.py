"""``maildrop deliver``'s delivery: one message from a file descriptor, in the calling thread.

An MTA starts the command once per message, so start-up is most of its cost: this path
imports neither asyncio nor anyio nor the worker pool. It drives the same worker-side code as
the async engine (``_steps.Steps`` over a ``_writer.DeliveryFiles``, ``_quota_io.QuotaGuard``, the
transforms) straight from the calling thread: same names, same fsyncs, same link without
overwrite, same quota file, same errors, and nothing left behind on failure.

SIGINT and SIGTERM stop a delivery that is still waiting for its message (an MTA or a user
giving up on a pipe that never ends): the tmp file is removed and :class:`Interrupted` is
raised. They only interrupt a read; one arriving while a batch is written is acted on at
the next read, and one arriving once the message is complete lets the delivery finish
(it is a few milliseconds from durable, and stopping it then would gain nothing).
"""

from __future__ import annotations

import io
import os

from ._errors import EmptyMessageError, MaildropError
from ._steps import BATCH, Steps

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal  # the same functions; typeshed only describes this one
    from types import FrameType

else:
    import _signal  # what `signal` wraps, minus the enum conversions (and their import cost)

__all__ = ["Interrupted", "deliver_fd", "from_line_length"]

# How far the first line is looked at for an mbox "From " line (as before: one readline).
_FROM_PEEK = 4096
_PIPE_READ = 1 << 16
_SIGNALS = (_signal.SIGINT, _signal.SIGTERM)


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while the message was still being read."""

    def __init__(self, signum: int) -> None:
        name = "SIGINT" if signum == _signal.SIGINT else "SIGTERM"
        super().__init__(f"interrupted by {name} while reading the message; nothing delivered")
        self.signum = signum


def from_line_length(head: bytes) -> int:
    """Return the length of a leading mbox ``From `` line in *head* (0 if there is none).

    Postfix's ``mailbox_command`` and procmail-style pipelines put one before the message;
    it is not part of the message. Only a complete line within the first 4096 bytes counts.
    """
    if not head.startswith(b"From "):
        return 0
    end = head.find(b"\n", 0, _FROM_PEEK)
    return 0 if end < 0 else end + 1


class _Reader:
    """Reads the message from a pipe; a signal interrupts only a read in progress."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reading = False
        self.pending: int | None = None

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.reading:
            raise Interrupted(signum)
        self.pending = signum

    def read(self, n: int) -> bytes:
        self.reading = True
        try:
            if self.pending is not None:
                raise Interrupted(self.pending)
            return os.read(self.fd, n)
        finally:
            self.reading = False

    def head(self) -> bytes:
        """Read past a ``From `` line to the first bytes of the message (b"" if none)."""
        data = b""
        while b"\n" not in data and len(data) < _FROM_PEEK:
            chunk = self.read(_PIPE_READ)
            if not chunk:
                break
            data += chunk
        data = data[from_line_length(data) :]
        while not data:
            data = self.read(_PIPE_READ)
            if not data:
                break
        return data


def deliver_fd(steps: Steps, fd: int) -> str:
    """Deliver the message readable from *fd* with *steps*; return its durable path.

    A leading mbox ``From `` line is dropped. A regular file is copied from its current
    offset (``copy_file_range`` when nothing transforms it); anything else is read to EOF.

    Raises:
        EmptyMessageError: there is no message at all (before anything is created).
        Interrupted: SIGINT or SIGTERM while reading (everything created is removed).
        MessageTooLargeError, QuotaExceededError, OSError: as ``Maildir.deliver``; the
            OSError names the absolute path it concerns.
    """
    tmp = steps.tmp
    regular = (os.fstat(fd).st_mode & 0o170000) == 0o100000  # S_ISREG
    reader = _Reader(fd)
    try:
        old = [(signum, _signal.signal(signum, reader.on_signal)) for signum in _SIGNALS]
    except ValueError:  # not the main thread (an embedding program): signals stay as they are
        old = []
    try:
        final = _from_file(steps, fd) if regular else _from_pipe(steps, reader)
    except BaseException as exc:
        if isinstance(exc, OSError) and not isinstance(exc, MaildropError):
            tmp.locate(exc)
        if steps.quota is not None:
            steps.quota.release()
        tmp.cleanup()
        raise
    finally:
        for signum, handler in old:
            if handler is not None:  # None: a handler not set from Python, left alone
                _signal.signal(signum, handler)
    return os.path.join(tmp.settings.path, tmp.subdir, final)


def _from_file(steps: Steps, fd: int) -> str:
    offset = os.lseek(fd, 0, os.SEEK_CUR)
    offset += from_line_length(os.pread(fd, _FROM_PEEK, offset))
    if os.fstat(fd).st_size <= offset:
        raise EmptyMessageError("empty message: nothing delivered")
    f = io.FileIO(fd, "rb", closefd=False)
    f.seek(offset)
    steps.file = f
    return steps.finish([], True)


def _from_pipe(steps: Steps, reader: _Reader) -> str:
    data = reader.head()
    if not data:
        raise EmptyMessageError("empty message: nothing delivered")
    chunks: list[bytes | memoryview] = []
    size = buffered = 0
    while data:
        chunk = steps.accept(data, size)
        size += len(chunk)
        buffered += len(chunk)
        chunks.append(chunk)
        if buffered >= BATCH:
            steps.write(chunks)
            chunks, buffered = [], 0
        data = reader.read(_PIPE_READ)
    return steps.finish(chunks, True)
