"""The result of a delivery: an immutable (path, name, size) with its Path made on use."""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import pytest

from maildrop import Delivery, Maildir

pytestmark = pytest.mark.anyio


def test_fields_equality_hash_and_repr() -> None:
    """Two deliveries with the same fields are equal (a str or a Path alike) and hash alike;
    the repr is the dataclass-style one it always was."""
    a = Delivery("/m/new/x", "x", 5)
    b = Delivery(Path("/m/new/x"), "x", 5)
    assert a == b
    assert hash(a) == hash(b)
    assert a != Delivery("/m/new/x", "x", 6)
    assert a != ("/m/new/x", "x", 5)
    assert (a.path, a.name, a.size) == (Path("/m/new/x"), "x", 5)
    assert repr(a) == "Delivery(path=PosixPath('/m/new/x'), name='x', size=5)"


def test_the_path_is_made_once_and_fspath_needs_none() -> None:
    """os.fspath gives the string without making a Path; .path makes one and keeps it."""
    d = Delivery("/m/new/x", "x", 1)
    assert os.fspath(d) == "/m/new/x"
    assert d._path is None
    assert d.path is d.path


def test_it_cannot_be_changed() -> None:
    """Assigning or deleting a field fails, as on the frozen dataclass it replaces."""
    d = Delivery("/m/new/x", "x", 1)
    with pytest.raises(AttributeError, match="immutable"):
        d.size = 2  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        del d.name


def test_pickle_copy_and_match() -> None:
    """It pickles and copies to an equal value, and matches positionally."""
    d = Delivery("/m/new/x", "x", 3)
    assert pickle.loads(pickle.dumps(d)) == d
    assert copy.copy(d) == d
    assert copy.deepcopy(d) == d
    match d:
        case Delivery(path, name, size):
            assert (path, name, size) == (Path("/m/new/x"), "x", 3)


async def test_a_real_delivery_says_where_it_is(tmp_path: Path) -> None:
    """deliver() returns the file in new/, its name and its size."""
    d = await Maildir(tmp_path / "m").deliver(b"hello\n")
    assert d.path == tmp_path / "m" / "new" / d.name
    assert d.path.read_bytes() == b"hello\n"
    assert d.size == 6
