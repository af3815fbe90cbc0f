"""``record``: a frozen dataclass without importing dataclasses, and compatible with it."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from maildrop import Outcome, Quota, Syscalls
from maildrop._record import FrozenRecordError, record, replace
from maildrop._writer import Settings


@record(frozen=True, slots=True)
class Point:
    """A test record."""

    x: int
    y: int = 0


def test_behaves_like_a_frozen_dataclass() -> None:
    """Init (positional, keyword, default), repr, eq, hash, match, frozen."""
    p = Point(1, y=2)
    assert p == Point(x=1, y=2)
    assert p != Point(1)
    assert p != (1, 2)
    assert hash(p) == hash(Point(1, 2))
    assert repr(p) == "Point(x=1, y=2)"
    assert Point(3).y == 0
    match p:
        case Point(a, b):
            assert (a, b) == (1, 2)
    with pytest.raises(FrozenRecordError, match="cannot assign to field 'x'"):
        p.x = 5  # type: ignore[misc]
    with pytest.raises(FrozenRecordError, match="cannot delete field 'x'"):
        del p.x  # type: ignore[misc]
    assert not hasattr(p, "__dict__")


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "missing required argument: 'x'"),
        ((1, 2, 3), {}, "takes 2 arguments"),
        ((1,), {"z": 2}, "unexpected keyword argument 'z'"),
        ((1,), {"x": 2}, "multiple values for argument 'x'"),
    ],
)
def test_bad_arguments(args: tuple[int, ...], kwargs: dict[str, int], message: str) -> None:
    """Wrong arguments raise TypeError as a dataclass would."""
    with pytest.raises(TypeError, match=message):
        Point(*args, **kwargs)


def test_only_frozen_slotted_records() -> None:
    """A mutable or dict-backed record is refused (the runtime only builds frozen ones)."""
    with pytest.raises(TypeError, match="frozen, slotted"):
        record(frozen=False)


def test_dataclasses_functions_work_on_records() -> None:
    """fields(), replace(), is_dataclass() and post-init validation, as for a dataclass."""
    assert dataclasses.is_dataclass(Syscalls)
    assert [f.name for f in dataclasses.fields(Point)] == ["x", "y"]
    assert dataclasses.replace(Point(1, 2), y=5) == Point(1, 5)
    cfg = Settings("/m", None, True, True, Syscalls())
    assert dataclasses.replace(cfg, fsync=False).fsync is False
    assert "open" in [f.name for f in dataclasses.fields(Syscalls)]
    with pytest.raises(ValueError, match="positive int"):
        Quota(bytes=0)


def test_replace_copies_with_changes() -> None:
    """replace() keeps the other fields, leaves the original alone, refuses unknown names."""
    p = Point(1, 2)
    assert replace(p, y=5) == Point(1, 5)
    assert replace(p) == p
    assert p == Point(1, 2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        replace(p, z=3)


def test_copy_and_pickle() -> None:
    """Records copy and pickle (frozen fields are restored without __setattr__)."""
    o = Outcome(True, 451, "4.3.0", "Local error", 75)
    assert copy.copy(o) == o
    assert pickle.loads(pickle.dumps(o)) == o
    assert copy.deepcopy(Quota(5, 6)) == Quota(5, 6)


def test_syscalls_replace_refuses_unknown_entries() -> None:
    """A typo in replace() is an error, not a silently ignored hook."""
    with pytest.raises(TypeError, match="no entry 'fsnyc'"):
        Syscalls().replace(fsnyc=None)
