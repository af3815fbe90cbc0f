"""Block-device helpers shared by the crash suite and its child processes (no pytest)."""

from __future__ import annotations

import os
import time


def wait_released(dev: str) -> None:
    """Wait until nothing holds the block device *dev*.

    A shut-down xfs is released a moment after umount returns; mounting before that would
    reattach the dead filesystem. Raises RuntimeError if it is still busy after ~5 s.
    """
    for _ in range(200):
        try:
            os.close(os.open(dev, os.O_RDONLY | os.O_EXCL))
            return
        except OSError:
            time.sleep(0.025)
    raise RuntimeError(f"{dev} is still busy after its unmount")
