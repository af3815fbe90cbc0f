"""The append task's byte queue: batches handed to a maildrop session, then the commit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from compat._feed import Feed
from maildrop import Maildir

from ..conftest import listing

pytestmark = pytest.mark.asyncio


async def test_queued_bytes_go_to_the_session_in_one_batch(maildir_path: Path) -> None:
    """Everything queued before the pump runs is one session write; then it commits."""
    feed = Feed()
    feed.push(b"Subject: feed\n\n")
    feed.push(b"body\n")
    assert feed.backlog == len(b"Subject: feed\n\nbody\n")
    backlogs: list[int] = []
    session = Maildir(maildir_path).open_delivery()
    loop = asyncio.get_running_loop()
    delivery = await feed.run(session, loop, lambda: True, lambda: backlogs.append(feed.backlog))
    assert backlogs == [0]  # one batch, drained
    assert delivery.path.read_bytes() == b"Subject: feed\n\nbody\n"


async def test_the_pump_waits_for_bytes_until_the_message_ends(maildir_path: Path) -> None:
    """With nothing queued the pump sleeps until push() or wake(); it commits only at the end."""
    feed = Feed()
    ended = False
    session = Maildir(maildir_path).open_delivery()
    loop = asyncio.get_running_loop()
    pump = loop.create_task(feed.run(session, loop, lambda: ended, lambda: None))
    await asyncio.sleep(0.01)
    assert not pump.done()
    feed.push(b"one\n")
    await asyncio.sleep(0.05)
    assert not pump.done()  # written, not ended
    feed.push(b"two\n")
    ended = True
    feed.wake()
    delivery = await asyncio.wait_for(pump, 5)
    assert delivery.path.read_bytes() == b"one\ntwo\n"
    feed.wake()  # after the end: nothing waits, nothing happens
    assert len(listing(maildir_path)["new"]) == 1


async def test_a_cancelled_pump_raises_and_the_session_aborts_cleanly(maildir_path: Path) -> None:
    """Cancelling the pump while it waits raises CancelledError; abort leaves nothing."""
    feed = Feed()
    session = Maildir(maildir_path).open_delivery()
    loop = asyncio.get_running_loop()
    feed.push(b"x" * (2 << 20))
    pump = loop.create_task(feed.run(session, loop, lambda: False, lambda: None))
    await asyncio.sleep(0.05)
    pump.cancel()
    with pytest.raises(asyncio.CancelledError, match=r"^$"):
        await pump
    await session.abort()
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}
