"""maildrop: durable, streaming Maildir delivery for asyncio (and trio), via anyio.

The public names are imported on first use (PEP 562), so that ``maildrop deliver`` and the
worker-side modules load without asyncio, anyio or the worker pool.

Module map (``../shared/DESIGN.md`` gives the protocol; this map is kept true by the code),
from the public face down::

    _maildir       Maildir, deliver(): one frozen _dirs.Settings, folders, open_delivery()
    _many          deliver_many(): stage once, link into every target
    _sources       feed(): drive any supported source into a session
    _session       DeliverySession: buffers writes, runs steps, commit/stage/abort;
                   _delivery its result (Delivery)
    _state         pure: the request's Phase table and the files' Owner hand-off
    _group_commit  concurrent deliveries into one directory share its fsync
    _handoff       who owns a delivery's files; abort without waiting for a worker
    _backend       Backend: run/submit/spawn/run_each/read_source, one per event loop;
                   which backend a maildir asked for (auto/uring/threads, MAILDROP_BACKEND)
    _uring_backend the io_uring Backend: the engine's own steps as ring chains, the rest
                   in the pool; _uring_steps those chains (open dirs, finish, dir fsync),
                   _uring_stream a message on the ring: whole (two round trips) or in
                   ~1 MiB steps
    _loops         per_loop(): one value per running event loop
    _pool          the thread backends' workers (asyncio pool: CORE_THREADS, the server
                   fewer, more while fsyncs are slow or all blocked; anyio limiters)
    _steps         worker side: accept/write/copy/finish (shared with _mda)
    _writer        worker side: DeliveryFiles, the one publish path (link, retry, fallbacks)
    _unique        worker side: unique base names (clock, pid, counter, random, host)
    _dirs          worker side: opening and creating the maildir's directories, ownership
    _dircache      worker side: a server's maildir directories kept open between deliveries
    _quota_io      worker side: the Maildir++ maildirsize ledger (checked, updated, recalculated)
    _sweep         worker side: stale tmp/ files
    _sys           the syscall table: every disk call of the delivery path
    _record        a dataclass stand-in that keeps ``dataclasses`` off the start-up path
    pure rules     _naming (names, flags), _folders (folder names), _quota (maildirsize text),
                   _transform (header stamps, CRLF), _errors (errors and outcome())

The doors::

    cli            the ``maildrop`` command's dispatcher; ``deliver`` without argparse
    _mda           ``maildrop deliver``: the same steps, synchronously, in the calling thread
    _cli_clean     ``maildrop clean-tmp``
    _cli_serve     ``maildrop lmtp``/``smtp`` options; _serve_proc binds and runs them,
                   _supervisor forks and restarts --workers N, _listen binds sockets safely
    lmtp           public face of the server: MaildirServer (_lmtp_server), MaildirHandler
                   (_lmtp_handler, also an aiosmtpd handler), RetryMemory (_lmtp_retry)
    _wire          pure: the LMTP/SMTP state machine (bytes in, events and replies out);
                   _wire_events its events, _wire_data scans DATA/BDAT in whole buffers,
                   _wire_parse reads arguments
    _lmtp_protocol the asyncio.Protocol that feeds _wire; _lmtp_deliver streams into sessions
    _lmtp_flow     what a server's connections share: the turn budget, the read buffer
    _accept        accepts connections (not asyncio's server): accept errors logged once a
                   second, and a Share of connection counts across forked workers, so the
                   least loaded worker takes the next connection of a burst
    _log           the servers' log handler: a write per event-loop turn, not per line
    _uring         the io_uring driver of our own (ctypes + mmap): _uring_abi, _uring_setup,
                   _uring_ops, _uring_chain (a chain's bookkeeping), _uring_hooks
                   (trace/faults); _uring_deliver the phase-1
                   prototype delivery (benchmarks.uring_proto's ur* contenders)
    _uring_whole   a whole message on the ring from completion callbacks (no task per
                   step), and the directories shared by the deliveries in flight
    _uring_commit  the group commit's ring job, and Maildir.deliver(bytes) on the ring as
                   one future from its first op to the fsync that covers it

Which thread owns a delivery's files when: the caller's task while it buffers; a worker
for the length of each step (it cleans up itself if the request was aborted meanwhile), or on
the io_uring backend a ring job (an asyncio task, or a whole message's completion
callbacks) until its chain's last completion;
the group-commit job while it fsyncs and closes the directory fds of the deliveries it
covers; a spawned cleanup job after an abort that found no owner. Never the event loop
while I/O is due: it hands over and returns at once.

Where the code differs from DESIGN.md (to be folded in):

- Exit statuses: besides 75/65/67/64, a file or symlink where a maildir (or its tmp/ new/
  cur/) should be is permanent, 73 (EX_CANTCREAT, ``550 5.2.0``): retrying cannot fix it;
  a closed standard input is 66 (EX_NOINPUT). 77 is never used.
- The layout line "lmtp (handler and server)" is many modules now (above); the MDA is
  ``_mda`` plus ``cli``'s argparse-free fast path.
- ``--max-connections`` is per worker process (each process has its own event loop).
- Backends: ``Maildir(backend="auto"|"uring"|"threads")``. "auto" chooses per delivery on
  Linux asyncio loops where io_uring works: a delivery that starts while others are in
  flight on its loop (the pool or the ring busy) runs on the ring, which is ahead under
  concurrency; one that starts alone runs in threads, which are ahead for a lone delivery,
  and makes no ring (``_uring_backend.alone``). Both share the loop's group commit and its
  worker pool. The servers' maildirs take threads unless ``MAILDROP_BACKEND`` is set
  (``_backend.server_backend``: rings in one worker process per CPU cost more CPU).
- The thread pool: a library keeps "~4 workers per CPU, 8-64" (THREADS), but the LMTP/SMTP
  server starts SERVER_CORE_THREADS (4 per worker process) and grows towards THREADS only
  while most message-file fsyncs are slow or every worker is blocked (``_pool``): fewer
  threads fighting the loop for the GIL cost the server 20-25% less CPU per message.
- The servers run two worker processes per CPU by default (``_supervisor.default_workers``:
  deliveries mostly wait on fsyncs), and accept through their own ``_accept.Acceptor``, not
  asyncio's server: the workers share their connection counts so the least loaded one takes
  the next connection of a burst.
- A running server keeps each maildir's directory fds open between deliveries (``_dircache``,
  revalidated by one lstat per delivery); DESIGN.md has every delivery open its directories.
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
    from ._uring_setup import UringUnavailableError
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
    "UringUnavailableError": "_uring_setup",
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
    "UringUnavailableError",
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
