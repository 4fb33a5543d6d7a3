"""Is the relay ready, is it healthy: the answers ``/readyz`` and ``/healthz`` give, and the heartbeat behind them.

Ready means every listener accepts: ``serve`` says so once it has started
them all. Healthy means the event loop turns and the journal writes. The
loop's part is a heartbeat: a timer on the loop stamps ``time.monotonic()``
every ``BEAT_SECONDS``, and the HTTP thread, which runs whatever the loop
does, reads the stamp; older than ``stall_seconds`` means the loop is stuck
(a blocked write, a runaway batch) and nothing is being forwarded. The
journal's part is ``Journal.failure``: set by an append or fsync that
failed, cleared by the next append that succeeds. The same timer sends the
service manager's watchdog pings (``notify.Notifier``), so those stop when
the loop does.

The verdict itself (``verdict``) is a pure function of those readings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from jitrelay.server.journal import Journal
from jitrelay.server.notify import Notifier

BEAT_SECONDS = 0.25  # how often the event loop stamps the heartbeat
STALL_SECONDS = 2.0  # a heartbeat older than this: the loop has stopped turning


def verdict(now: float, last_beat: float, stall_seconds: float, journal_failure: str | None) -> tuple[bool, str]:
    """Healthy or not, and a line saying why, from the heartbeat's age and the journal's last failure."""
    age = now - last_beat
    if age > stall_seconds:
        return False, f"unhealthy: the event loop last turned {age:.1f} s ago (limit {stall_seconds:g} s)"
    if journal_failure is not None:
        return False, f"unhealthy: the journal cannot write: {journal_failure}"
    return True, "ok"


class Health:
    """The relay's readiness and health, written on the event loop and read from the HTTP thread.

    Each field is one reference or float, replaced whole, so a reader on
    another thread sees either the old value or the new one.
    """

    def __init__(self, stall_seconds: float = STALL_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_seconds = stall_seconds
        self.clock = clock
        self.journal: Journal | None = None
        self.ready = False
        self.last_beat = clock()

    def beat(self) -> None:
        """The event loop turned."""
        self.last_beat = self.clock()

    def readiness(self) -> tuple[bool, str]:
        """``/readyz``: whether every listener accepts."""
        return (True, "ready") if self.ready else (False, "not ready: the relay is starting or stopping")

    def liveness(self) -> tuple[bool, str]:
        """``/healthz``: whether the event loop turns and the journal (if any) writes."""
        journal = self.journal
        failure = None if journal is None else journal.failure
        return verdict(self.clock(), self.last_beat, self.stall_seconds, failure)


class Heartbeat:
    """The timer on the event loop that stamps ``health`` and pings the watchdog when one is asked for."""

    def __init__(self, health: Health, notifier: Notifier, loop: asyncio.AbstractEventLoop) -> None:
        self.health = health
        self.notifier = notifier
        self.loop = loop
        self.interval = BEAT_SECONDS if notifier.watchdog is None else min(BEAT_SECONDS, notifier.watchdog / 2)
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Beat now and every ``interval`` from now on."""
        self._beat()

    def _beat(self) -> None:
        self.health.beat()
        self.notifier.ping()
        self._handle = self.loop.call_later(self.interval, self._beat)

    def stop(self) -> None:
        """No more beats (and so no more watchdog pings)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
