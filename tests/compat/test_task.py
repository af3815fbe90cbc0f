"""The append task under plain asyncio, in this process (no Twisted reactor is involved).

With Twisted installed ``defer`` is a real Twisted Deferred, which asyncio code awaits
through ``asFuture(loop)``; without it, a ``compat.Deferred`` (same method).
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from zope.interface.verify import verifyObject

import compat
from compat import _twisted
from maildrop import DEFAULT_SYSCALLS

from ..conftest import listing, open_fds

Task = compat.MaildirMailboxAppendMessageTask


async def result(d: Any) -> Any:
    """Wait for the Deferred *d* from asyncio and return its result (or raise)."""
    return await d.asFuture(asyncio.get_running_loop())


async def until(cond: Callable[[], bool], within: float = 5) -> None:
    """Poll until *cond()* holds (it watches worker threads and the disk: no event to wait on)."""
    async with asyncio.timeout(within):
        while not cond():  # noqa: ASYNC110 - see the docstring
            await asyncio.sleep(0.002)


class Gate:
    """A write hook that blocks in the worker thread until opened."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.entered = threading.Event()

    def oswrite(self, fd: int, data: bytes) -> int:
        self.entered.set()
        assert self.event.wait(10)
        return os.write(fd, data)


def gated(gate: Gate, **attrs: Any) -> type[Task]:
    """Return a task class whose writes wait for *gate*."""
    return type("GatedTask", (Task,), {"oswrite": staticmethod(gate.oswrite), **attrs})


class PushProducer:
    """Records what the consumer asks of it."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["str", "bytes"])
async def test_append_message_lands_in_new(maildir_path: Path, kind: str) -> None:
    """appendMessage delivers byte-exact; list gets the path, typed like mbox.path."""
    path: str | bytes = str(maildir_path) if kind == "str" else os.fsencode(maildir_path)
    mbox = compat.MaildirMailbox(path)
    assert await result(mbox.appendMessage(b"Subject: hi\n\nbody\n")) is None
    [published] = mbox.list
    assert type(published) is type(path)
    assert Path(os.fsdecode(published)).read_bytes() == b"Subject: hi\n\nbody\n"
    assert os.path.dirname(os.fsdecode(published)) == str(maildir_path / "new")
    assert listing(maildir_path)["tmp"] == []


@pytest.mark.asyncio
async def test_tmpname_and_fh_are_the_real_tmp_file(maildir_path: Path) -> None:
    """tmpname is the path the message was written under in tmp/; fh its descriptor."""
    seen: list[Any] = []

    class Spy(Task):
        def oswrite(self, fd: int, data: bytes) -> int:
            seen.append((fd, self.fh, self.tmpname, os.path.exists(self.tmpname or "")))
            return os.write(fd, data)

    mbox = compat.MaildirMailbox(str(maildir_path))
    task = Spy(mbox, b"x" * 100)
    assert (task.tmpname, task.fh) == (None, -1)
    task.startUp()
    await result(task.defer)
    [(fd, fh, tmpname, existed)] = seen
    assert fd == fh
    assert existed
    assert os.path.dirname(tmpname) == str(maildir_path / "tmp")
    assert os.path.basename(tmpname) == os.path.basename(mbox.list[0])
    assert task.tmpname == tmpname


@pytest.mark.asyncio
async def test_large_file_message(maildir_path: Path, tmp_path: Path) -> None:
    """A binary file larger than the high-water mark arrives intact."""
    data = os.urandom(5 << 20)
    src = tmp_path / "msg"
    src.write_bytes(data)
    mbox = compat.MaildirMailbox(str(maildir_path))
    with open(src, "rb") as f:
        await result(mbox.appendMessage(f))
    assert Path(mbox.list[0]).read_bytes() == data


def test_str_message_is_refused() -> None:
    """A str message raises TypeError with a hint, as Twisted's BytesIO(str) would."""
    with pytest.raises(TypeError, match="encode"):
        Task(compat.MaildirMailbox("/nonexistent"), "text")  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_provides_iconsumer_and_all_attributes(maildir_path: Path) -> None:
    """The task provides IConsumer and has every attribute of Twisted's task."""
    task = Task(compat.MaildirMailbox(str(maildir_path)), b"")
    assert verifyObject(compat.IConsumer, task)
    for name in (
        "mbox", "defer", "opencall", "msg", "tmpname", "fh", "filesender", "myproducer",
        "streaming", "startUp", "registerProducer", "prodProducer", "unregisterProducer",
        "write", "fail", "moveFileToNew", "createTempFile", "osopen", "oswrite", "osclose",
        "osrename",
    ):  # fmt: skip
        assert hasattr(task, name), name
    task.opencall = "x"
    assert task.openCall == "x"


