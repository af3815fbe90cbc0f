"""The events of the LMTP/SMTP state machine (``_wire``): what the driver gets and answers."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NEED_DATA", "Body", "DataEnd", "Event", "Mail", "Rcpt", "Reply"]


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: :meth:`Conversation.next_event` has nothing until more bytes arrive.
NEED_DATA = _NeedData()


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply the core answered by itself; send *data*, then close if *close*."""

    data: bytes
    close: bool = False


@dataclass(frozen=True, slots=True)
class Mail:
    """``MAIL FROM``, syntax checked; answer it."""

    sender: str
    size: int | None
    body: str | None
    smtputf8: bool


@dataclass(frozen=True, slots=True)
class Rcpt:
    """``RCPT TO``, syntax checked; answer it (one reply)."""

    address: str


@dataclass(frozen=True, slots=True)
class Body:
    """Message bytes, dot-unstuffed, in order."""

    data: bytes


@dataclass(frozen=True, slots=True)
class DataEnd:
    """The end of ``DATA`` or of a ``BDAT`` chunk; answer it.

    After the last chunk (*last*), LMTP answers once per accepted recipient, SMTP once.
    A non-last chunk takes one reply (``250`` to go on; anything else ends the transaction).
    """

    last: bool
    line_too_long: bool = False
    size: int = 0


Event = Reply | Mail | Rcpt | Body | DataEnd
