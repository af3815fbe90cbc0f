"""Twisted's pieces, or compat's stand-ins for them when Twisted is missing, in this process."""

from __future__ import annotations

import asyncio
import io
import sys
from typing import Any

import pytest

from compat import _twisted
from compat._deferred import Deferred


class Consumer:
    """A consumer that records what a producer does to it."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.producer: Any = None
        self.streaming: bool | None = None
        self.unregistered = 0

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer, self.streaming = producer, streaming

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def unregisterProducer(self) -> None:
        self.unregistered += 1


def test_stand_in_file_sender_sends_a_file_in_chunks_and_fires_with_the_last_byte() -> None:
    """The stand-in FileSender sends transformed chunks, then fires with the last byte."""
    sender = _twisted._FileSender()
    sender.CHUNK_SIZE = 4
    consumer = Consumer()
    results: list[bytes] = []
    d = sender.beginFileTransfer(io.BytesIO(b"abcdefghij"), consumer, bytes.upper)
    d.addCallback(results.append)
    assert consumer.producer is sender
    assert consumer.streaming is False
    while consumer.unregistered == 0:
        sender.resumeProducing()
    assert consumer.data == [b"ABCD", b"EFGH", b"IJ"]
    assert results == [b"J"]
    sender.pauseProducing()  # a pull producer has nothing to pause
    sender.stopProducing()  # after the end: nothing left to fail
    assert results == [b"J"]


def test_stand_in_file_sender_stopped_fails_its_deferred() -> None:
    """stopProducing() before the end errbacks the transfer's Deferred once."""
    sender = _twisted._FileSender()
    failures: list[Any] = []
    d = sender.beginFileTransfer(io.BytesIO(b"x" * 10), Consumer())
    d.addErrback(failures.append)
    sender.stopProducing()
    sender.stopProducing()
    assert len(failures) == 1
    assert failures[0].getErrorMessage() == "Consumer asked us to stop producing"


@pytest.mark.asyncio
async def test_find_loop_returns_the_running_loop() -> None:
    """Inside asyncio code the running loop is the one."""
    assert _twisted.find_loop("x") is asyncio.get_running_loop()


def test_find_loop_without_a_loop_or_reactor_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No running loop and no reactor: the error names asyncio code and asyncioreactor."""
    monkeypatch.delitem(sys.modules, "twisted.internet.reactor", raising=False)
    with pytest.raises(RuntimeError, match="the task needs a running asyncio event loop"):
        _twisted.find_loop("the task")


def test_find_loop_under_another_reactor_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed reactor that is not asyncioreactor is named in the error."""

    class SelectReactor:
        pass

    monkeypatch.setitem(sys.modules, "twisted.internet.reactor", SelectReactor())
    with pytest.raises(RuntimeError, match=r"reactor is .*SelectReactor: install twisted"):
        _twisted.find_loop("the task")


def test_find_loop_uses_a_live_asyncioreactor_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside asyncio code, asyncioreactor's loop is used while it is open."""
    loop = asyncio.new_event_loop()

    class AsyncioReactor:
        _asyncioEventloop = loop

    monkeypatch.setitem(sys.modules, "twisted.internet.reactor", AsyncioReactor())
    try:
        assert _twisted.find_loop("the task") is loop
    finally:
        loop.close()
    with pytest.raises(RuntimeError, match=r"reactor is .*AsyncioReactor"):
        _twisted.find_loop("the task")  # a closed loop is no loop to run on


def test_new_deferred_and_cancelled_error_match_each_other() -> None:
    """A Deferred of new_deferred cancelled fails with what cancelled_error() returns."""
    cancelled: list[Any] = []
    d = _twisted.new_deferred(cancelled.append)
    failures: list[Any] = []
    d.addErrback(failures.append)
    d.cancel()
    assert cancelled == [d]
    assert isinstance(failures[0].value, type(_twisted.cancelled_error()))
    kind = Deferred if not _twisted.HAVE_TWISTED else type(d)
    assert isinstance(d, kind)