@pytest.mark.asyncio
async def test_second_producer_is_refused(maildir_path: Path) -> None:
    """registerProducer while one is registered raises RuntimeError."""
    task = Task(compat.MaildirMailbox(str(maildir_path)), b"")
    task.registerProducer(PushProducer(), True)
    with pytest.raises(RuntimeError, match="already has a producer"):
        task.registerProducer(PushProducer(), True)
    task.write(b"pushed\n")
    task.unregisterProducer()
    await result(task.defer)
    assert Path(task.mbox.list[0]).read_bytes() == b"pushed\n"  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_push_producer_paused_above_high_and_resumed_below_low(
    maildir_path: Path,
) -> None:
    """A push producer is paused while a write batch is stuck, resumed once it drains."""
    gate = Gate()
    # The backlog counts the 1 MiB batch in the worker plus what waits behind it.
    cls = gated(gate, highWaterMark=(1 << 20) + 100_000, lowWaterMark=10_000)
    task = cls(compat.MaildirMailbox(str(maildir_path)), b"")
    producer = PushProducer()
    task.registerProducer(producer, True)
    task.write(b"a" * (1 << 20))  # one engine batch: the pump writes it in a worker
    await until(gate.entered.is_set)
    task.write(b"b" * 50_000)
    assert producer.events == []
    task.write(b"c" * 60_000)
    assert producer.events == ["pause"]
    task.write(b"d")  # paused producers may still write; no second pause
    assert producer.events == ["pause"]
    gate.event.set()
    await until(lambda: producer.events == ["pause", "resume"])
    task.unregisterProducer()
    await result(task.defer)
    body = b"a" * (1 << 20) + b"b" * 50_000 + b"c" * 60_000 + b"d"
    assert Path(task.mbox.list[0]).read_bytes() == body  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_unregister_resumes_a_paused_producer(maildir_path: Path) -> None:
    """A producer the task paused is resumed when it is unregistered (never left paused)."""
    gate = Gate()
    task = gated(gate, highWaterMark=1000)(compat.MaildirMailbox(str(maildir_path)), b"")
    producer = PushProducer()
    task.registerProducer(producer, True)
    task.write(b"a" * (1 << 20))
    await until(gate.entered.is_set)
    task.write(b"b" * 2000)
    task.unregisterProducer()
    assert producer.events == ["pause", "resume"]
    gate.event.set()
    await result(task.defer)
    assert producer.events == ["pause", "resume"]


