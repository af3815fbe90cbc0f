"""compat.Deferred: Twisted's callback chain semantics, awaitable from asyncio."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from compat import AlreadyCalledError, Deferred, Failure


def test_callbacks_run_in_order_with_results_passed_on() -> None:
    """Each callback gets the previous result; callbacks added after firing run at once."""
    d: Deferred[int] = Deferred()
    seen: list[Any] = []
    d.addCallback(lambda r: r + 1).addCallback(lambda r, k: r * k, 10)
    d.callback(1)
    assert d.called
    d.addCallback(seen.append)
    assert seen == [20]


def test_exception_switches_to_errbacks_and_back() -> None:
    """A raising callback sends a Failure down the errbacks; an errback can recover."""
    d: Deferred[int] = Deferred()
    failures: list[Failure] = []

    def boom(_: Any) -> None:
        raise KeyError("k")

    def recover(f: Failure) -> str:
        failures.append(f)
        f.trap(KeyError)
        return "recovered"

    d.addCallback(boom).addCallback(lambda _: "skipped").addErrback(recover)
    d.callback(0)
    assert d.result == "recovered"
    assert isinstance(failures[0].value, KeyError)
    assert failures[0].check(ValueError, KeyError) is KeyError
    assert failures[0].getErrorMessage() == "'k'"


def test_add_both_and_add_callbacks() -> None:
    """addBoth sees results and failures; addCallbacks picks the right side."""
    d: Deferred[Any] = Deferred()
    seen: list[Any] = []
    d.addCallbacks(lambda r: seen.append(("cb", r)), lambda f: seen.append(("eb", f)))
    d.addBoth(lambda r: seen.append(("both", r)))
    d.errback(ValueError("v"))
    assert seen[0][0] == "eb"
    assert seen[1] == ("both", None)


def test_trap_reraises_other_errors() -> None:
    """Failure.trap re-raises an exception of another type."""
    f = Failure(ValueError("v"))
    with pytest.raises(ValueError, match="v"):
        f.trap(KeyError)


def test_failure_needs_an_exception() -> None:
    """Failure() outside an except block is a TypeError."""
    with pytest.raises(TypeError, match="needs an exception"):
        Failure()


def test_fires_only_once() -> None:
    """A second callback()/errback() raises AlreadyCalledError."""
    d: Deferred[int] = Deferred()
    d.callback(1)
    with pytest.raises(AlreadyCalledError, match="already fired"):
        d.callback(2)
    with pytest.raises(AlreadyCalledError, match="already fired"):
        d.errback(ValueError())


def test_returned_deferred_pauses_the_chain() -> None:
    """A callback returning a Deferred pauses the chain until it fires."""
    outer: Deferred[int] = Deferred()
    inner: Deferred[int] = Deferred()
    seen: list[Any] = []
    outer.addCallback(lambda _: inner).addCallback(seen.append)
    outer.callback(0)
    assert seen == []
    inner.callback(7)
    assert seen == [7]


def test_cancel_runs_canceller_then_fails() -> None:
    """cancel() calls the canceller and fails an unfired Deferred with CancelledError."""
    calls: list[Any] = []
    d: Deferred[int] = Deferred(calls.append)
    errors: list[Failure] = []
    d.addErrback(errors.append)
    d.cancel()
    assert calls == [d]
    assert errors[0].check(asyncio.CancelledError)
    d.cancel()  # no-op once fired


def test_unhandled_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A Deferred collected with an unhandled failure logs it (as Twisted does)."""
    d: Deferred[int] = Deferred()
    d.errback(ValueError("nobody listened"))
    with caplog.at_level(logging.ERROR, logger="compat"):
        del d
    assert "nobody listened" in caplog.text


@pytest.mark.asyncio
async def test_await_gives_result_or_raises() -> None:
    """await returns the chain's result, or raises its exception."""
    loop = asyncio.get_running_loop()
    d: Deferred[int] = Deferred()
    loop.call_soon(d.callback, 5)
    assert await d == 5
    e: Deferred[int] = Deferred()
    loop.call_soon(e.errback, OSError(5, "eio"))
    with pytest.raises(OSError, match="eio"):
        await e


@pytest.mark.asyncio
async def test_cancelling_the_awaiting_task_cancels_the_deferred() -> None:
    """asyncio.wait_for timing out cancels the Deferred (its canceller runs)."""
    cancelled: list[Any] = []
    d: Deferred[int] = Deferred(cancelled.append)
    with pytest.raises(TimeoutError, match=r"^$"):
        await asyncio.wait_for(d.asFuture(asyncio.get_running_loop()), 0.01)
    assert cancelled == [d]
    assert d.called
    d.addErrback(lambda f: None)
