"""The turn budget and the shared read buffer of a server's connections."""

from __future__ import annotations

import asyncio
import errno

import pytest

from maildrop._lmtp_flow import READ_SIZE, AcceptErrors, ReadBuffer, TurnBudget


@pytest.mark.asyncio
async def test_turn_budget_defers_work_to_the_next_turn() -> None:
    """Once a turn's budget is spent, the next taker waits for the following turn."""
    budget = TurnBudget(per_turn=10)
    order: list[str] = []

    async def take(name: str) -> None:
        await budget.take(10)
        order.append(name)

    async def other() -> None:
        order.append("other")

    await asyncio.gather(take("a"), take("b"), other())
    assert order == ["a", "other", "b"]


def test_read_buffer_is_one_writable_buffer_of_read_size() -> None:
    """The buffer asyncio reads into is writable and READ_SIZE bytes long."""
    buf = ReadBuffer()
    assert len(buf.view) == READ_SIZE
    buf.view[:2] = b"ok"
    assert bytes(buf.view[:2]) == b"ok"


def test_accept_errors_are_one_line_once_a_second(caplog: pytest.LogCaptureFixture) -> None:
    """EMFILE from accept logs one warning per second; other errors go to asyncio."""
    loop = asyncio.new_event_loop()
    try:
        handler = AcceptErrors()
        emfile = OSError(errno.EMFILE, "Too many open files")
        for _ in range(3):
            handler(loop, {"message": "socket.accept() out of system resource",
                           "exception": emfile})  # fmt: skip
        handler(loop, {"message": "something else", "exception": ValueError("x")})
    finally:
        loop.close()
    accept = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(accept) == 1
    assert "Too many open files" in accept[0].getMessage()
    assert any("something else" in r.getMessage() for r in caplog.records)


def test_a_retry_of_a_closed_listener_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """asyncio's accept retry on a listener closed since (fd -1) logs nothing."""

    def _start_serving() -> None:
        """Stand in for asyncio's own retry callback (matched by name)."""

    loop = asyncio.new_event_loop()
    try:
        handle = asyncio.Handle(_start_serving, (), loop)
        AcceptErrors()(loop, {"message": "Exception in callback", "handle": handle,
                              "exception": ValueError("Invalid file descriptor: -1")})  # fmt: skip
    finally:
        loop.close()
    assert caplog.records == []