@pytest.mark.asyncio
async def test_pull_producer_not_prodded_above_high_water(maildir_path: Path) -> None:
    """A pull producer is prodded once per loop turn, but not while the backlog is high."""
    gate = Gate()
    task = gated(gate)(compat.MaildirMailbox(str(maildir_path)), b"")
    chunk = b"p" * (256 << 10)

    class Pull:
        prods = 0

        def resumeProducing(self) -> None:
            self.prods += 1
            if self.prods > 40:
                task.unregisterProducer()
            else:
                task.write(chunk)

        def stopProducing(self) -> None:
            raise AssertionError("never called")

    pull = Pull()
    task.registerProducer(pull, False)
    await until(gate.entered.is_set)
    await asyncio.sleep(0.05)
    stuck = pull.prods
    # 1 MiB in the stuck batch plus at most the high-water mark and one chunk queued.
    assert stuck * len(chunk) <= (1 << 20) + task.highWaterMark + 2 * len(chunk)
    assert task.opencall is None
    await asyncio.sleep(0.05)
    assert pull.prods == stuck
    gate.event.set()
    await result(task.defer)
    assert pull.prods == 41
    assert Path(task.mbox.list[0]).stat().st_size == 40 * len(chunk)  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_fail_cleans_up_then_errbacks_once(maildir_path: Path) -> None:
    """fail(err) removes the tmp file and fd, then fires the errback with err, once."""
    gate = Gate()
    task = gated(gate)(compat.MaildirMailbox(str(maildir_path)), b"")
    fds = open_fds()
    task.registerProducer(PushProducer(), True)
    task.write(b"x" * (1 << 20))
    await until(gate.entered.is_set)
    assert len(listing(maildir_path)["tmp"]) == 1
    err = ValueError("caller gave up")
    task.fail(err)
    task.fail(RuntimeError("second"))  # ignored: the outcome is decided
    task.write(b"more")  # ignored
    gate.event.set()
    with pytest.raises(ValueError, match="caller gave up") as info:
        await result(task.defer)
    assert info.value is err
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}
    await until(lambda: open_fds() <= fds)


@pytest.mark.asyncio
async def test_fail_without_argument_uses_the_current_exception(maildir_path: Path) -> None:
    """fail() inside an except block reports that exception, like Failure() in Twisted."""
    task = Task(compat.MaildirMailbox(str(maildir_path)), b"")
    task.write(b"x")
    try:
        raise KeyError("boom")
    except KeyError:
        task.fail()
    with pytest.raises(KeyError, match="boom"):
        await result(task.defer)
    task2 = Task(compat.MaildirMailbox(str(maildir_path)), b"")
    task2.fail()
    with pytest.raises(
        compat.DeliveryAborted, match=r"^fail\(\) was called; the message was not delivered$"
    ):
        await result(task2.defer)


@pytest.mark.asyncio
async def test_stop_producing_aborts(maildir_path: Path) -> None:
    """stopProducing() abandons the delivery: DeliveryAborted, nothing left."""
    task = Task(compat.MaildirMailbox(str(maildir_path)), b"")
    task.write(b"x" * (2 << 20))
    await asyncio.sleep(0.01)
    task.stopProducing()
    with pytest.raises(
        compat.DeliveryAborted,
        match=r"^stopProducing\(\) was called; the message was not delivered$",
    ):
        await result(task.defer)
    assert listing(maildir_path)["tmp"] == []
    assert listing(maildir_path)["new"] == []


@pytest.mark.asyncio
async def test_cancelling_the_deferred_aborts(maildir_path: Path) -> None:
    """Deferred.cancel() fails it at once; the tmp file goes once the worker lets go."""
    gate = Gate()
    task = gated(gate)(compat.MaildirMailbox(str(maildir_path)), b"")
    task.registerProducer(PushProducer(), True)
    task.write(b"x" * (1 << 20))
    await until(gate.entered.is_set)
    errors: list[Any] = []
    task.defer.addErrback(errors.append)
    task.defer.cancel()
    assert len(errors) == 1
    assert "Cancelled" in type(errors[0].value).__name__
    gate.event.set()
    await until(lambda: listing(maildir_path)["tmp"] == [])
    assert listing(maildir_path)["new"] == []


@pytest.mark.asyncio
async def test_cancel_after_the_outcome_is_decided_reports_it(maildir_path: Path) -> None:
    """Cancelling between a decided failure and the errback's turn gets the real failure.

    (A failure decided outside the pump, here fail() before the pump's first step, is
    fired on a later loop turn; an outcome of the pump itself fires at once.)
    """
    task = Task(compat.MaildirMailbox(str(maildir_path)), b"never")
    task._fire_pending = lambda: None  # type: ignore[method-assign] # hold the firing turn
    task.startUp()
    task.fail(ValueError("given up"))
    await until(lambda: task._pending is not None)
    assert not task.defer.called
    task.defer.cancel()
    with pytest.raises(ValueError, match="given up"):
        await result(task.defer)
    assert not maildir_path.exists() or listing(maildir_path)["new"] == []


