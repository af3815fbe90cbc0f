"""Maildir++ folder-name validation and encoding."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maildrop import InvalidFolderNameError
from maildrop._folders import (
    encode_folder_name,
    folder_dirname,
    has_control,
)
from maildrop._lmtp_deliver import mailbox_name

EMPTY_LEVEL = "it has an empty level"
CONTROL = "control characters"
RESERVED = "'(tmp|new|cur)' is reserved by the maildir layout"
#: Each bad name and (a regular expression of) why it is refused.
BAD = {
    "": "it is empty", ".": EMPTY_LEVEL, "..": EMPTY_LEVEL, "a..b": EMPTY_LEVEL,
    ".x": EMPTY_LEVEL, "x.": EMPTY_LEVEL, "a/b": "'/' is not allowed",
    "../x": "'/' is not allowed", "a\0b": CONTROL, "~x": "a leading '~' is not allowed",
    "tmp": RESERVED, "new": RESERVED, "cur": RESERVED, "Lists.tmp": RESERVED, "a\nb": CONTROL,
    "x" * 300: "longer than 255 bytes once encoded", "a\x7fb": CONTROL, "a\x85b": CONTROL,
    "a\x9fb": CONTROL,
}  # fmt: skip


@pytest.mark.parametrize(("name", "why"), BAD.items())
def test_bad_names_are_refused(name: str, why: str) -> None:
    """Each malformed or reserved name raises InvalidFolderNameError (also a ValueError)."""
    with pytest.raises(InvalidFolderNameError, match=f"^invalid folder name .*: {why}"):
        folder_dirname(name)
    with pytest.raises(ValueError, match="folder name"):
        folder_dirname(name)


@given(st.text(max_size=8))
def test_control_characters_are_unicodes_cc(text: str) -> None:
    """has_control() is true exactly when a character is of Unicode category Cc."""
    assert has_control(text) == any(unicodedata.category(ch) == "Cc" for ch in text)


@pytest.mark.parametrize(
    ("name", "why"),
    [("a\x85", CONTROL), ("a\x00", CONTROL), ("a\x7f", CONTROL), ("x" * 256, "longer than 255")],
)
def test_folder_and_mailbox_names_share_their_rules(name: str, why: str) -> None:
    """A control character or an over-long entry refuses a folder and a mailbox alike."""
    with pytest.raises(InvalidFolderNameError, match=why):
        folder_dirname(name)
    assert mailbox_name(f"{name}@example.org") is None


def test_non_str_names_are_refused() -> None:
    """bytes are not folder names."""
    with pytest.raises(InvalidFolderNameError, match="must be a str"):
        folder_dirname(b"x")  # type: ignore[arg-type]


def test_good_names_map_to_dot_dirs() -> None:
    """'Lists.python' lives in '.Lists.python'."""
    assert folder_dirname("Lists.python") == ".Lists.python"
    assert folder_dirname("INBOX") == ".INBOX"


def test_modified_utf7() -> None:
    """Non-ASCII and '&' are stored in IMAP modified UTF-7, as Courier and Dovecot do."""
    assert encode_folder_name("Entwürfe") == "Entw&APw-rfe"
    assert encode_folder_name("R&D") == "R&-D"
    assert encode_folder_name("日本語") == "&ZeVnLIqe-"


@given(st.text())
def test_any_accepted_name_stays_inside_the_maildir(name: str) -> None:
    """Whatever is accepted is one hidden path component: never '/', '..' or NUL."""
    try:
        d = folder_dirname(name)
    except InvalidFolderNameError:
        return
    assert d.startswith(".")
    assert d not in (".", "..")
    assert "/" not in d
    assert "\0" not in d
    assert ".." not in d
    assert len(d.encode()) <= 255
    levels = d[1:].split(".")
    assert all(levels)
    assert not {"tmp", "new", "cur"} & set(levels)
