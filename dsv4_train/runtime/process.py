"""Tie a process's life to its parent's (Linux `PR_SET_PDEATHSIG`): used by training workers under
torchrun and by the checkpoint writer's manager process, so a kill -9 leaves nothing running."""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (no-op off Linux)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
