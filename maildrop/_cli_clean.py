"""The ``maildrop clean-tmp`` command: sweep stale files from every ``tmp/`` of a maildir.

A folder that cannot be swept (its ``tmp/`` is a symlink, unreadable, ...) is reported and
skipped; the others are still swept and the command then exits 75.
"""

from __future__ import annotations

import os
import time

from . import cli
from ._errors import EX_TEMPFAIL, MaildirNotFoundError
from ._quota import folder_entries
from ._sweep import sweep_tmp
from ._writer import Settings

TYPE_CHECKING = False
if TYPE_CHECKING:
    from argparse import Namespace

__all__ = ["clean_tmp"]


def _tmp_dirs(path: str) -> list[str]:
    """Return *path* and each of its Maildir++ folders that has a ``tmp/``."""
    if not os.path.isdir(os.path.join(path, "tmp")):
        raise MaildirNotFoundError(f"no maildir at {path} (it has no tmp/ directory)")
    return [path] + [
        os.path.join(path, entry)
        for entry in folder_entries(os.listdir(path))
        if os.path.isdir(os.path.join(path, entry, "tmp"))
    ]  # fmt: skip


def clean_tmp(args: Namespace) -> int:
    """Run ``maildrop clean-tmp``: sweep the maildir's and each folder's ``tmp/``."""
    path = os.path.realpath(os.path.expanduser(str(args.maildir)))
    cutoff = time.time() - args.older_than
    total = failed = 0
    for d in _tmp_dirs(path):
        try:
            removed = sweep_tmp(Settings(d, None, False, True, cli._syscalls()), cutoff)
        except OSError as exc:
            failed += 1
            cli._say(f"maildrop clean-tmp: skipped {d}: {cli.describe(exc)}")
            continue
        for name in removed:
            print(f"removed {os.path.join(d, 'tmp', name)}")
        total += len(removed)
    print(f"removed {total} stale file{'' if total == 1 else 's'} from {path}", flush=True)
    if failed:
        cli._say(
            f"maildrop clean-tmp: {failed} folder{'' if failed == 1 else 's'} could not be "
            f"cleaned (exit status {EX_TEMPFAIL})"
        )
        return EX_TEMPFAIL
    return 0
