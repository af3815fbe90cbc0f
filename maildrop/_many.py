"""Write once, deliver to many: :func:`deliver_many`.

The message is streamed once into a staging file in the ``tmp/`` of the first target that
works, fsynced, and then hard-linked into every target's ``new/`` (or ``cur/``) straight from
the staging file's descriptor (``linkat`` of ``/proc/self/fd/N``, never by name, never
clobbering), each destination directory fsynced before its result counts. Where a link is
impossible (another filesystem, hard-link limit, a filesystem without links, a protected
link) that target gets a copy through its ordinary delivery path. Each target keeps its own
rules: ``max_size``, ``size_stamp``, quota, ``fsync``. The staging file is removed at the
end; the published names are links to it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO

from ._backend import current
from ._errors import MessageTooLargeError
from ._maildir import Maildir
from ._naming import format_flags, published_name
from ._quota_io import QuotaGuard
from ._record import replace
from ._session import Delivery, DeliverySession
from ._sources import Source, feed
from ._steps import Steps
from ._transform import make_transform
from ._writer import (
    LINK_REFUSED,
    Aborted,
    DeliveryFiles,
    Settings,
    link_file,
    reopen,
    under_free_name,
)

__all__ = ["deliver_many"]

#: Targets linked per worker call; each holds 3-4 directory fds until its directory fsync.
_SLICE = 32


class _NeedsCopy(Exception):
    """This target cannot get a link to the staged file: it gets a copy instead."""


def _open_reader(staged: DeliveryFiles) -> IO[bytes] | OSError:
    """Reopen the staged inode for reading (the session's fd is write-only); an error is
    one target's result, not the end of the staging file."""
    try:
        fd = reopen(staged)
    except OSError as exc:
        return exc
    return os.fdopen(fd, "rb")


async def _link_into(
    session: DeliverySession, jobs: list[tuple[int, Maildir]], flags: str | None
) -> _Links:
    """Link the staged file into every job's maildir in one step.

    Each linked target keeps its directory fds open for its directory fsync. If the caller
    is cancelled meanwhile, whoever ends last of the worker and the caller closes them
    (see :class:`_Handover`).
    """
    handover = _Handover()
    try:
        await session.run_staged(_link_all, jobs, flags, handover)
    except BaseException:
        handover.abandon()
        raise
    return handover.links


async def _copy_to(
    session: DeliverySession, md: Maildir, flags: str | None
) -> Delivery | Exception:
    """Deliver a copy of the staged file into *md* through its ordinary path."""
    reader = await session.run_staged(_open_reader)
    if isinstance(reader, OSError):
        return reader
    return await _copy(reader, md, flags)


_Links = list[tuple[int, "_Linked | Exception"]]


class _Handover:
    """Links made by a worker: handed to the caller, or closed by the worker if it left."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.links: _Links = []
        self.abandoned = False

    def give(self, links: _Links) -> None:
        """Hand *links* to the caller (in the worker); close them if it has left."""
        with self.lock:
            if not self.abandoned:
                self.links = links
                return
        _dispose(links)

    def abandon(self) -> None:
        """The caller leaves (on the loop): close whatever the worker handed over."""
        with self.lock:
            self.abandoned = True
            links, self.links = self.links, []
        _dispose(links)


@dataclass(slots=True)
class _Linked:
    delivery: Delivery
    target: DeliveryFiles  # its directory fds stay open until the fsync
    # Who closes the fds: the worker that fsyncs (claim) or the loop that gave up (abandon).
    lock: threading.Lock = field(default_factory=threading.Lock)
    owner: str = ""
    result: Delivery | Exception | None = None  # set once its directory fsync ran

    def claim(self, who: str) -> bool:
        """Take the directory fds over for *who*; False if someone else already did."""
        with self.lock:
            if self.owner:
                return False
            self.owner = who
            return True


def _dispose(links: _Links) -> None:
    """Close the directory fds of every link that no fsync job took over."""
    for _, res in links:
        if isinstance(res, _Linked) and res.claim("loop"):
            res.target.close_dirs()  # closing a directory fd never blocks


def _link_one(staged: DeliveryFiles, md: Maildir, flags: str | None) -> _Linked:
    """Link the staged file into *md* (runs in a worker); the fsync comes later."""
    size = staged.size
    cfg = md._settings
    if cfg.max_size is not None and size > cfg.max_size:
        raise MessageTooLargeError(cfg.max_size)
    target = DeliveryFiles(cfg, "new" if flags is None else "cur")
    guard = None if cfg.quota is None else QuotaGuard(cfg.quota, cfg)
    linked = False
    try:
        target.open_dirs()
        if guard is not None:
            guard.check(target.root_fd, size)
            guard.tmp = target
            target.size = size
        stamp = size if cfg.size_stamp else None
        with guard if guard is not None else contextlib.nullcontext():
            try:
                name = under_free_name(
                    partial(link_file, staged, target),
                    partial(published_name, size=stamp, flags=flags),
                    target,
                    target.subdir,
                )
            except OSError as exc:
                if exc.errno not in LINK_REFUSED:
                    raise
                raise _NeedsCopy from None  # delivered as a copy later
        linked = True
        path = Path(cfg.path, target.subdir, name)
        return _Linked(Delivery(path=path, name=name, size=size), target)
    finally:
        if guard is not None:
            guard.release()
        if not linked:
            target.close_dirs()


def _sync_one(linked: _Linked) -> Delivery:
    """Fsync the target's directory (runs in a worker); unlink again if that fails."""
    target = linked.target
    if not linked.claim("worker"):
        raise Aborted  # the caller gave up and closed the fds
    try:
        target.sync_dest()
    except OSError:
        with contextlib.suppress(OSError):
            target.sys.unlink(linked.delivery.name, dir_fd=target.dest_fd)
        raise
    finally:
        target.close_dirs()
    return linked.delivery


async def _sync_links(links: _Links) -> None:
    """Fsync every linked target's directory, concurrently, on the engine's workers.

    Each result is stored on its link. Parallel fsyncs overlap on the device. Cancelled,
    the caller closes the fds of the links no job took over and leaves; a job that took
    one over closes its fds itself.
    """
    try:
        await current().run_each(_sync_into, [res for _, res in links if isinstance(res, _Linked)])
    finally:
        _dispose(links)


def _sync_into(linked: _Linked) -> None:
    try:
        linked.result = _sync_one(linked)
    except Exception as exc:  # a per-target result, never all-or-nothing
        linked.result = exc


def _link_all(
    staged: DeliveryFiles, jobs: list[tuple[int, Maildir]], flags: str | None, handover: _Handover
) -> None:
    out: _Links = []
    for i, md in jobs:
        try:
            out.append((i, _link_one(staged, md, flags)))
        except Exception as exc:  # per-target result, never all-or-nothing
            out.append((i, exc))
    handover.give(out)


def _probe(settings: Settings) -> None:
    tmp = DeliveryFiles(settings, "new")
    try:
        tmp.open_dirs()
    finally:
        tmp.close_dirs()


async def deliver_many(
    source: Source,
    targets: Sequence[Maildir],
    *,
    flags: str | None = None,
    return_path: str | None = None,
    crlf_to_lf: bool = False,
) -> list[Delivery | Exception]:
    """Deliver one message to several maildirs, writing it once; return per-target results.

    The result list is in target order: a :class:`Delivery` where the message is durable,
    or the exception that target raised (nothing is all-or-nothing). *source* is read
    once, into the ``tmp/`` of the first target whose directories open (for a bytes-like
    source, the first where staging works), then hard-linked into each target and each
    destination directory fsynced; targets on another filesystem or where links are
    refused get a copy. *flags*, *return_path* and *crlf_to_lf* are as for
    :meth:`Maildir.deliver` (there is no per-target ``delivered_to``: the bytes are shared).

    Raises:
        TypeError: a target is not a :class:`Maildir`, or *source* is not bytes-like.
        ValueError: a bad flag or header value (before any I/O).
        Exception: whatever *source* raised, as the same object.

    **Cancellation:** the caller is released at once; the staging file is removed once
    the worker call on it finished. Targets already linked keep the message (complete;
    durable once their directory fsync ran), like :meth:`Maildir.deliver` after its link.
    """
    mds = _maildirs(targets)
    flags = None if flags is None else format_flags(flags)
    make_transform(return_path=return_path, delivered_to=None, crlf_to_lf=crlf_to_lf)
    if not mds:
        return []
    results: list[Delivery | Exception | None] = [None] * len(mds)
    rewindable = isinstance(source, bytes | bytearray | memoryview)
    for first, md in enumerate(mds):
        if not rewindable:
            try:
                await current().run(_probe, md._settings)
            except OSError as exc:
                results[first] = exc
                continue
        session = _staging_in(md, mds, return_path, crlf_to_lf)
        async with session:
            try:
                await feed(session, source)
                await session.stage()
            except (OSError, MessageTooLargeError) as exc:
                if exc is not session.error:
                    raise  # the source's own exception, as the same object
                if rewindable and not isinstance(exc, MessageTooLargeError):
                    results[first] = exc
                    continue
                return [exc if r is None else r for r in results]
            await _fan_out(session, mds, first, flags, results)
            await session.abort()  # remove the staging file; the links stay
        break
    # Every target either failed to stage (its error is recorded) or got a result.
    return [r for r in results if r is not None]


def _maildirs(targets: Sequence[Maildir]) -> list[Maildir]:
    mds = list(targets)
    for md in mds:
        if not isinstance(md, Maildir):
            raise TypeError(f"deliver_many() targets must be maildrop.Maildir, not {md!r}")
    return mds


def _staging_in(
    md: Maildir, mds: list[Maildir], return_path: str | None, crlf_to_lf: bool
) -> DeliverySession:
    """Return a staging session in *md* that suits every target of *mds*: the largest
    ``max_size`` (each target checks its own), fsync if any target fsyncs."""
    limits = [m._settings.max_size for m in mds]
    max_size = None if None in limits else max((m for m in limits if m is not None), default=0)
    fsync = any(m._settings.fsync for m in mds)
    settings = replace(md._settings, fsync=fsync, max_size=max_size)
    transform = make_transform(return_path=return_path, delivered_to=None, crlf_to_lf=crlf_to_lf)
    return DeliverySession(Steps(settings, transform=transform), pipeline=True)


async def _fan_out(
    session: DeliverySession,
    mds: list[Maildir],
    first: int,
    flags: str | None,
    results: list[Delivery | Exception | None],
) -> None:
    """Link the staged file into ``mds[first:]`` and record each target's result.

    Targets go a slice at a time (link, then the slice's directory fsyncs), so the fds
    held at once stay bounded whatever the number of targets. Targets that need a copy
    get it at the end, one at a time, while the staging file still exists.
    """
    copies: list[int] = []
    for start in range(first, len(mds), _SLICE):
        jobs = [(i, mds[i]) for i in range(start, min(start + _SLICE, len(mds)))]
        links = await _link_into(session, jobs, flags)
        await _sync_links(links)
        for i, res in links:
            if isinstance(res, _NeedsCopy):
                copies.append(i)
            else:
                results[i] = res.result if isinstance(res, _Linked) else res
    for i in copies:
        results[i] = await _copy_to(session, mds[i], flags)


async def _copy(file: IO[bytes], md: Maildir, flags: str | None) -> Delivery | Exception:
    try:
        return await md.deliver(file, flags=flags)
    except Exception as exc:
        return exc
    finally:
        file.close()