@pytest.mark.asyncio
async def test_the_outcome_fires_in_the_pump_s_last_step(maildir_path: Path) -> None:
    """A committed delivery fires ``defer`` before its pump task ends (no extra turn)."""
    task = Task(compat.MaildirMailbox(str(maildir_path)), b"done")
    task.startUp()
    assert task._pump is not None
    fired_when_done: list[bool] = []
    task._pump.add_done_callback(lambda _: fired_when_done.append(task.defer.called))
    assert await result(task.defer) is None
    await until(lambda: bool(fired_when_done))
    assert fired_when_done == [True]
    assert len(listing(maildir_path)["new"]) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("step", ["fsync", "fsync_dir", "link", "open"])
async def test_engine_failures_reach_the_errback(maildir_path: Path, step: str) -> None:
    """A failing engine step errbacks with the OSError and leaves nothing behind."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        if step == "open" and not args[1] & os.O_CREAT:
            return os.open(*args, **kwargs)
        raise OSError(errno.EIO, f"injected EIO in {step}")

    mbox = compat.MaildirMailbox(str(maildir_path))
    mbox.AppendFactory = type(
        "Broken", (Task,), {"syscalls": DEFAULT_SYSCALLS.replace(**{step: broken})}
    )
    fds = open_fds()
    with pytest.raises(OSError, match=f"in {step}") as info:
        await result(mbox.appendMessage(b"x" * 1000))
    assert info.value.errno == errno.EIO
    assert mbox.list == []
    if step != "fsync_dir":  # a failed dir fsync cannot unpublish: the link may be durable
        assert listing(maildir_path)["new"] == []
    assert listing(maildir_path)["tmp"] == []
    assert open_fds() <= fds


@pytest.mark.asyncio
@pytest.mark.parametrize("hook", ["osopen", "oswrite", "osrename", "osclose"])
async def test_overridden_hooks_are_called_and_failures_cleaned(
    maildir_path: Path, hook: str
) -> None:
    """Each overridden hook is called with Twisted's arguments; its error is reported."""
    calls: list[tuple[Any, ...]] = []

    def failing(*args: Any) -> Any:
        calls.append(args)
        if hook == "osclose":
            os.close(args[0])  # Linux frees the fd even when close() fails
        raise OSError(errno.EPERM, f"injected in {hook}")

    cls = type("Hooked", (Task,), {hook: staticmethod(failing)})
    mbox = compat.MaildirMailbox(os.fsencode(maildir_path))
    mbox.AppendFactory = cls
    fds = open_fds()
    with pytest.raises(OSError, match=f"injected in {hook}"):
        await result(mbox.appendMessage(b"hello"))
    [args] = calls
    tmp = os.path.join(os.fsencode(maildir_path), b"tmp")
    if hook == "osopen":
        path, flags, mode = args
        assert os.path.dirname(path) == tmp
        assert flags & os.O_CREAT
        assert flags & os.O_EXCL
        assert mode == 0o600
    elif hook == "oswrite":
        assert args[1] == b"hello"
    elif hook == "osrename":
        src, dst = args
        assert os.path.dirname(src) == tmp
        assert os.path.dirname(dst) == os.path.join(os.fsencode(maildir_path), b"new")
    assert listing(maildir_path)["tmp"] == []
    assert listing(maildir_path)["new"] == []
    assert open_fds() <= fds


@pytest.mark.asyncio
async def test_write_of_str_fails_the_delivery(maildir_path: Path) -> None:
    """write(str) never raises into the producer; the Deferred fails with a TypeError."""
    task = Task(compat.MaildirMailbox(str(maildir_path)), b"")
    task.write("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes, not str"):
        await result(task.defer)


