"""Unique base names: fresh random parts, the host name re-read each second, fork-safe."""

from __future__ import annotations

import os

import pytest

from maildrop import _unique


def _rand_and_host(name: str) -> tuple[str, str]:
    """The R part and the host part of a unique base name."""
    rest = name.split("R", 1)[1]
    rand, host = rest.split(".", 1)
    return rand, host


def test_names_take_fresh_random_parts_beyond_one_batch() -> None:
    """Names past one urandom batch still get distinct random parts, 16 hex digits each."""
    names = [_unique.new_name() for _ in range(3 * _unique._RANDOM_NAMES)]
    rands = [_rand_and_host(n)[0] for n in names]
    assert len(set(rands)) == len(rands)
    assert all(len(r) == 16 for r in rands)


def test_the_host_name_is_read_again_each_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """A renamed host shows in names from the next second on, not later."""
    clock = [1_700_000_000 * 10**9]
    monkeypatch.setattr(_unique.time, "time_ns", lambda: clock[0])
    monkeypatch.setattr(_unique, "hostname", lambda: "old")
    assert _rand_and_host(_unique.new_name())[1] == "old"
    monkeypatch.setattr(_unique, "hostname", lambda: "new")
    assert _rand_and_host(_unique.new_name())[1] == "old"  # the same second
    clock[0] += 10**9
    assert _rand_and_host(_unique.new_name())[1] == "new"


def test_a_forked_child_never_repeats_the_parents_random_parts() -> None:
    """After fork, the child's next name has a random part the parent has not used."""
    _unique.new_name()  # a batch is held now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        os.write(w, _unique.new_name().encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        child = f.read().decode()
    os.waitpid(pid, 0)
    parent = [_rand_and_host(_unique.new_name())[0] for _ in range(70)]
    assert _rand_and_host(child)[0] not in parent


def test_a_host_name_with_odd_characters_is_escaped_in_new_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """new_name escapes the host name (read once a second) as unique_name does."""
    monkeypatch.setattr(_unique, "_host", ("", -1))
    monkeypatch.setattr(_unique, "hostname", lambda: ".a/b:c")
    assert _rand_and_host(_unique.new_name())[1] == "\\056a\\057b\\072c"
