"""The append task's lifecycle and its producer flow control, as transition tables.

Pure: no I/O, no event loop. :class:`~compat._task.MaildirMailboxAppendMessageTask` keeps
one :class:`Lifecycle` and one :class:`Flow` and asks them before every step, so the rules
below are the whole protocol of the task:

- ``IDLE`` → ``OPEN`` when ``createTempFile()`` opened the maildrop session and started the
  pump; ``write()`` queues bytes only while ``OPEN``.
- ``OPEN`` → ``ENDED`` at ``moveFileToNew()``: the pump writes what is queued and commits;
  a ``write()`` after it is an error (its bytes would be left out).
- ``IDLE``/``OPEN``/``ENDED`` → ``ABANDONING`` on ``fail()``, ``stopProducing()``, an
  error of a hook, a source or a cancelled ``defer``: the pump is cancelled and cleans up.
  The first outcome wins: an abandon once ``ABANDONING`` or later is ignored.
- → ``DECIDED`` once the outcome is known (the pump ended, or nothing had been started):
  ``defer`` fires in the pump's last step or on the next loop turn, never inside a caller's
  call; → ``FIRED`` when it did. Nothing leaves ``FIRED``.

Flow control is a second, independent machine: a push producer is ``PAUSED`` (a pull
producer left ``WAITING``, not prodded) while more bytes than the high-water mark wait for
the engine, and back to ``FLOWING`` once they drain or the producer is released.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import ClassVar, Generic, TypeVar

__all__ = [
    "FLOW_TRANSITIONS",
    "TRANSITIONS",
    "Event",
    "Flow",
    "FlowEvent",
    "InvalidTransition",
    "Lifecycle",
    "Phase",
    "ProducerFlow",
]


class InvalidTransition(RuntimeError):
    """An event that the current state has no transition for (a bug in the caller)."""


class _Enum(enum.Enum):
    """An enum hashed by identity: its members are singletons compared by identity, and
    ``Enum.__hash__`` (Python code hashing the name) ran on every table lookup."""

    __hash__ = object.__hash__


class Phase(_Enum):
    """Where an append task is in its life."""

    IDLE = "idle"
    OPEN = "open"
    ENDED = "ended"
    ABANDONING = "abandoning"
    DECIDED = "decided"
    FIRED = "fired"


class Event(_Enum):
    """What happens to an append task."""

    START = "start"  # the session is open and the pump started
    END = "end"  # moveFileToNew(): the message is complete
    ABANDON = "abandon"  # an error or a stop before the outcome was decided
    DECIDE = "decide"  # the outcome is known; defer fires now or on the next loop turn
    FIRE = "fire"  # defer fired


_P, _E = Phase, Event
#: ``(phase, event) -> next phase``; a pair missing here is an :class:`InvalidTransition`.
TRANSITIONS: Mapping[tuple[Phase, Event], Phase] = {
    (_P.IDLE, _E.START): _P.OPEN,
    (_P.IDLE, _E.ABANDON): _P.ABANDONING,
    (_P.OPEN, _E.END): _P.ENDED,
    (_P.OPEN, _E.ABANDON): _P.ABANDONING,
    (_P.OPEN, _E.DECIDE): _P.DECIDED,  # the pump failed on its own (a disk error)
    (_P.ENDED, _E.ABANDON): _P.ABANDONING,
    (_P.ENDED, _E.DECIDE): _P.DECIDED,
    (_P.ABANDONING, _E.DECIDE): _P.DECIDED,
    (_P.DECIDED, _E.FIRE): _P.FIRED,
}

_DECIDED = frozenset({Phase.ABANDONING, Phase.DECIDED, Phase.FIRED})
_SCHEDULED = frozenset({Phase.DECIDED, Phase.FIRED})


S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


class _Machine(Generic[S, E]):
    """A state moved by a transition table (the subclass gives the table and the start)."""

    __slots__ = ("state",)
    TABLE: ClassVar[Mapping[tuple[S, E], S]]  # set per subclass

    def __init__(self, start: S) -> None:
        self.state = start

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.state.name}>"

    def on(self, event: E) -> S:
        """Apply *event*; return the state it left (what the caller may have to undo).

        Raises:
            InvalidTransition: *event* is not allowed in the current state.
        """
        before = self.state
        try:
            self.state = self.TABLE[before, event]
        except KeyError:
            raise InvalidTransition(f"no transition for {event.name} in {before.name}") from None
        return before


class Lifecycle(_Machine[Phase, Event]):
    """One append task's phase, moved by :data:`TRANSITIONS`."""

    __slots__ = ()
    TABLE = TRANSITIONS

    def __init__(self) -> None:
        super().__init__(Phase.IDLE)

    @property
    def decided(self) -> bool:
        """Whether the outcome is settled (abandoned, decided or fired): the task is over."""
        return self.state in _DECIDED

    @property
    def scheduled(self) -> bool:
        """Whether ``defer``'s firing is scheduled or done."""
        return self.state in _SCHEDULED


class Flow(_Enum):
    """Whether the task holds its producer back."""

    FLOWING = "flowing"
    PAUSED = "paused"  # a push producer, paused by this task
    WAITING = "waiting"  # a pull producer, not prodded until the backlog drains


class FlowEvent(_Enum):
    """What happens to the backlog or the producer."""

    PAUSE = "pause"  # a push producer's backlog passed the high-water mark
    HOLD = "hold"  # a pull producer's backlog passed the high-water mark
    DRAIN = "drain"  # the backlog fell to the low-water mark
    RELEASE = "release"  # the producer was unregistered or the task ended


_F, _FE = Flow, FlowEvent
#: ``(flow, event) -> next flow``; a pair missing here is an :class:`InvalidTransition`.
FLOW_TRANSITIONS: Mapping[tuple[Flow, FlowEvent], Flow] = {
    (_F.FLOWING, _FE.PAUSE): _F.PAUSED,
    (_F.FLOWING, _FE.HOLD): _F.WAITING,
    (_F.WAITING, _FE.HOLD): _F.WAITING,  # prodded again while still over the mark
    (_F.PAUSED, _FE.HOLD): _F.PAUSED,  # prodProducer() called with a push producer paused
    (_F.FLOWING, _FE.DRAIN): _F.FLOWING,
    (_F.PAUSED, _FE.DRAIN): _F.FLOWING,
    (_F.WAITING, _FE.DRAIN): _F.FLOWING,
    (_F.FLOWING, _FE.RELEASE): _F.FLOWING,
    (_F.PAUSED, _FE.RELEASE): _F.FLOWING,
    (_F.WAITING, _FE.RELEASE): _F.FLOWING,
}


class ProducerFlow(_Machine[Flow, FlowEvent]):
    """The task's flow control state, moved by :data:`FLOW_TRANSITIONS`."""

    __slots__ = ()
    TABLE = FLOW_TRANSITIONS

    def __init__(self) -> None:
        super().__init__(Flow.FLOWING)
