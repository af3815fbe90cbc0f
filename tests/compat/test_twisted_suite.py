"""Twisted's own twisted.mail tests, unmodified, pass with the shim as with the stock task."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from ._util import HAVE_TWISTED, finish, needs_twisted, start

APPEND = "twisted.mail.test.test_mail.MaildirAppendStringTests."


def _twisted_version() -> tuple[int, ...]:
    return tuple(int(p) for p in metadata.version("twisted").split(".")[:2] if p.isdigit())


@needs_twisted
@pytest.mark.skipif(
    HAVE_TWISTED and _twisted_version() < (25, 5),
    reason="Twisted's append tests run on Python 3 only since Twisted 25.5",
)
def test_twisted_mail_suite_passes_with_the_shim(tmp_path: Path) -> None:
    """Every test of test_mail that passes with Twisted's task passes with the shim."""
    (tmp_path / "stock").mkdir()
    (tmp_path / "shim").mkdir()
    # Both in parallel: each is mostly waiting on Twisted's timing-based tests.
    stock_proc = start("_run_twisted_mail.py", "stock", cwd=tmp_path / "stock")
    shim_proc = start("_run_twisted_mail.py", "shim", cwd=tmp_path / "shim")
    stock, shim = finish(stock_proc), finish(shim_proc)
    passed_stock = {t for t, o in stock.items() if o == "pass"}
    passed_shim = {t for t, o in shim.items() if o == "pass"}
    assert len(passed_stock) > 50
    assert passed_stock - passed_shim == set()
    assert set(shim) == set(stock)
    # The tests that exercise the append task itself (test_append fails open, write and
    # rename through FailingMaildirMailboxAppendMessageTask, a subclass of the shim here).
    assert shim[APPEND + "test_append"] == "pass"
    assert shim[APPEND + "test_reopenMailbox"] == "pass"
