"""Ownership of a delivery's files (``maildrop._handoff``): one owner at a time, no waiting."""

from __future__ import annotations

from pathlib import Path

import pytest

from maildrop import DEFAULT_SYSCALLS
from maildrop._dirs import Settings
from maildrop._handoff import abort, as_step, cleanup, owner, run_owned
from maildrop._state import Owner
from maildrop._writer import Aborted, DeliveryFiles


def _tmp(path: Path) -> DeliveryFiles:
    return DeliveryFiles(Settings(str(path), None, True, True, DEFAULT_SYSCALLS), "new")


def test_aborting_what_never_opened_anything_needs_no_cleanup(tmp_path: Path) -> None:
    """Nothing opened: the abort marks the files cleaned at once, no job."""
    tmp = _tmp(tmp_path / "m")
    assert abort(tmp, keep_published=False) is Owner.CLEANED
    assert owner(tmp) is Owner.CLEANED
    assert not (tmp_path / "m").exists()


def test_aborting_idle_open_files_hands_them_to_a_cleanup_job(tmp_path: Path) -> None:
    """Open directories and a tmp file, nobody inside a call: a cleanup job removes them."""
    tmp = _tmp(tmp_path / "m")
    tmp.open_dirs()
    tmp.create()
    assert abort(tmp, keep_published=False) is Owner.CLEANUP
    cleanup(tmp)
    assert owner(tmp) is Owner.CLEANED
    assert tmp.dir_fds == []
    assert list((tmp_path / "m" / "tmp").iterdir()) == []


def test_a_worker_inside_a_call_keeps_the_files_and_cleans_up_itself(tmp_path: Path) -> None:
    """Aborted during a step: no other owner gets in, and the step's end removes the files."""
    tmp = _tmp(tmp_path / "m")
    seen: list[Owner] = []

    def step() -> None:
        tmp.open_dirs()
        tmp.create()
        seen.append(abort(tmp, keep_published=False))  # as the loop would, meanwhile
        seen.append(Owner.WORKER if not run_owned(tmp, tmp.close_dirs) else Owner.CALLER)

    as_step(tmp, step)()
    assert seen == [Owner.WORKER, Owner.WORKER]
    assert owner(tmp) is Owner.CLEANED
    assert list((tmp_path / "m" / "tmp").iterdir()) == []


def test_a_step_of_an_aborted_delivery_never_runs(tmp_path: Path) -> None:
    """Once aborted, a queued step raises Aborted without calling its function."""
    tmp = _tmp(tmp_path / "m")
    abort(tmp, keep_published=False)
    called: list[int] = []
    with pytest.raises(Aborted, match=r"^$"):
        as_step(tmp, called.append, 1)()
    assert called == []


def test_a_failed_step_removes_its_files(tmp_path: Path) -> None:
    """A step that raises leaves nothing: its worker cleans up before the error leaves it."""
    tmp = _tmp(tmp_path / "m")

    def step() -> None:
        tmp.open_dirs()
        tmp.create()
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        as_step(tmp, step)()
    assert owner(tmp) is Owner.CLEANED
    assert list((tmp_path / "m" / "tmp").iterdir()) == []
