"""The delivery state machine (``maildrop._state``): its table, tested as a model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from maildrop._state import (
    PHASES,
    TERMINAL,
    Cause,
    Event,
    LocalProtocolError,
    Owner,
    Phase,
    abort_owner,
    advance,
    keeps_link,
)

#: The lifecycle written out by hand, independently of the table: each event's sources.
_FROM = {
    Event.STAGE: {Phase.WRITING},
    Event.COMMIT: {Phase.WRITING},
    Event.LINK: {Phase.COMMITTING},
    Event.SYNC: {Phase.COMMITTING, Phase.LINKED},
    Event.ABORT: {Phase.WRITING, Phase.STAGED, Phase.COMMITTING, Phase.LINKED},
}
_TO = {
    Event.STAGE: Phase.STAGED,
    Event.COMMIT: Phase.COMMITTING,
    Event.LINK: Phase.LINKED,
    Event.SYNC: Phase.DURABLE,
    Event.ABORT: Phase.ABORTED,
}


class Lifecycle(RuleBasedStateMachine):
    """Any sequence of events moves a request exactly as the hand-written lifecycle says."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = Phase.WRITING
        self.history = [Phase.WRITING]

    @rule(event=st.sampled_from(Event))
    def send(self, event: Event) -> None:
        """An allowed event moves to its phase; any other raises and changes nothing."""
        if self.phase in _FROM[event]:
            self.phase = advance(self.phase, event)
            assert self.phase is _TO[event]
            self.history.append(self.phase)
        else:
            with pytest.raises(LocalProtocolError, match=f"cannot {event.value}"):
                advance(self.phase, event)

    @precondition(lambda self: self.phase not in TERMINAL)
    @rule(cause=st.sampled_from(Cause))
    def abort(self, cause: Cause) -> None:
        """Aborting keeps a link only once committing began, and never after a failure."""
        keep = keeps_link(self.phase, cause)
        assert keep == (
            cause is not Cause.FAILED and self.phase in (Phase.COMMITTING, Phase.LINKED)
        )
        self.phase = advance(self.phase, Event.ABORT)
        self.history.append(self.phase)

    @invariant()
    def ends_once(self) -> None:
        """A final phase is the last one: nothing follows durable or aborted."""
        finals = [i for i, p in enumerate(self.history) if p in TERMINAL]
        assert finals in ([], [len(self.history) - 1])

    @invariant()
    def durable_only_through_commit(self) -> None:
        """A request becomes durable only after commit, never from staging."""
        if self.phase is Phase.DURABLE:
            assert Phase.COMMITTING in self.history
            assert Phase.STAGED not in self.history


TestLifecycle = Lifecycle.TestCase


def test_the_table_is_the_hand_written_lifecycle() -> None:
    """Every (phase, event) pair in the table is one the lifecycle allows, and all are there."""
    expected = {(p, e): _TO[e] for e, sources in _FROM.items() for p in sources}
    assert expected == PHASES


@given(st.sampled_from(Owner), st.booleans())
def test_an_abort_never_leaves_the_files_with_the_caller(owner: Owner, opened: bool) -> None:
    """After an abort somebody cleans up: a job, the worker, or nobody when nothing is left."""
    then = abort_owner(owner, opened=opened)
    assert then is not Owner.CALLER
    if owner is Owner.CALLER:
        assert then is (Owner.CLEANUP if opened else Owner.CLEANED)
    else:
        assert then is owner  # a worker or a cleanup that holds the files keeps them
