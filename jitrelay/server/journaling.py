"""The relay's journal when it does not write: publishers held, the append tried again, and the timed fsync.

The append itself runs for every batch, so it stays on the engine's data path
(``Relay._journal``); what happens around it, off that path, is here: under
``journal_on_error = pause`` a failed append holds every publisher until the
journal writes again, and under ``journal_fsync = batch`` an fsync follows soon after.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from jitrelay.server.connection import Connection
from jitrelay.server.journal import Journal

log = logging.getLogger("jitrelay.relay")

JOURNAL_RETRY_SECONDS = 0.2  # how often a relay holding its publishers tries a failed journal append again


class Journaling:
    """The Relay's journal retries and syncs.

    State lives on the Relay (``server/engine.py``); the names below are declared for the type checker only.
    """

    journal: Journal | None
    journal_errors: int
    _journal_timer: asyncio.TimerHandle | None
    _journal_retry: asyncio.TimerHandle | None
    _journal_held: list[Connection]
    on_data: Callable[[Connection, int], None]
    _set_reading: Callable[[bool], None]
    _retire: Callable[[Connection], None]

    def _hold_for_journal(self, conn: Connection) -> None:
        if conn not in self._journal_held:
            self._journal_held.append(conn)
            conn.transport.pause_reading()

    def _retry_journal(self) -> None:
        """Offer the held batches to the journal again, oldest first; resume reading once all are taken."""
        self._journal_retry = None
        waiting, self._journal_held = self._journal_held, []
        for i, conn in enumerate(waiting):
            self.on_data(conn, time.perf_counter_ns())
            if conn not in self._journal_held:
                self._retire(conn)  # one that closed meanwhile is done with, once its batch is taken
            if self._journal_retry is not None:  # refused again: the rest keep waiting, in order
                self._journal_held = [
                    *self._journal_held,
                    *[c for c in waiting[i + 1 :] if c not in self._journal_held],
                ]
                return
        log.info("journal %s writes again; publishers resume", self.journal.path if self.journal else "")
        self._set_reading(True)

    def _sync_journal(self) -> None:
        self._journal_timer = None
        assert self.journal is not None
        try:
            self.journal.sync()
        except OSError as exc:
            self.journal_errors += 1
            log.error("journal %s: fsync failed: %s", self.journal.path, exc)
