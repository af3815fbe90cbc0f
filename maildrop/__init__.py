"""maildrop: durable, streaming Maildir delivery for asyncio (and trio), via anyio.

The public names are imported on first use (PEP 562), so that ``maildrop deliver`` and the
worker-side modules load without asyncio, anyio or the worker pool.

Module map of the delivery engine (``../shared/DESIGN.md`` gives the protocol), from the
public face down::

    _maildir       Maildir, deliver(): settings, folders, open_delivery()
    _many          deliver_many(): stage once, link into every target
    _sources       feed(): drive any supported source into a session
    _session       DeliverySession: buffers writes, runs steps, commit/stage/abort
    _state         pure: the request's Phase table and the files' Owner hand-off
    _group_commit  concurrent deliveries into one directory share its fsync
    _handoff       who owns a delivery's files; abort without waiting for a worker
    _backend       Backend: run/submit/spawn/run_each/read_source, one per event loop
    _loops         per_loop(): one value per running event loop
    _pool          the thread backends' workers (asyncio pool, anyio limiters)
    _steps         worker side: accept/write/copy/finish (shared with _mda)
    _writer        worker side: DeliveryFiles, the publish protocol; _dirs opens directories
    _sys           the syscall table: every disk call of the delivery path
    _mda           ``maildrop deliver``: the same steps in the calling thread

Which thread owns a delivery's files when: the caller's task while it buffers; a worker
for the length of each step (it cleans up itself if the request was aborted meanwhile);
the group-commit job while it fsyncs and closes the directory fds of the deliveries it
covers; a spawned cleanup job after an abort that found no owner. Never the event loop
while I/O is due: it hands over and returns at once.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._errors import (
        EmptyMessageError,
        InvalidFolderNameError,
        MaildirNotFoundError,
        MaildropError,
        MessageTooLargeError,
        NotAMaildirError,
        Outcome,
        QuotaExceededError,
        outcome,
    )
    from ._maildir import Maildir, deliver
    from ._many import deliver_many
    from ._quota import Quota
    from ._session import Delivery, DeliverySession
    from ._sources import Source
    from ._sys import DEFAULT_SYSCALLS, Syscalls
del TYPE_CHECKING  # not a public name

__version__ = "0.1.0"

# Public name -> the private module that defines it.
_WHERE = {
    "DEFAULT_SYSCALLS": "_sys",
    "Delivery": "_session",
    "DeliverySession": "_session",
    "EmptyMessageError": "_errors",
    "InvalidFolderNameError": "_errors",
    "Maildir": "_maildir",
    "MaildirNotFoundError": "_errors",
    "MaildropError": "_errors",
    "MessageTooLargeError": "_errors",
    "NotAMaildirError": "_errors",
    "Outcome": "_errors",
    "Quota": "_quota",
    "QuotaExceededError": "_errors",
    "Source": "_sources",
    "Syscalls": "_sys",
    "deliver": "_maildir",
    "deliver_many": "_many",
    "outcome": "_errors",
}

__all__ = [
    "DEFAULT_SYSCALLS",
    "Delivery",
    "DeliverySession",
    "EmptyMessageError",
    "InvalidFolderNameError",
    "Maildir",
    "MaildirNotFoundError",
    "MaildropError",
    "MessageTooLargeError",
    "NotAMaildirError",
    "Outcome",
    "Quota",
    "QuotaExceededError",
    "Source",
    "Syscalls",
    "deliver",
    "deliver_many",
    "outcome",
]


def __getattr__(name: str) -> object:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'maildrop' has no attribute {name!r}")
    import importlib  # here: importlib loads warnings, which `maildrop deliver` never needs

    value = getattr(importlib.import_module(f".{where}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
