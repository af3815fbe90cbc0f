"""Op-order checker for io_uring deliveries, fed from the driver's own trace (pure, no I/O).

strace cannot see io_uring ops, so the driver reports them through its hooks
(``maildrop._uring_hooks``): each op as it is submitted and each completion as it is reaped.
``_uring_trace.Recorder`` turns those into the events below; this module only judges them.

Events, in the order they happened:

- :class:`Submit`: an op handed to the kernel, described by a :class:`Step`;
- :class:`Reap`: its completion (``-errno``, or bytes written, or 0);
- :class:`Ack`: ``deliver()`` returned this name to its caller.

Rules, per delivery (a file opened under a tmp name, published under a name in ``new/``):

1. Its data is durable before its link is submitted: every write to it completed, the
   writes cover ``[0, end)`` without a gap (a short write is followed by one for the rest),
   and either each write carried ``RWF_SYNC`` or a successful ``fsync(file)`` was submitted
   after the last write completed and completed before the link.
2. No failed op is followed by a publish: once an open, write or ``fsync(file)`` of a file
   failed, no link (or rename) of it is submitted.
3. The ack comes after a successful ``fsync(new/)`` that was submitted after the link
   completed (group commit: one fsync covers every link completed before it started).

The trace comes from a driver with hooks, which submits each op of a chain only after its
predecessor completed, so "completed before X was submitted" is the order the kernel ran.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["Ack", "Checker", "Reap", "Step", "Submit", "check"]

AT_FDCWD = -100
#: A link from ``/proc/self/fd/N`` (``AT_SYMLINK_FOLLOW``) publishes the file open as fd N.
PROC_FD = b"/proc/self/fd/"
#: Steps that publish a tmp file under its final name.
PUBLISH = frozenset({"link", "rename"})


class Step(NamedTuple):
    """What one op does, as far as the rules care.

    *kind*: ``open`` (a file created), ``dir`` (an open of an existing directory),
    ``write``, ``fsync``, ``link``, ``rename``, ``unlink``, ``close`` or ``other``.
    *handle*: the file it acts on (``"s3"``: slot 3, ``"f7"``: fd 7); for an open, the slot
    it fills (None when the result is a new fd). *path*: ``(dir fd, name)`` of an
    open, an unlink or a link's source (``(AT_FDCWD, b"/proc/self/fd/7")``: the file open as
    fd 7); *dest*: a link's target. *offset*, *length* and
    *sync* (``RWF_SYNC``) describe a write. Directories are known by the path they were
    opened by (a ``dir`` step relative to ``AT_FDCWD``, or to a directory known so), so two
    fds of one directory are one directory: a shared fsync may come through either.
    """

    kind: str
    handle: str | None = None
    path: tuple[int, bytes] | None = None
    dest: tuple[int, bytes] | None = None
    offset: int = 0
    length: int = 0
    sync: bool = False


class Submit(NamedTuple):
    """Op number *seq* was submitted."""

    seq: int
    step: Step


class Reap(NamedTuple):
    """Op number *seq* completed with *result*."""

    seq: int
    result: int


class Ack(NamedTuple):
    """``deliver()`` returned *name* (the file's name in ``new/``)."""

    name: str


Event = Submit | Reap | Ack


@dataclass
class _Write:
    offset: int
    length: int
    sync: bool
    result: int | None = None


@dataclass
class _File:
    path: tuple[int, bytes]
    writes: list[_Write] = field(default_factory=list)
    failed: str = ""
    #: Where a write at the file position (offset -1) lands: the end of the ones before.
    pos: int = 0
    #: A successful fsync(file) completed after every write it followed.
    synced: bool = False


@dataclass
class _Link:
    file: _File | None
    dest: tuple[int, bytes]
    done: bool = False
    durable: bool = False


class Checker:
    """Feed events with :meth:`feed`; read :attr:`violations` (empty: every rule held)."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.acked = self.published = self.dir_syncs = 0
        self._steps: dict[int, Step] = {}
        self._handles: dict[str, _File] = {}
        self._tmp: dict[tuple[int, bytes], _File] = {}
        self._files: dict[int, _File] = {}  # op seq -> the file it acts on
        self._links: dict[int, _Link] = {}
        self._covers: dict[int, list[_Link]] = {}  # dir fsync seq -> links it covers
        self._linked: dict[str, list[_Link]] = {}  # directory -> links done, not yet durable
        self._dirs: dict[int, str] = {}  # fd -> the directory it was opened as
        self._published: dict[str, _Link] = {}
        #: Per file: a fsync(file) in flight whose writes had all completed at submission.
        self._clean_fsync: set[int] = set()

    def feed(self, event: Event) -> None:
        """Take the next event of the trace."""
        if isinstance(event, Submit):
            self._steps[event.seq] = event.step
            self._submit(event.seq, event.step)
        elif isinstance(event, Reap):
            self._reap(event.seq, self._steps.pop(event.seq), event.result)
        else:
            self._ack(event.name)

    def _submit(self, seq: int, step: Step) -> None:
        if step.kind == "open" and step.path is not None:
            file = self._tmp[step.path] = _File(step.path)
            self._files[seq] = file
            if step.handle is not None:
                self._handles[step.handle] = file
        elif step.kind in ("write", "fsync") and step.handle in self._handles:
            file = self._files[seq] = self._handles[step.handle]
            if step.kind == "write":
                file.writes.append(_Write(step.offset, step.length, step.sync))
                file.synced = False
            elif all(w.result is not None for w in file.writes):
                self._clean_fsync.add(seq)
        elif step.kind == "fsync" and step.handle is not None:
            # Every link done and not yet durable: two fsyncs in flight may both cover one
            # link, and the later one may complete first.
            self._covers[seq] = list(self._linked.get(self._dir(int(step.handle[1:])), []))
        elif step.kind in PUBLISH and step.path is not None and step.dest is not None:
            file = self._tmp.get(step.path)
            dfd, name = step.path
            if dfd == AT_FDCWD and name.startswith(PROC_FD):  # linked from its open fd
                file = self._handles.get(f"f{name[len(PROC_FD) :].decode()}")
            self._links[seq] = _Link(file, step.dest)
            self._check_publish(file, step.dest)
        elif step.kind == "close" and step.handle is not None:
            self._handles.pop(step.handle, None)

    def _dir(self, fd: int) -> str:
        return self._dirs.get(fd, f"fd {fd}")

    def _check_publish(self, file: _File | None, dest: tuple[int, bytes]) -> None:
        what = f"publish of new/{dest[1].decode(errors='replace')}"
        if file is None:
            self.violations.append(f"{what}: its tmp file was never opened")
            return
        if file.failed:
            self.violations.append(f"{what} after a failed {file.failed}")
            return
        if any(w.result is None for w in file.writes):
            self.violations.append(f"{what} while a write is in flight")
            return
        end, want = 0, max((w.offset + w.length for w in file.writes), default=0)
        for w in sorted(file.writes, key=lambda w: w.offset):
            assert w.result is not None
            if w.offset > end:
                break
            end = max(end, w.offset + w.result)
        if end < want:
            self.violations.append(f"{what}: bytes {end}-{want} never written (short write)")
            return
        if not file.synced and not all(w.sync for w in file.writes):
            self.violations.append(f"{what} before its data was synced")

    def _reap(self, seq: int, step: Step, result: int) -> None:
        file = self._files.pop(seq, None)
        if step.kind == "dir" and step.path is not None and result >= 0:
            dfd, name = step.path
            base = "" if dfd == AT_FDCWD else self._dir(dfd) + "/"
            self._dirs[result] = base + name.decode(errors="surrogateescape")
        elif step.kind == "open" and file is not None:
            if result < 0:
                file.failed = "open"
            elif step.handle is None:
                self._handles[f"f{result}"] = file
        elif step.kind == "write" and file is not None:
            write = next(w for w in file.writes if w.result is None)
            write.result = result
            if write.offset < 0:
                write.offset = file.pos
            file.pos = write.offset + max(result, 0)
            if result < 0:
                file.failed = "write"
        elif step.kind == "fsync" and file is not None:
            clean = seq in self._clean_fsync
            self._clean_fsync.discard(seq)
            if result < 0:
                file.failed = "fsync(file)"
            elif clean and all(w.result is not None for w in file.writes):
                file.synced = True
        elif step.kind == "fsync" and seq in self._covers:
            self.dir_syncs += 1
            for link in self._covers.pop(seq):
                link.durable = link.durable or result == 0
            for links in self._linked.values():
                links[:] = [link for link in links if not link.durable]
        elif seq in self._links:
            self._linked_done(self._links.pop(seq), result)

    def _linked_done(self, link: _Link, result: int) -> None:
        if result < 0:
            return
        link.done = True
        self.published += 1
        self._linked.setdefault(self._dir(link.dest[0]), []).append(link)
        self._published[link.dest[1].decode(errors="surrogateescape")] = link

    def _ack(self, name: str) -> None:
        self.acked += 1
        link = self._published.get(name)
        if link is None:
            self.violations.append(f"ack of {name}: never published")
        elif not link.durable:
            self.violations.append(f"ack of {name} before an fsync(new/) that covers its link")


def check(events: Iterable[Event]) -> list[str]:
    """Return every rule the trace *events* breaks (empty when the order is right)."""
    checker = Checker()
    for event in events:
        checker.feed(event)
    return checker.violations
