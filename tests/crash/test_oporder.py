"""The op-order checker (pure): right traces pass, every broken rule is reported.

Traces come from a model of the protocol: any number of deliveries, small (one write with
``RWF_SYNC``, maybe short and then finished) or streamed (writes, then ``fsync(file)``),
interleaved in any order with a shared ``fsync(new/)`` (group commit), as hypothesis picks.
Each mutation breaks one rule in delivery 0 and must be caught.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from ._oporder import Ack, Checker, Event, Reap, Step, Submit, check

TMP, NEW = 3, 4
Owned = tuple[int, Event]  # (delivery, event); -1 for the shared fsyncs of new/


@dataclass
class _Delivery:
    ops: list[tuple[Step, int]]  # each step with its result
    next: int = 0
    submitted: int | None = None
    covered: bool = False
    linked: bool = False
    acked: bool = False


@dataclass
class _Model:
    deliveries: list[_Delivery]
    out: list[Owned] = field(default_factory=list)
    seq: int = 0
    #: fsync(new/)s in flight (at most two, completing in any order): seq -> deliveries
    #: whose link was done when it was submitted.
    syncing: dict[int, list[int]] = field(default_factory=dict)


def _ops(i: int, kind: str, chunks: int) -> list[tuple[Step, int]]:
    name = f"m{i}".encode()
    slot = f"s{i}"
    steps: list[tuple[Step, int]] = [(Step("open", slot, (TMP, name)), 0)]
    if kind == "small":
        steps.append((Step("write", slot, offset=0, length=100, sync=True), 100))
    elif kind == "short":
        steps.append((Step("write", slot, offset=0, length=100, sync=True), 40))
        steps.append((Step("write", slot, offset=40, length=60, sync=True), 60))
    else:
        for c in range(chunks):
            steps.append((Step("write", slot, offset=-1 if c else 0, length=50), 50))
        steps.append((Step("fsync", slot), 0))
    steps.append((Step("link", None, (TMP, name), (NEW, name)), 0))
    steps.append((Step("unlink", None, (TMP, name)), 0))
    steps.append((Step("close", slot), 0))
    return steps


def _actions(m: _Model) -> list[int]:
    ready = [
        i for i, d in enumerate(m.deliveries) if d.next < len(d.ops) or (d.covered and not d.acked)
    ]
    waiting = [i for i, d in enumerate(m.deliveries) if d.linked and not d.covered]
    if waiting and len(m.syncing) < 2:
        ready.append(-1)  # submit an fsync(new/)
    return ready + [-2 - k for k in range(len(m.syncing))]  # reap the k-th in flight


def _advance(m: _Model, who: int) -> None:
    if who == -1:
        m.syncing[m.seq] = [i for i, d in enumerate(m.deliveries) if d.linked and not d.covered]
        m.out.append((-1, Submit(m.seq, Step("fsync", f"f{NEW}"))))
        m.seq += 1
        return
    if who < -1:
        seq = sorted(m.syncing)[-2 - who]
        m.out.append((-1, Reap(seq, 0)))
        for i in m.syncing.pop(seq):
            m.deliveries[i].covered = True
        return
    d = m.deliveries[who]
    if d.next == len(d.ops):
        d.acked = True
        m.out.append((who, Ack(f"m{who}")))
        return
    step, result = d.ops[d.next]
    if d.submitted is None:
        d.submitted, m.seq = m.seq, m.seq + 1
        m.out.append((who, Submit(d.submitted, step)))
        return
    m.out.append((who, Reap(d.submitted, result)))
    d.submitted = None
    d.next += 1
    d.linked = d.linked or step.kind == "link"


@st.composite
def traces(draw: st.DrawFn) -> list[Owned]:
    """A right trace of 1-5 interleaved deliveries with shared fsyncs of new/ (two may be in
    flight and complete in either order)."""
    kinds = draw(st.lists(st.sampled_from(["small", "short", "stream"]), min_size=1, max_size=5))
    m = _Model([_Delivery(_ops(i, k, draw(st.integers(1, 3)))) for i, k in enumerate(kinds)])
    while ready := _actions(m):
        _advance(m, draw(st.sampled_from(ready)))
    return m.out


def _events(trace: list[Owned]) -> list[Event]:
    return [e for _, e in trace]


@settings(max_examples=300)
@given(traces())
def test_right_traces_pass(trace: list[Owned]) -> None:
    """Every interleaving of right deliveries passes, and every delivery is counted."""
    checker = Checker()
    for event in _events(trace):
        checker.feed(event)
    assert checker.violations == []
    assert checker.acked == checker.published == len({o for o, _ in trace if o >= 0})


def _of(trace: list[Owned], who: int, kind: str) -> list[int]:
    """Positions of *who*'s submissions of *kind* in *trace*."""
    return [
        i
        for i, (o, e) in enumerate(trace)
        if o == who and isinstance(e, Submit) and e.step.kind == kind
    ]


