"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For `subprocess.Popen(preexec_fn=...)`: on Linux the child is killed (SIGKILL) when its
    parent dies, even by SIGKILL, so `pangea run` killed hard leaves no role or server behind.
    SIGKILL because a graceful stop would wait for a server that may be gone with the parent
    (roles keep their state on the bus, as after any crash).  Elsewhere it does nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
