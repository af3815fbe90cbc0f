"""One value per event loop (``maildrop._loops``)."""

from __future__ import annotations

import asyncio

import pytest
import trio

from maildrop._loops import per_loop, running_loop


def test_each_asyncio_loop_gets_its_own_value() -> None:
    """Values are per loop and stable within it (the loop is kept weakly: see test_pipeline)."""
    get = per_loop("t", lambda loop: object())

    async def twice() -> tuple[object, object]:
        return get(), get()

    loop = asyncio.new_event_loop()
    a, b = loop.run_until_complete(twice())
    assert a is b
    assert get(loop) is a  # from outside the loop too
    loop.close()
    c, _ = asyncio.run(twice())
    assert c is not a


def test_trio_runs_keep_their_value_in_a_runvar() -> None:
    """Under trio (no asyncio loop) each run gets a fresh value, made with loop=None."""
    loops: list[object] = []
    get = per_loop("t", lambda loop: loops.append(loop) or object())

    async def twice() -> tuple[object, object]:
        assert running_loop() is None
        return get(), get()

    a, b = trio.run(twice)
    c, _ = trio.run(twice)
    assert a is b
    assert c is not a
    assert loops == [None, None]


@pytest.mark.asyncio
async def test_running_loop_is_the_asyncio_loop() -> None:
    """Inside asyncio, running_loop() is the running loop; outside any loop, None."""
    assert running_loop() is asyncio.get_running_loop()
