"""The turn budget and the shared read buffer of a server's connections."""

from __future__ import annotations

import asyncio

import pytest

from maildrop._lmtp_flow import READ_SIZE, ReadBuffer, TurnBudget


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