@pytest.mark.asyncio
async def test_source_read_error_is_reported(maildir_path: Path) -> None:
    """The source's read() exception reaches the errback as the same object."""
    err = OSError(errno.EIO, "read failed")

    class Src:
        def read(self, n: int) -> bytes:
            raise err

    with pytest.raises(OSError, match="read failed") as info:
        await result(compat.MaildirMailbox(str(maildir_path)).appendMessage(Src()))
    assert info.value is err


@pytest.mark.asyncio
async def test_mailbox_without_list(maildir_path: Path) -> None:
    """Any object with a path works as the mailbox; list is optional."""

    class Box:
        path = str(maildir_path)

    task = Task(Box(), b"x")
    task.startUp()
    await result(task.defer)
    assert len(listing(maildir_path)["new"]) == 1


def test_all_is_complete() -> None:
    """compat.__all__ lists every public name."""
    public = {n for n in dir(compat) if not n.startswith("_")} - {"annotations"}
    assert set(compat.__all__) == public


def test_no_loop_fails_at_once(maildir_path: Path) -> None:
    """Outside any event loop (and with no Twisted reactor) the Deferred fails at once."""
    if "twisted.internet.reactor" in sys.modules:
        pytest.skip("a Twisted reactor was imported into this process by another test")
    errors: list[Any] = []
    d = compat.MaildirMailbox(str(maildir_path)).appendMessage(b"x")
    d.addErrback(errors.append)
    assert "asyncio" in str(errors[0].value)


@pytest.mark.asyncio
async def test_concurrent_appends_all_land(maildir_path: Path) -> None:
    """Fifty tasks at once (sharing new/'s fsync) all fire once, each message intact."""
    mbox = compat.MaildirMailbox(str(maildir_path))
    msgs = [f"Subject: {i}\n\n{'x' * i}\n".encode() for i in range(50)]
    results = await asyncio.gather(*(result(mbox.appendMessage(m)) for m in msgs))
    assert results == [None] * 50
    assert sorted(Path(p).read_bytes() for p in mbox.list) == sorted(msgs)
    assert listing(maildir_path)["tmp"] == []


@pytest.mark.asyncio
async def test_write_after_the_message_ended_fails_instead_of_truncating(
    maildir_path: Path,
) -> None:
    """Bytes written after moveFileToNew() fail the delivery: they would be left out."""
    task = Task(compat.MaildirMailbox(str(maildir_path)), b"")
    task.createTempFile()
    task.write(b"Subject: x\n\nbody\n")
    task.moveFileToNew()
    task.write(b"more body\n")
    with pytest.raises(RuntimeError, match="after the message ended"):
        await result(task.defer)
    assert listing(maildir_path) == {"tmp": [], "new": [], "cur": []}


@pytest.mark.asyncio
async def test_a_second_start_up_delivers_nothing_more(maildir_path: Path) -> None:
    """startUp() twice: one message, written once (the bytes were consumed)."""
    mbox = compat.MaildirMailbox(str(maildir_path))
    task = Task(mbox, b"once\n")
    task.startUp()
    task.startUp()
    assert await result(task.defer) is None
    [name] = listing(maildir_path)["new"]
    assert (maildir_path / "new" / name).read_bytes() == b"once\n"


@pytest.mark.asyncio
async def test_a_failing_write_override_fails_defer(maildir_path: Path) -> None:
    """An overridden write() that raises fails ``defer`` (not the appendMessage caller)."""

    class Broken(Task):
        def write(self, data: bytes) -> None:
            raise ValueError("write refused")

    mbox = compat.MaildirMailbox(str(maildir_path))
    mbox.AppendFactory = Broken
    d = mbox.appendMessage(b"Subject: x\n\nbody\n")
    with pytest.raises(ValueError, match="write refused"):
        await result(d)
    assert not maildir_path.exists() or listing(maildir_path)["new"] == []


