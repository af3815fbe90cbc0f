"""One value per running event loop: :func:`per_loop`.

On asyncio the value lives in a dict weakly keyed by the loop (a closed loop, and what it
kept, can be collected; the lookup is a dict access). Elsewhere (trio) it lives in an anyio
``RunVar``, which ends with its run.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

from anyio.lowlevel import RunVar

__all__ = ["PerLoop", "per_loop", "running_loop"]

T = TypeVar("T")


def running_loop() -> asyncio.AbstractEventLoop | None:
    """Return the running asyncio loop of this thread, or None (under trio, or outside a loop)."""
    # anyio >= 4.12 no longer depends on sniffio: ask asyncio itself. Under trio there is no
    # running asyncio loop in this thread.
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class PerLoop(Generic[T]):
    """A value per event loop, made by *factory* (given the asyncio loop, or None) on first use."""

    def __init__(
        self, name: str, factory: Callable[[asyncio.AbstractEventLoop | None], T]
    ) -> None:
        self._factory = factory
        self._var: RunVar[T] = RunVar(name)
        self._weak: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(self, loop: asyncio.AbstractEventLoop | None = None) -> T:
        """Return the running loop's value (or *loop*'s, from outside it)."""
        loop = loop or running_loop()
        if loop is None:
            try:
                return self._var.get()
            except LookupError:
                value = self._factory(None)
                self._var.set(value)
                return value
        found = self._weak.get(loop)
        if found is None:
            found = self._weak[loop] = self._factory(loop)
        return found

    def made(self, loop: asyncio.AbstractEventLoop) -> T | None:
        """Return asyncio *loop*'s value if it was made, without making it."""
        return self._weak.get(loop)


def per_loop(name: str, factory: Callable[[asyncio.AbstractEventLoop | None], T]) -> PerLoop[T]:
    """Return a getter of one ``factory(loop)`` value per event loop (see :class:`PerLoop`)."""
    return PerLoop(name, factory)
