"""The pure naming rules: unique names, host escaping, size stamps and flags."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maildrop._naming import escape_host, format_flags, published_name, unique_name


@given(st.text())
def test_escaped_host_never_has_separators(host: str) -> None:
    """Whatever the hostname, the escaped form has no '/', ':', NUL or leading dot."""
    esc = escape_host(host)
    assert "/" not in esc
    assert ":" not in esc
    assert "\0" not in esc
    assert not esc.startswith(".")
    assert esc


@given(
    st.integers(0, 2**40), st.integers(0, 999_999), st.integers(1, 2**22),
    st.integers(0, 2**32), st.integers(0, 2**64 - 1), st.text(),
)  # fmt: skip
def test_unique_name_is_a_single_safe_component(
    sec: int, usec: int, pid: int, n: int, rand: int, host: str
) -> None:
    """A unique name is one path component without ':' so info suffixes stay parseable."""
    name = unique_name(sec, usec, pid, n, rand, host)
    assert "/" not in name
    assert ":" not in name
    assert "\0" not in name
    assert name.startswith(f"{sec}.M{usec}P{pid}Q{n}R")


def test_escape_host_uses_the_spec_octal_escapes() -> None:
    """'/' and ':' become \\057 and \\072, as Courier and Dovecot write them."""
    assert escape_host("a/b:c") == "a\\057b\\072c"
    assert escape_host(".hidden") == "\\056hidden"
    assert escape_host("") == "localhost"


def test_published_name_stamps_size_and_flags() -> None:
    """,S=<size> comes before the :2,<flags> info suffix."""
    assert published_name("b") == "b"
    assert published_name("b", size=12) == "b,S=12"
    assert published_name("b", size=12, flags="RS") == "b,S=12:2,RS"
    assert published_name("b", flags="") == "b:2,"


@given(st.text(alphabet="DFPRST"))
def test_flags_are_sorted_and_unique(flags: str) -> None:
    """Valid flags come back in ASCII order without duplicates."""
    out = format_flags(flags)
    assert list(out) == sorted(set(flags))


def test_invalid_flags_are_refused_with_the_valid_set() -> None:
    """An unknown flag raises ValueError naming the valid ones."""
    with pytest.raises(ValueError, match="DFPRST"):
        format_flags("Sx")