@pytest.mark.asyncio
async def test_a_replaced_msg_is_the_one_delivered(maildir_path: Path) -> None:
    """``msg`` swapped for another file before startUp(): that file is what gets delivered."""
    task = Task(compat.MaildirMailbox(str(maildir_path)), b"original\n")
    task.msg = io.BytesIO(b"replacement\n")
    task.startUp()
    assert await result(task.defer) is None
    [name] = listing(maildir_path)["new"]
    assert (maildir_path / "new" / name).read_bytes() == b"replacement\n"


@pytest.mark.asyncio
async def test_open_call_refuses_a_second_cancel_like_a_delayed_call() -> None:
    """``openCall`` (an asyncio handle here) refuses to cancel what ran or was cancelled."""
    from compat import _twisted

    loop = asyncio.get_running_loop()
    ran: list[int] = []
    call = _twisted.call_soon(loop, lambda: ran.append(1))
    assert call.active()
    await asyncio.sleep(0)
    assert ran == [1]
    assert not call.active()
    with pytest.raises(Exception, match="already ran") as info:
        call.cancel()
    assert type(info.value).__name__ in ("AlreadyCalled", "RuntimeError")
    other = _twisted.call_soon(loop, lambda: ran.append(2))
    other.cancel()
    assert not other.active()
    with pytest.raises(Exception, match="already cancelled"):
        other.cancel()
    await asyncio.sleep(0)
    assert ran == [1]


@pytest.mark.asyncio
async def test_as_future_is_the_one_await_with_or_without_twisted(maildir_path: Path) -> None:
    """compat.as_future(d) awaits appendMessage's Deferred whichever kind it is (here a Twisted
    one when Twisted is installed), with the result or the original error."""
    mbox = compat.MaildirMailbox(str(maildir_path))
    d = mbox.appendMessage(b"Subject: as_future\n\nbody\n")
    kind = "twisted.internet.defer" if compat.HAVE_TWISTED else "compat._deferred"
    assert type(d).__module__ == kind
    assert await compat.as_future(d) is None
    assert len(listing(maildir_path)["new"]) == 1

    class NoSpace(Task):
        def oswrite(self, fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "injected ENOSPC")

    mbox.AppendFactory = NoSpace
    with pytest.raises(OSError, match="injected ENOSPC"):
        await compat.as_future(mbox.appendMessage(b"x"))
    with pytest.raises(TypeError, match="takes a Deferred"):
        compat.as_future(b"not a deferred")


def test_as_future_needs_a_running_loop() -> None:
    """Outside an asyncio loop as_future says so instead of failing later."""
    d = compat.Deferred[None]()
    with pytest.raises(RuntimeError, match="running asyncio event loop"):
        compat.as_future(d)


@pytest.mark.asyncio
async def test_write_copies_a_mutable_buffer(maildir_path: Path) -> None:
    """write() of a bytearray or memoryview keeps the bytes as they were at the call."""
    task = Task(compat.MaildirMailbox(str(maildir_path)), io.BytesIO())
    buf = bytearray(b"Subject: buffer\n\n")
    task.write(buf)
    buf[:] = b"X" * len(buf)  # the caller reuses its buffer at once
    view = memoryview(bytearray(b"body\n"))
    task.write(view)
    view[:] = b"YYYY\n"
    task.moveFileToNew()
    assert await compat.as_future(task.defer) is None
    (name,) = listing(maildir_path)["new"]
    assert (maildir_path / "new" / name).read_bytes() == b"Subject: buffer\n\nbody\n"


def test_a_pump_cancelled_by_the_loop_s_shutdown_fails_defer(tmp_path: Path) -> None:
    """asyncio.run() ending under a started task cancels its pump: defer fails, nothing stays."""
    outcomes: list[Any] = []

    async def main() -> None:
        task = Task(compat.MaildirMailbox(str(tmp_path / "Maildir")), io.BytesIO())
        task.defer.addBoth(outcomes.append)
        task.write(b"Subject: left behind\n\n")  # the pump waits for the end, forever

    asyncio.run(main())
    (failure,) = outcomes
    assert isinstance(failure.value, asyncio.CancelledError | type(_twisted.cancelled_error()))
    assert not (tmp_path / "Maildir" / "new").exists() or not listing(tmp_path / "Maildir")["new"]


