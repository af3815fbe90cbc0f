"""Power loss on the io_uring backend: after acknowledged deliveries and before every op.

The same harness as ``test_powerloss`` (a loop-mounted ext4 or xfs image, the shutdown
ioctl with NOLOGFLUSH, a remount), with the child delivering through
``Maildir(..., backend="uring")``; the cut before an op comes from the ring's hook. The
negative control (``fsync=False`` on the ring) must lose mail, or the harness is blind.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ._harness import FIGURES
from ._uring_harness import require_uring
from .test_powerloss import ROUNDS, cut_every_call, power_cycle

pytestmark = [pytest.mark.crash, pytest.mark.powerloss]


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_uring_power_loss_right_after_deliver_returns(work: Path, fstype: str) -> None:
    """Cut after the 1st, 5th, 20th ack and after a concurrent batch: nothing acked is lost."""
    require_uring()
    acked, lost = power_cycle(work, fstype, backend="uring")
    assert lost == 0
    FIGURES["uring_powerloss_rounds"] += len(ROUNDS)
    FIGURES["uring_powerloss_acked_survived"] += acked


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_uring_power_cut_before_every_op(work: Path, fstype: str) -> None:
    """The power fails right before each op of three deliveries while the process goes on."""
    require_uring()
    # A small message, a one-step stream and one of two ~1 MiB batches (linked from its fd).
    plan = [["bytes", 700], ["chunks", 200_000], ["chunks", 1_200_000]]
    points, lost = cut_every_call(work, fstype, backend="uring", plan=plan)
    assert lost == 0
    FIGURES["uring_powerloss_rounds"] += points


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_auto_power_loss_right_after_deliver_returns(work: Path, fstype: str) -> None:
    """The default backend mixes the ring and threads in the concurrent round (their links
    share one group commit): nothing acked is lost."""
    require_uring()
    acked, lost = power_cycle(work, fstype, backend="auto")
    assert lost == 0
    FIGURES["uring_powerloss_rounds"] += len(ROUNDS)
    FIGURES["uring_powerloss_acked_survived"] += acked


def test_uring_power_loss_harness_is_not_blind(work: Path) -> None:
    """Negative control: the io_uring backend without fsync loses acked mail here."""
    require_uring()
    acked, lost = power_cycle(work, "ext4", fsync=False, backend="uring")
    assert lost > 0, f"{acked} acked, none lost: the power-loss harness is blind"
    FIGURES["uring_negative_control_losses"] += lost