def _reap_of(trace: list[Owned], at: int) -> int:
    seq = trace[at][1].seq  # type: ignore[union-attr]
    return next(i for i, (_, e) in enumerate(trace) if isinstance(e, Reap) and e.seq == seq)


def unsynced(trace: list[Owned]) -> list[Owned]:
    """Delivery 0's writes lose RWF_SYNC and its fsync(file) is gone."""
    drop = {i for p in _of(trace, 0, "fsync") for i in (p, _reap_of(trace, p))}
    out: list[Owned] = []
    for i, (o, e) in enumerate(trace):
        if i in drop:
            continue
        if o == 0 and isinstance(e, Submit) and e.step.kind == "write":
            e = Submit(e.seq, e.step._replace(sync=False))
        out.append((o, e))
    return out


def failed_write(trace: list[Owned]) -> list[Owned]:
    """Delivery 0's first write fails with EIO, and the delivery goes on."""
    at = _reap_of(trace, _of(trace, 0, "write")[0])
    out = list(trace)
    out[at] = (0, Reap(trace[at][1].seq, -errno.EIO))  # type: ignore[union-attr]
    return out


def short_unfinished(trace: list[Owned]) -> list[Owned]:
    """Delivery 0's last write is short and nothing writes the rest."""
    at = _reap_of(trace, _of(trace, 0, "write")[-1])
    submit = trace[_of(trace, 0, "write")[-1]][1]
    assert isinstance(submit, Submit)
    out = list(trace)
    out[at] = (0, Reap(submit.seq, submit.step.length - 1))
    return out


def early_link(trace: list[Owned]) -> list[Owned]:
    """Delivery 0's link is submitted while its last write is in flight."""
    link = _of(trace, 0, "link")[0]
    at = _reap_of(trace, _of(trace, 0, "write")[-1])
    out = list(trace)
    moved = out.pop(link)
    out.insert(at, moved)
    return out


def early_ack(trace: list[Owned]) -> list[Owned]:
    """Delivery 0 is acked right after its link completed."""
    out = [(o, e) for o, e in trace if not (o == 0 and isinstance(e, Ack))]
    at = _reap_of(out, _of(out, 0, "link")[0])
    out.insert(at + 1, (0, Ack("m0")))
    return out


def failed_dir_sync(trace: list[Owned]) -> list[Owned]:
    """Every fsync(new/) fails with EIO, and the acks come anyway."""
    failed = -errno.EIO
    return [(o, Reap(e.seq, failed) if o == -1 and isinstance(e, Reap) else e) for o, e in trace]


MUTATIONS = [unsynced, failed_write, short_unfinished, early_link, early_ack, failed_dir_sync]


@settings(max_examples=300)
@given(traces(), st.sampled_from(MUTATIONS))
def test_each_broken_rule_is_reported(trace: list[Owned], mutate: object) -> None:
    """Each mutation of a right trace breaks one rule, and the checker names it."""
    assert callable(mutate)
    assert check(_events(mutate(trace))), mutate.__doc__


