"""The append task's lifecycle and flow control tables, against the flags they replace."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from compat._lifecycle import (
    FLOW_TRANSITIONS,
    TRANSITIONS,
    Event,
    Flow,
    FlowEvent,
    InvalidTransition,
    Lifecycle,
    Phase,
    ProducerFlow,
)


class LifecycleMachine(RuleBasedStateMachine):
    """Random events on a Lifecycle agree with a model kept as independent flags."""

    def __init__(self) -> None:
        super().__init__()
        self.life = Lifecycle()
        self.started = self.ended = self.abandoned = False
        self.decided = self.fired = False

    def allowed(self, event: Event) -> bool:
        """Whether the flag model accepts *event* now."""
        settled = self.abandoned or self.decided
        if event is Event.START:
            return not self.started and not settled
        if event is Event.END:
            return self.started and not self.ended and not settled
        if event is Event.ABANDON:
            return not settled
        if event is Event.DECIDE:
            return not self.decided and (self.started or self.abandoned)
        return self.decided and not self.fired

    def apply(self, event: Event) -> None:
        """Update the flag model for an accepted *event*."""
        if event is Event.START:
            self.started = True
        elif event is Event.END:
            self.ended = True
        elif event is Event.ABANDON:
            self.abandoned = True
        elif event is Event.DECIDE:
            self.decided = True
        else:
            self.fired = True

    @rule(event=st.sampled_from(Event))
    def happen(self, event: Event) -> None:
        """An allowed event moves the phase; any other raises and changes nothing."""
        before = self.life.state
        if self.allowed(event):
            assert self.life.on(event) is before
            assert self.life.state is TRANSITIONS[before, event]
            self.apply(event)
        else:
            with pytest.raises(InvalidTransition, match=f"no transition for {event.name}"):
                self.life.on(event)
            assert self.life.state is before

    @invariant()
    def phase_matches_the_flags(self) -> None:
        """The one phase says what the flags said, and decided/scheduled agree."""
        if self.fired:
            expected = Phase.FIRED
        elif self.decided:
            expected = Phase.DECIDED
        elif self.abandoned:
            expected = Phase.ABANDONING
        elif self.ended:
            expected = Phase.ENDED
        elif self.started:
            expected = Phase.OPEN
        else:
            expected = Phase.IDLE
        assert self.life.state is expected
        assert self.life.decided == (self.abandoned or self.decided)
        assert self.life.scheduled == self.decided


class FlowMachine(RuleBasedStateMachine):
    """Random flow events agree with the paused/waiting flags the task used to keep."""

    def __init__(self) -> None:
        super().__init__()
        self.flow = ProducerFlow()
        self.paused = self.waiting = False

    @rule(event=st.sampled_from(FlowEvent))
    def happen(self, event: FlowEvent) -> None:
        """Each event returns the state it left, which tells the task what to undo."""
        before = self.flow.state
        if event is FlowEvent.PAUSE and before is not Flow.FLOWING:
            with pytest.raises(InvalidTransition, match="no transition for PAUSE"):
                self.flow.on(event)
            assert self.flow.state is before
            return
        assert self.flow.on(event) is before
        if event is FlowEvent.PAUSE:
            self.paused = True
        elif event is FlowEvent.HOLD:
            self.waiting = not self.paused  # a paused push producer stays paused
        else:  # DRAIN and RELEASE undo what was held
            self.paused = self.waiting = False

    @invariant()
    def state_matches_the_flags(self) -> None:
        """Never paused and waiting at once; the state is what the flags say."""
        assert not (self.paused and self.waiting)
        expected = Flow.PAUSED if self.paused else Flow.WAITING if self.waiting else Flow.FLOWING
        assert self.flow.state is expected


TestLifecycle = LifecycleMachine.TestCase
TestFlow = FlowMachine.TestCase


def test_fired_is_final_and_every_phase_is_reachable() -> None:
    """No transition leaves FIRED, and every phase is the target of one."""
    assert not any(phase is Phase.FIRED for phase, _ in TRANSITIONS)
    assert set(TRANSITIONS.values()) | {Phase.IDLE} == set(Phase)
    assert set(FLOW_TRANSITIONS.values()) == set(Flow)


def test_reprs_name_the_state() -> None:
    """repr() of both machines shows the current state's name."""
    life, flow = Lifecycle(), ProducerFlow()
    life.on(Event.START)
    flow.on(FlowEvent.HOLD)
    assert repr(life) == "<Lifecycle OPEN>"
    assert repr(flow) == "<ProducerFlow WAITING>"
