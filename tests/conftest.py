"""Shared fixtures: real maildirs under tmp_path, both anyio backends, fault tables."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from maildrop import DEFAULT_SYSCALLS, Syscalls


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every ``@pytest.mark.anyio`` test on asyncio and on trio."""
    return str(request.param)


@pytest.fixture
def maildir_path(tmp_path: Path) -> Path:
    """A path where a maildir may be created (it does not exist yet)."""
    return tmp_path / "Maildir"


def listing(md: Path) -> dict[str, list[str]]:
    """Return the sorted entries of tmp/, new/ and cur/ (missing dirs list as empty)."""
    out: dict[str, list[str]] = {}
    for sub in ("tmp", "new", "cur"):
        d = md / sub
        out[sub] = sorted(os.listdir(d)) if d.is_dir() else []
    return out


#: What each event loop's worker pool (an eventfd) and io_uring ring (a ring and an eventfd)
#: hold until the garbage collector gets to the loop.
_PER_LOOP_FDS = ("anon_inode:[eventfd]", "anon_inode:[io_uring]")


def open_fds() -> set[int]:
    """Return the set of this process's open file descriptors, but event loops' eventfds
    and io_uring rings.

    Each event loop's worker pool owns one eventfd (and its io_uring ring, if it has one, a
    ring fd and an eventfd), closed when the loop object is
    collected (whenever the garbage collector gets to an earlier test's loop);
    ``tests/test_pipeline.py`` checks that those do not pile up.
    """
    fds = set()
    for n in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{n}") in _PER_LOOP_FDS:
                continue
        except FileNotFoundError:  # the fd listdir itself used
            continue
        fds.add(int(n))
    return fds


class HeldCall:
    """A syscall-table entry that blocks in its worker thread until ``release`` is set.

    ``entered`` is set as soon as a call gets there; the real *call* runs once released
    (or after *timeout* seconds, so a failing test cannot hang a worker forever).
    """

    def __init__(self, call: Callable[..., Any], timeout: float = 10.0) -> None:
        self.call = call
        self.timeout = timeout
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.calls = 0  # calls that got here so far

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.calls += 1
        self.entered.set()
        self.release.wait(self.timeout)
        return self.call(*args, **kwargs)


async def wait_for(ev: threading.Event) -> None:
    """Poll a threading.Event from the loop (a worker thread sets it), for up to 5 s."""
    await settle(ev.is_set, "a worker thread's event")


async def settle(cond: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    """Wait (bounded) until *cond()* holds, e.g. for a worker to finish its cleanup."""
    with anyio.move_on_after(seconds):
        while not cond():  # noqa: ASYNC110 - polled state belongs to worker threads
            await anyio.sleep(0.002)
        return
    raise AssertionError(f"timed out waiting for {what}")


class Faults:
    """Build a syscall table whose named step fails on its k-th call (1-based)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def failing(
        self, step: str, *, when: int = 1, err: int = errno.EIO, times: int = 1
    ) -> Syscalls:
        real: Callable[..., Any] = getattr(DEFAULT_SYSCALLS, step)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                n = self.calls[step] = self.calls.get(step, 0) + 1
            if when <= n < when + times:
                if step in ("close", "close_dir"):
                    # Linux releases the fd even when close() reports an error.
                    real(*args, **kwargs)
                raise OSError(err, f"injected {errno.errorcode[err]} in {step}")
            return real(*args, **kwargs)

        return DEFAULT_SYSCALLS.replace(**{step: wrapper})


@pytest.fixture
def faults() -> Faults:
    """A fresh fault-table builder."""
    return Faults()


#: The engine's test modules: each of their tests runs on the thread backend and on the
#: io_uring backend (asyncio; trio stays on threads). The rest of the suite (servers, CLI,
#: compat, the ring driver itself) runs once, on whatever "auto" picks, to keep CI's time.
ENGINE_MODULES = frozenset(
    {
        "test_backend", "test_cancel", "test_deliver", "test_faults", "test_flags",
        "test_group_commit", "test_many", "test_memory", "test_pipeline", "test_quota",
        "test_session", "test_sources", "test_sweep", "test_transform", "test_writer",
    }
)  # fmt: skip
# Single-backend, they deliver nothing through a backend: test_api (names), test_errors,
# test_folders (pure folder names), test_handoff, test_steps, test_state (worker-side or
# pure), test_dirs; and the ring's own modules test the ring directly (test_uring*).


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Give every test of an engine module the parameter ``engine_backend``."""
    if metafunc.module.__name__.rsplit(".", 1)[-1] in ENGINE_MODULES:
        metafunc.parametrize("engine_backend", ["threads", "uring"], indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the io_uring runs of trio tests: trio has no io_uring backend."""
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        p = {} if params is None else params.params
        trio_uring = p.get("engine_backend") == "uring" and p.get("anyio_backend") == "trio"
        (drop if trio_uring else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def engine_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The backend "auto" means in this test (MAILDROP_BACKEND): an engine module's tests
    run on "threads" and on "uring" (skipped where io_uring is unavailable)."""
    choice = getattr(request, "param", "auto")
    if choice == "uring":
        from maildrop._uring import availability

        known = availability()
        if not known.ok:
            pytest.skip(f"io_uring is unavailable here: {known.reason}")
    monkeypatch.setenv("MAILDROP_BACKEND", choice)
    return str(choice)