def test_a_publish_of_a_file_never_opened_and_an_ack_never_linked() -> None:
    """A link with no open before it, and an ack with no link, are both reported."""
    link = Step("link", None, (TMP, b"x"), (NEW, b"x"))
    got = check([Submit(0, link), Reap(0, 0), Ack("y")])
    assert got == ["publish of new/x: its tmp file was never opened", "ack of y: never published"]


def test_a_failed_link_publishes_nothing() -> None:
    """A link that failed (EEXIST) is no publish: an ack of that name is reported."""
    open_ = Step("open", "s0", (TMP, b"x"))
    write = Step("write", "s0", length=1, sync=True)
    link = Step("link", None, (TMP, b"x"), (NEW, b"x"))
    events: list[Event] = [Submit(0, open_), Reap(0, 0), Submit(1, write), Reap(1, 1)]
    events += [Submit(2, link), Reap(2, -errno.EEXIST), Submit(3, Step("fsync", "f4"))]
    events += [Reap(3, 0), Ack("x")]
    assert check(events) == ["ack of x: never published"]


def test_an_open_into_a_process_fd_and_an_fsync_before_the_last_write() -> None:
    """An fd from the open's result names the file; an fsync before a later write is stale."""
    open_ = Step("open", None, (TMP, b"x"))
    events: list[Event] = [Submit(0, open_), Reap(0, 9)]
    events += [Submit(1, Step("write", "f9", length=5)), Reap(1, 5)]
    events += [Submit(2, Step("fsync", "f9")), Reap(2, 0)]
    events += [Submit(3, Step("write", "f9", offset=-1, length=5)), Reap(3, 5)]
    link = Step("link", None, (-100, b"/proc/self/fd/9"), (NEW, b"x"))
    events += [Submit(4, link), Reap(4, 0)]
    assert check(events) == ["publish of new/x before its data was synced"]


def test_two_fds_of_one_directory_are_one_directory() -> None:
    """A link through one fd of new/ is covered by an fsync through another fd of it, not by
    an fsync of another directory."""

    def trace(sync_path: bytes) -> list[Event]:
        events: list[Event] = [Submit(0, Step("dir", None, (-100, b"/m"))), Reap(0, 5)]
        events += [Submit(1, Step("dir", None, (5, b"new"))), Reap(1, 7)]
        events += [Submit(2, Step("dir", None, (5, sync_path))), Reap(2, 9)]
        events += [Submit(3, Step("open", "s0", (TMP, b"x"))), Reap(3, 0)]
        events += [Submit(4, Step("write", "s0", length=1, sync=True)), Reap(4, 1)]
        events += [Submit(5, Step("link", None, (TMP, b"x"), (7, b"x"))), Reap(5, 0)]
        return [*events, Submit(6, Step("fsync", "f9")), Reap(6, 0), Ack("x")]

    assert check(trace(b"new")) == []
    assert check(trace(b"cur")) == ["ack of x before an fsync(new/) that covers its link"]


def test_a_later_fsync_that_completes_first_covers_the_link() -> None:
    """Two fsyncs of new/ in flight after a link: the later one completing first covers it."""
    events: list[Event] = [Submit(0, Step("open", "s0", (TMP, b"x"))), Reap(0, 0)]
    events += [Submit(1, Step("write", "s0", length=1, sync=True)), Reap(1, 1)]
    events += [Submit(2, Step("link", None, (TMP, b"x"), (NEW, b"x"))), Reap(2, 0)]
    events += [Submit(3, Step("fsync", f"f{NEW}")), Submit(4, Step("fsync", f"f{NEW}"))]
    assert check([*events, Reap(4, 0), Ack("x"), Reap(3, 0)]) == []
    assert check([*events, Reap(4, -5), Ack("x"), Reap(3, 0)]) == [
        "ack of x before an fsync(new/) that covers its link"
    ]
