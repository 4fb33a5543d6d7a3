"""The relay's figures: a snapshot of its counters, the summary and timing lines, and logging them.

Tools, metrics and the stats socket read ``Relay.figures`` (``server/figures.py``
says what each figure is); the engine only counts.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.domains import RelayLogic
from jitrelay.core.histogram import Histogram
from jitrelay.server.connection import Connection
from jitrelay.server.cursors import CATCHING_UP, CursorMode, CursorTable
from jitrelay.server.figures import Figures
from jitrelay.server.log import RelayLog

log = logging.getLogger("jitrelay.relay")


class RelayFigures:
    """The Relay's figures and summary.

    State lives on the Relay (``server/engine.py``); the names below are declared for the type checker only.
    """

    logic: RelayLogic
    log: RelayLog
    connections: dict[int, Connection]
    kernel_load_seconds: float
    retired_counts: np.ndarray
    retired_bytes_in: int
    bytes_forwarded: int
    batches: int
    accepted: int
    refused: Counter[str]
    faults: Counter[str]
    slow_disconnects: int
    slow_pids: deque[int]
    slow_pauses: int
    gap_notices: int
    fell_behind: int
    reads_polled: int
    torn_messages: int
    never_reading: int
    journal_errors: int
    messages_timed: int
    forward_time: Histogram
    send_time: Histogram
    own_time: Histogram
    cursors: CursorTable[Connection]
    _unread: set[Connection]
    _groups: tuple[tuple[Connection, ...], ...]
    _unread_totals: Callable[[], tuple[int, int]]

    @property
    def subscriber_groups(self) -> int:
        """Distinct subscription filters in force."""
        return len(self._groups)

    def figures(self) -> Figures:
        """Copy the relay's counters; call it on the relay's event-loop thread."""
        live = list(self.connections.values())
        head = self.log.head
        timing = self.forward_time
        verdicts = self.verdict_counts()
        unread_messages, unread_bytes = self._unread_totals()
        return Figures(
            domain=self.logic.name,
            verdicts=verdicts,
            bytes_received=self.retired_bytes_in + sum(conn.bytes_in for conn in live),
            bytes_forwarded=self.bytes_forwarded,
            faults=dict(self.faults),
            connections_open=len(live),
            connections_accepted=self.accepted,
            refused=dict(self.refused),
            pending_max=max((head - conn.needed() for conn in self._cursors()), default=0),
            slow_actions={
                "hold": self.slow_pauses,
                "disconnect": self.slow_disconnects,
                "gap_notice": self.gap_notices,
            },
            never_reading=self.never_reading,
            never_reading_open=len(self._unread),
            unread_messages=unread_messages,
            unread_bytes=unread_bytes,
            journal_errors=self.journal_errors,
            forward_buckets=tuple(timing.counts),
            forward_total_ns=timing.total,
            subscriber_groups=self.subscriber_groups,
            messages_received=sum(verdicts.values()),
            messages_forwarded=verdicts["forward"],
            batches=timing.count,
            forward_p50_us=timing.percentile(50) / 1e3,
            forward_p99_us=timing.percentile(99) / 1e3,
            forward_p99_9_us=timing.percentile(99.9) / 1e3,
            forward_max_us=timing.max / 1e3,
            forward_ns_per_message=timing.total / self.messages_timed if self.messages_timed else 0.0,
            slow_disconnected_pids=tuple(self.slow_pids),
            torn_messages=self.torn_messages,
            kernel_build=str(kernels.backend()["name"]),
            kernel_load_seconds=self.kernel_load_seconds,
            log_size=self.log.capacity,
            log_used=self.log.used,
            log_epoch=self.log.epoch,
            log_head=head,
            subscribers_behind=self.cursors.count(*CATCHING_UP),
            fell_behind=self.fell_behind,
            reads_polled=self.reads_polled,
            lags=tuple(
                (conn.peer, head - conn.needed(), self.log.messages_from(conn.needed())) for conn in self._cursors()
            ),
            shared_readers=self.cursors.count(CursorMode.MAPPED),
            own_buckets=tuple(self.own_time.counts),
            own_total_ns=self.own_time.total,
            own_p50_us=self.own_time.percentile(50) / 1e3,
            own_p99_us=self.own_time.percentile(99) / 1e3,
            send_buckets=tuple(self.send_time.counts),
            send_total_ns=self.send_time.total,
            send_p50_us=self.send_time.percentile(50) / 1e3,
            send_p99_us=self.send_time.percentile(99) / 1e3,
        )

    def _cursors(self) -> list[Connection]:
        """Every subscriber not at the head for sure: those behind on their sockets, and the mapped log's readers."""
        return [*self.cursors.members(*CATCHING_UP), *self.cursors.members(CursorMode.MAPPED)]

    def verdict_counts(self) -> dict[str, int]:
        total = self.retired_counts.copy()
        for conn in self.connections.values():
            total += conn.counts
        return dict(zip(protocol.VERDICT_NAMES, total.tolist(), strict=True))

    def summary(self) -> str:
        counts = self.verdict_counts()
        unread_messages = self._unread_totals()[0]
        received = sum(counts.values())
        rejected = {k: counts[k] for k in protocol.REJECT_NAMES if counts[k]}
        return (
            f"received {received} messages, forwarded {counts['forward']} "
            f"({self.bytes_forwarded} bytes in {self.batches} batches), rejected {rejected or 0}, "
            f"control messages {counts['control']}, "
            f"faults {dict(self.faults) or 0}, slow subscribers dropped {self.slow_disconnects}, "
            f"publishers that never read {self.never_reading} (not sent {unread_messages} messages), "
            f"connections {self.accepted}, refused {dict(self.refused) or 0}, journal errors {self.journal_errors}"
        )

    def timing(self) -> str:
        h, own, send = self.forward_time, self.own_time, self.send_time
        per_message = h.total / self.messages_timed if self.messages_timed else 0.0
        return (
            f"forwarding time per batch: p50 {h.percentile(50) / 1e3:.1f} us, p99 {h.percentile(99) / 1e3:.1f} us, "
            f"p99.9 {h.percentile(99.9) / 1e3:.1f} us, max {h.max / 1e3:.1f} us over {h.count} batches; "
            f"{per_message:.1f} ns per message; the relay's own part p50 {own.percentile(50) / 1e3:.1f} us, "
            f"p99 {own.percentile(99) / 1e3:.1f} us, inside send calls p50 {send.percentile(50) / 1e3:.1f} us"
        )

    def log_figures(self, state: str) -> None:
        log.info("jitrelay %s relay %s: %s", self.logic.name, state, self.summary())
        log.info("jitrelay %s relay %s", self.logic.name, self.timing())
