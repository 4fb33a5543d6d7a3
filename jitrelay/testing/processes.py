"""Helpers for the child processes the tools (bench, soak) start."""

from __future__ import annotations

import ctypes
import signal
from collections.abc import Callable

_PRCTL: Callable[..., int] | None
try:
    _PRCTL = ctypes.CDLL(None).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies, so nothing outlives a crashed tool."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
