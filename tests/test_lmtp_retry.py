"""The SMTP retry memory: bounded in time and size, keyed by sender and message bytes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from maildrop._lmtp_retry import digest
from maildrop.lmtp import RetryMemory


def key(sender: str, body: bytes) -> bytes:
    """The digest of a message."""
    h = digest(sender)
    h.update(body)
    return h.digest()


def test_remembers_until_the_ttl() -> None:
    """An entry is found (and its sender expected) until its time is up."""
    mem = RetryMemory(ttl=10)
    k = key("s@x", b"body")
    mem.remember(k, "s@x", frozenset({"/m/alice"}), now=100)
    assert mem.expect("s@x", 105)
    assert not mem.expect("t@x", 105)
    assert mem.delivered(k, 109) == {"/m/alice"}
    assert mem.delivered(k, 110) == frozenset()
    assert not mem.expect("s@x", 110)
    assert len(mem) == 0


def test_digest_covers_sender_and_bytes() -> None:
    """Another sender or other bytes make another message."""
    assert key("s@x", b"a") != key("t@x", b"a")
    assert key("s@x", b"a") != key("s@x", b"b")
    assert key("s@", b"xa") != key("s@x", b"a")


def test_remembering_nothing_forgets() -> None:
    """A retry that reached everyone forgets the message."""
    mem = RetryMemory()
    mem.remember(b"k", "s@x", frozenset({"/m/a"}), now=0)
    mem.remember(b"k", "s@x", frozenset(), now=1)
    assert len(mem) == 0
    assert not mem.expect("s@x", 1)


@given(st.lists(st.tuples(st.binary(max_size=2), st.sampled_from(["a", "b", "c"])), max_size=60))
def test_never_holds_more_than_max_entries(entries: list[tuple[bytes, str]]) -> None:
    """The oldest entries go first; what is kept (and its senders) matches a model."""
    mem = RetryMemory(max_entries=5)
    model: dict[bytes, str] = {}
    for i, (k, sender) in enumerate(entries):
        mem.remember(k, sender, frozenset({"/m"}), now=i)
        model.pop(k, None)
        model[k] = sender
        while len(model) > 5:
            del model[next(iter(model))]
        assert len(mem) == len(model)
    now = len(entries)
    for k, _ in entries:
        assert bool(mem.delivered(k, now)) == (k in model)
    for sender in "abc":
        assert mem.expect(sender, now) == (sender in model.values())
