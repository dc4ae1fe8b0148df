"""Child processes that do not outlive their parent.

Linux's ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (kernel/sys.c): the child is sent
SIGKILL when the thread that forked it exits. Used for the runs a sweep starts
(emulator/sweep.py) and for the embedded NBD server's process
(userspace/nbd/process.py), so that neither is left behind when the process
that started it is killed. On other systems it does nothing.
"""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent() -> None:  # pragma: no cover - runs in the child, before exec
    """``preexec_fn`` for subprocess.Popen: be killed when the forking thread exits."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
