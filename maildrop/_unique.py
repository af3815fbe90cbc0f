"""Unique base names for message files: ``<sec>.M<usec>P<pid>Q<n>R<rand>.<host>``.

The clock and the pid are read for every name; the host name at most once a second; the
random part comes from ``os.urandom`` for 64 names at a time. Each of those reads is a
syscall that gives up the GIL in a worker thread, and the event loop's thread then waits to
get it back. A forked child starts its own counter lock and random bytes, so it never
repeats its parent's random parts. The rules of the name are :mod:`maildrop._naming`'s.
"""

from __future__ import annotations

import _thread
import os
import time

from ._naming import escape_host, escaped_name

__all__ = ["hostname", "new_name"]

_counter_lock = _thread.allocate_lock()
_counter = 0


def hostname() -> str:
    """Return this host's name: what ``socket.gethostname()`` returns on Linux (both read
    uname), without loading the socket extension module at start-up."""
    return os.uname().nodename


#: Names whose random ``R`` part one ``os.urandom`` read gives.
_RANDOM_NAMES = 64
_random = b""
_random_at = 0
#: The host name (escaped) and the second it was read: names read it again once a second.
_host = ("", -1)


def _after_fork() -> None:
    global _counter_lock, _random
    _counter_lock = _thread.allocate_lock()
    _random = b""  # the child never repeats the parent's random parts


os.register_at_fork(after_in_child=_after_fork)


def new_name() -> str:
    """Return a fresh unique base name (clock and pid read now, the host name at most a
    second old, random bits never shared with a forked process)."""
    global _counter, _random, _random_at, _host
    with _counter_lock:
        _counter += 1
        n = _counter
        if _random_at >= len(_random):
            _random, _random_at = os.urandom(8 * _RANDOM_NAMES), 0
        rand = int.from_bytes(_random[_random_at : _random_at + 8], "little")
        _random_at += 8
        now = time.time_ns() // 1000
        sec = now // 1_000_000
        if _host[1] != sec:
            _host = (escape_host(hostname()), sec)
        host = _host[0]
    return escaped_name(sec, now % 1_000_000, os.getpid(), n, rand, host)
