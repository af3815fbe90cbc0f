"""SMTP's partial failures: remember who already got a message, so a retry skips them.

SMTP answers a message once. When some recipients failed, the server answers ``451`` and the
client retries the whole message to every recipient; without memory, the ones already
served would get a copy per retry. :class:`RetryMemory` keeps, for a bounded time and a
bounded number of messages, a digest of each partly delivered message (its sender and
bytes) with the maildirs that hold it. Pure: the caller passes the clock.
"""

from __future__ import annotations

import collections
import hashlib

__all__ = ["RetryMemory", "digest"]


def digest(sender: str) -> hashlib.blake2b:
    """Start the digest of a message from *sender*; feed it the received bytes."""
    h = hashlib.blake2b(digest_size=20)
    h.update(sender.encode("utf-8", "surrogateescape") + b"\0")
    return h


class RetryMemory:
    """Maildirs that already hold a partly failed SMTP message, by message digest.

    Args:
        ttl: seconds an entry is kept (MTAs retry for days; the first retries come within
            hours).
        max_entries: the oldest entries go first beyond this many.
    """

    def __init__(self, *, ttl: float = 24 * 3600, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[bytes, tuple[float, str, frozenset[str]]] = (
            collections.OrderedDict()
        )
        self._senders: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def expect(self, sender: str, now: float) -> bool:
        """Whether a message from *sender* may be a retry (then deliver it so that
        recipients can still be left out at the end)."""
        self._expire(now)
        return sender in self._senders

    def delivered(self, key: bytes, now: float) -> frozenset[str]:
        """Return the maildirs that already hold the message *key*."""
        self._expire(now)
        entry = self._entries.get(key)
        return frozenset() if entry is None else entry[2]

    def remember(self, key: bytes, sender: str, paths: frozenset[str], now: float) -> None:
        """Record that *paths* hold message *key* (replacing what was known); with no
        paths, forget it."""
        self._drop(key)
        if paths:
            self._entries[key] = (now + self.ttl, sender, paths)
            self._senders[sender] += 1
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            sender = entry[1]
            self._senders[sender] -= 1
            if not self._senders[sender]:
                del self._senders[sender]

    def _expire(self, now: float) -> None:
        while self._entries:
            key, (deadline, _, _) = next(iter(self._entries.items()))
            if deadline > now:
                return
            self._drop(key)
