"""The relay harness the tests use: the one in ``jitrelay.testing.relay`` (the tools use it too), and its type."""

from __future__ import annotations

from collections.abc import Callable

from jitrelay.testing.relay import READY_TIMEOUT, ProcessFailed, RelayProcess, relay_environ

StartRelay = Callable[..., RelayProcess]

__all__ = ["READY_TIMEOUT", "ProcessFailed", "RelayProcess", "StartRelay", "relay_environ"]