# -- the task's lifecycle under random calls ----------------------------------------------


class TaskMachine(RuleBasedStateMachine):
    """Random calls on a real task: defer fires once, with the bytes written or nothing left.

    A success holds exactly the bytes written; a failure leaves no tmp file and at most the
    complete message (when abandoned after its link).
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="compat-machine-"))
        self.loop = asyncio.new_event_loop()
        self.mbox = compat.MaildirMailbox(str(self.dir / "Maildir"))
        self.task = Task(self.mbox, io.BytesIO())
        self.outcomes: list[Any] = []
        self.task.defer.addCallbacks(self.outcomes.append, self.outcomes.append)
        self.written = b""
        self.ended = self.abandoned = False

    def call(self, fn: Callable[[], object]) -> bool:
        """Run *fn* on the loop, turn it once; return whether defer was unfired at the call."""
        undecided = []

        async def go() -> None:
            undecided.append(not self.outcomes)
            fn()
            await asyncio.sleep(0)

        self.loop.run_until_complete(go())
        return undecided[0]

    @rule(data=st.binary(max_size=64))
    def write(self, data: bytes) -> None:
        """write() before the end and the outcome counts; after the end it abandons."""
        if not self.call(lambda: self.task.write(data)) or self.abandoned:
            return
        if self.ended and data:
            self.abandoned = True
        elif not self.ended:
            self.written += data

    @rule()
    def end(self) -> None:
        """moveFileToNew() ends the message (a second call does nothing)."""
        self.call(self.task.moveFileToNew)
        self.ended = True

    @rule(how=st.sampled_from(["fail", "stopProducing", "cancel"]))
    def abandon(self, how: str) -> None:
        """fail(), stopProducing() or cancelling defer abandon an undecided delivery."""
        fn = self.task.defer.cancel if how == "cancel" else getattr(self.task, how)
        self.abandoned = self.call(fn) or self.abandoned

    @rule(turns=st.integers(1, 5))
    def spin(self, turns: int) -> None:
        """Let the loop (and the engine's workers) make progress."""
        self.loop.run_until_complete(asyncio.sleep(0.001 * turns))

    @invariant()
    def fires_at_most_once(self) -> None:
        """defer has at most one outcome."""
        assert len(self.outcomes) <= 1

    def teardown(self) -> None:
        """End the message if nobody did, wait for the outcome, then check the disk."""
        try:
            if not self.ended and not self.abandoned:
                self.end()
            self.loop.run_until_complete(self.settled())
            self.check()
        finally:
            self.loop.close()
            shutil.rmtree(self.dir)

    async def settled(self) -> None:
        """Wait until defer fired, the pump ended and the engine removed every tmp file."""
        tmp = self.dir / "Maildir" / "tmp"
        pump = self.task._pump
        await until(lambda: bool(self.outcomes) and (pump is None or pump.done()))
        await until(lambda: not tmp.exists() or not any(tmp.iterdir()))

    def check(self) -> None:
        """The outcome and the disk agree with the calls made."""
        new = self.dir / "Maildir" / "new"
        files = sorted(new.iterdir()) if new.exists() else []
        (outcome,) = self.outcomes
        if outcome is None:  # delivered
            assert not self.abandoned
            assert [p.read_bytes() for p in files] == [self.written]
            assert self.mbox.list == [str(files[0])]
            return
        assert self.abandoned or not self.written, outcome
        assert len(files) <= 1  # abandoned after the link: the complete message stays
        assert [p.read_bytes() for p in files] in ([], [self.written])
        assert self.mbox.list == []


TestTaskMachine = TaskMachine.TestCase
TestTaskMachine.settings = settings(max_examples=40, stateful_step_count=12, deadline=None)
