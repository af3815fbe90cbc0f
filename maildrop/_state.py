"""A delivery's lifecycle as a state machine: pure, no I/O (h11's ``_state.py`` is the model).

Two machines, one per kind of owner:

* :class:`Phase` is where the *request* is, as the event loop sees it::

      writing --stage--> staged                       (deliver_many: fsynced in tmp/)
      writing --commit--> committing --link--> linked --sync--> durable
                          committing --sync--> durable   (the hop fsynced new/ itself)
      writing | staged | committing | linked --abort--> aborted

  ``durable`` and ``aborted`` are final. Aborting is the request; what it leaves on disk is
  decided by :func:`keeps_link`: a message already linked into the destination stays when
  the caller was cancelled or asked to abort (it is complete, and someone may have
  acknowledged it), and goes when a step failed.

* :class:`Owner` is who may touch the delivery's files (its fds, tmp file and link), which
  is how the loop hands an abort to a worker without ever waiting for one::

      caller --take--> worker --give back--> caller        (a step or the group fsync)
      caller --abort--> cleanup --clean--> cleaned          (a spawned cleanup job)
      worker --abort--> worker --give back--> cleaned       (the worker cleans up itself)
      caller --abort, nothing opened--> cleaned             (no I/O needed)

  Only one owner at a time does I/O on the files; the loop never blocks on a worker.
"""

from __future__ import annotations

import enum

__all__ = [
    "PHASES",
    "TERMINAL",
    "Cause",
    "Event",
    "LocalProtocolError",
    "Owner",
    "Phase",
    "abort_owner",
    "advance",
    "keeps_link",
]


class Phase(enum.Enum):
    """Where a delivery request is."""

    # Members are singletons: identity hashing (in C) makes the transition table's lookup,
    # done on every delivery, cheaper than Enum's hash of the name.
    __hash__ = object.__hash__

    WRITING = "writing"
    STAGED = "staged"
    COMMITTING = "committing"
    LINKED = "linked"
    DURABLE = "durable"
    ABORTED = "aborted"


class Event(enum.Enum):
    """What moves a request from one phase to the next."""

    # Members are singletons: identity hashing (in C) makes the transition table's lookup,
    # done on every delivery, cheaper than Enum's hash of the name.
    __hash__ = object.__hash__

    STAGE = "stage"  # the message is complete and fsynced in tmp/
    COMMIT = "commit"  # commit() started
    LINK = "link"  # the message is linked into the destination; a directory fsync is due
    SYNC = "sync"  # a directory fsync covered the link
    ABORT = "abort"


class Cause(enum.Enum):
    """Why a request is aborted."""

    REQUESTED = "requested"  # abort() was called
    CANCELLED = "cancelled"  # the caller was cancelled
    FAILED = "failed"  # a step or a write failed, or the block was left without commit()


class LocalProtocolError(RuntimeError):
    """An event that the request's phase does not allow (a misuse, or a bug)."""


#: The transition table: (phase, event) -> next phase.
PHASES: dict[tuple[Phase, Event], Phase] = {
    (Phase.WRITING, Event.STAGE): Phase.STAGED,
    (Phase.WRITING, Event.COMMIT): Phase.COMMITTING,
    (Phase.COMMITTING, Event.LINK): Phase.LINKED,
    (Phase.COMMITTING, Event.SYNC): Phase.DURABLE,
    (Phase.LINKED, Event.SYNC): Phase.DURABLE,
    **{
        (p, Event.ABORT): Phase.ABORTED
        for p in (Phase.WRITING, Phase.STAGED, Phase.COMMITTING, Phase.LINKED)
    },
}

#: Phases no event leaves.
TERMINAL = frozenset({Phase.DURABLE, Phase.ABORTED})


def advance(phase: Phase, event: Event) -> Phase:
    """Return the phase that *event* leads to from *phase*; raise if it is not allowed."""
    try:
        return PHASES[phase, event]
    except KeyError:
        raise LocalProtocolError(f"cannot {event.value}: this delivery is {phase.value}") from None


def keeps_link(phase: Phase, cause: Cause) -> bool:
    """Whether aborting in *phase* for *cause* keeps a link already made into the destination."""
    return cause is not Cause.FAILED and phase in (Phase.COMMITTING, Phase.LINKED)


class Owner(enum.Enum):
    """Who may touch a delivery's files."""

    CALLER = "caller"  # nobody is doing I/O on them; the loop may hand them over
    WORKER = "worker"  # a step or the group-commit job is using them
    CLEANUP = "cleanup"  # a spawned job is removing them
    CLEANED = "cleaned"  # nothing is left; final


def abort_owner(owner: Owner, *, opened: bool) -> Owner:
    """Return who cleans up once the loop aborts a delivery whose files *owner* holds.

    The caller's files go to a cleanup job (or need none when nothing was *opened*); a
    worker keeps them and cleans up when its call returns; a cleanup already under way or
    done stays as it is.
    """
    if owner is Owner.CALLER:
        return Owner.CLEANUP if opened else Owner.CLEANED
    return owner
