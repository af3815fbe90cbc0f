"""The engine's backend (``maildrop._backend``): one object per loop, context reaches workers."""

from __future__ import annotations

import contextvars
from pathlib import Path

import anyio
import pytest

from maildrop import Maildir, _backend
from maildrop._session import DeliverySession
from maildrop._writer import DeliveryFiles

_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("_VAR", default="unset")


@pytest.mark.anyio
async def test_contextvars_reach_the_workers(anyio_backend: str) -> None:
    """A context variable set by the caller is seen by its steps, on asyncio and on trio."""
    _VAR.set(anyio_backend)
    backend = _backend.current()
    assert await backend.run(_VAR.get) == anyio_backend
    pending = backend.submit(_VAR.get)
    if pending is not None:
        assert await pending == anyio_backend
    seen: list[str] = []
    await backend.run_each(lambda _: seen.append(_VAR.get()), [1, 2])
    assert seen == [anyio_backend] * 2
    done = anyio.Event()
    backend.spawn(lambda: seen.append(_VAR.get()), done=lambda _: done.set())
    with anyio.fail_after(5):
        await done.wait()
    assert seen[-1] == anyio_backend


@pytest.mark.anyio
async def test_one_backend_per_loop(anyio_backend: str) -> None:
    """Every call on one event loop gets the same backend, of the loop's kind."""
    first = _backend.current()
    assert _backend.current() is first
    kind = _backend.PoolBackend if anyio_backend == "asyncio" else _backend.AnyioBackend
    assert isinstance(first, kind)


@pytest.mark.anyio
async def test_a_spawned_job_reports_its_error(anyio_backend: str) -> None:
    """A spawned job's exception is handed to its done callback."""
    got: list[BaseException | None] = []
    done = anyio.Event()

    def fail() -> None:
        raise OSError(5, "boom")

    def finish(error: BaseException | None) -> None:
        got.append(error)
        done.set()

    _backend.current().spawn(fail, done=finish)
    with anyio.fail_after(5):
        await done.wait()
    assert isinstance(got[0], OSError)


@pytest.mark.anyio
async def test_a_staged_message_runs_steps_on_its_file(tmp_path: Path, anyio_backend: str) -> None:
    """stage() leaves the message in tmp/; run_staged() hands its file to a step."""
    md = Maildir(tmp_path / "m")
    session = md.open_delivery()
    async with session:
        await session.write(b"hello\n")
        await session.stage()
        assert len(list((tmp_path / "m" / "tmp").iterdir())) == 1

        def size(staged: DeliveryFiles) -> int:
            return staged.size

        assert await session.run_staged(size) == 6
        with pytest.raises(RuntimeError, match="cannot commit: this delivery was already staged"):
            await session.commit()
    assert list((tmp_path / "m" / "tmp").iterdir()) == []
    assert list((tmp_path / "m" / "new").iterdir()) == []


@pytest.mark.anyio
async def test_a_failing_staged_step_aborts_the_delivery(
    tmp_path: Path, anyio_backend: str
) -> None:
    """An exception of a staged step is raised and removes the staged message."""
    session = Maildir(tmp_path / "m").open_delivery()
    await session.write(b"x")
    await session.stage()

    def boom(staged: DeliveryFiles) -> None:
        raise ValueError("step failed")

    with pytest.raises(ValueError, match="step failed"):
        await session.run_staged(boom)
    assert session.closed
    assert isinstance(session.error, ValueError)
    await session.abort()
    assert list((tmp_path / "m" / "tmp").iterdir()) == []
    with pytest.raises(RuntimeError, match="cannot run a step"):
        await session.run_staged(boom)


@pytest.mark.anyio
async def test_writing_during_a_commit_is_refused(tmp_path: Path, anyio_backend: str) -> None:
    """Bytes written once commit() began would be left out: write() refuses them."""
    session: DeliverySession = Maildir(tmp_path / "m").open_delivery()
    await session.write(b"x")
    async with anyio.create_task_group() as tg:
        tg.start_soon(session.commit)
        await anyio.wait_all_tasks_blocked()  # the commit is running (or done: refused too)
        with pytest.raises(RuntimeError, match="cannot write: this delivery was already committ"):
            await session.write(b"late")
    assert session.closed
