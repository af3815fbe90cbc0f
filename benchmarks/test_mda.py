"""The MDA benchmark runs end to end at toy sizes (its timings are not checked)."""

from __future__ import annotations

import pytest

from . import mda


def test_mda_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m benchmarks.mda --smoke`` prints both sizes, the targets and the floors."""
    assert mda.main(["--smoke", "--no-install"]) == 0  # in /tmp: dovecot-lda runs as nobody
    out = capsys.readouterr().out
    for text in ("2 KiB messages", "100 KiB messages", "### Targets", "do-nothing console"):
        assert text in out
    assert "| maildrop deliver |" in out


def test_message_has_the_size_and_a_from_line() -> None:
    """The benchmark message is exactly the size asked, with Postfix's From line."""
    for size in mda.SIZES.values():
        msg = mda.message(size)
        assert len(msg) == size
        assert msg.startswith(b"From ")
