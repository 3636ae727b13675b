"""Injected kill points, for the interruption tests: with ``MKA_EDGE_KILL_AT=NAME[,NAME...]`` in
the environment, a process that reaches a point of that name kills itself with SIGKILL, the one
signal nothing can clean up after.  Why not timed kills: a point names the exact moment (mid-way
through a write, just before or after the final rename), so a test is deterministic.  Unset (every
user's case) a point costs one dictionary lookup."""

from __future__ import annotations

import os
import signal

ENV = "MKA_EDGE_KILL_AT"


def killpoint(name: str) -> None:
    wanted = os.environ.get(ENV)
    if wanted and name in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)


FAIL_ENV = "MKA_EDGE_FAIL_AT"


def failpoint(name: str) -> None:
    """With ``MKA_EDGE_FAIL_AT=NAME``, a write failing for lack of space at this point (the disk-full
    tests' simulated failure; a real small filesystem is tested where one can be mounted)."""
    wanted = os.environ.get(FAIL_ENV)
    if wanted and name in wanted.split(","):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device (injected by MKA_EDGE_FAIL_AT)")
