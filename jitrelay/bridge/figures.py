"""What the bridge counts, whichever carrier it runs on, and how it tells of a gap.

Every count is updated on the bridge's event loop; the metrics endpoint reads
a copy (``BridgeFigures.snapshot``) made there too.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("jitrelay.bridge")

GAP_LOG_INTERVAL = 5.0  # an open gap to NATS is logged at least this often


@dataclass
class Traffic:
    """Protocol messages and bytes one way, and the NATS messages that carried them."""

    messages: int = 0
    bytes: int = 0
    payloads: int = 0

    def add(self, messages: int, size: int, payloads: int = 1) -> None:
        """Count ``messages`` protocol messages of ``size`` bytes carried in ``payloads`` NATS messages."""
        self.messages += messages
        self.bytes += size
        self.payloads += payloads

    def add_traffic(self, other: Traffic) -> None:
        """Count what ``other`` counted (a batch counted apart until the relay has it)."""
        self.add(other.messages, other.bytes, other.payloads)


@dataclass
class Gaps:
    """Protocol messages and bytes one way that did not make it, and how many separate gaps."""

    messages: int = 0
    bytes: int = 0
    events: int = 0


@dataclass
class StreamFigures:
    """What the JetStream carrier shows besides the figures every bridge has."""

    in_flight: int = 0  # publishes awaiting acknowledgement
    republished: int = 0  # NATS messages sent again after a rejection, a failure or no answer
    duplicates: int = 0  # publishes the stream had already stored (its duplicate window caught them)
    stream_full: int = 0  # publishes the stream refused because it was full
    consumer_pending: int = 0  # messages of the stream this host's consumer has not been given yet (lag)
    consumer_ack_pending: int = 0  # given but not acknowledged
    redelivered: int = 0  # NATS messages the receiver had already written (not written again)
    held: int = 0  # NATS messages waiting for the one they follow
    stream_messages: int = 0
    stream_bytes: int = 0
    echoes: int = 0  # journal messages skipped because this host's receiver wrote them

    def summary(self) -> str:
        """One line for the log; raises nothing."""
        return (
            f"{self.in_flight} publishes awaiting acknowledgement, {self.republished} republished, "
            f"{self.duplicates} duplicates dropped by the stream, {self.stream_full} refused as full; "
            f"consumer lag {self.consumer_pending} messages, {self.consumer_ack_pending} unacknowledged, "
            f"{self.redelivered} redelivered and not written again, {self.held} held; "
            f"stream {self.stream_messages} messages ({self.stream_bytes} bytes); {self.echoes} journal echoes skipped"
        )


@dataclass
class BridgeFigures:
    """Everything the bridge counts, updated on its event loop."""

    to_nats: Traffic = field(default_factory=Traffic)
    from_nats: Traffic = field(default_factory=Traffic)
    gap_to_nats: Gaps = field(default_factory=Gaps)
    gap_from_nats: Gaps = field(default_factory=Gaps)
    refused_payloads: int = 0  # NATS messages that were not whole protocol messages of this domain
    reconnects: int = 0
    disconnected_seconds: float = 0.0
    connected: bool = False
    client_drops: int = 0  # NATS messages nats-py dropped: the relay was behind and its pending limit was reached
    pending_bytes: int = 0  # what nats-py holds for the relay now (read at scrape time)
    stream: StreamFigures | None = None  # the JetStream carrier's, when the bridge runs on JetStream

    def snapshot(self, pending_bytes: int) -> BridgeFigures:
        """A copy to read off the event loop, with what nats-py holds for the relay now; raises nothing."""
        figures = copy.deepcopy(self)
        figures.pending_bytes = pending_bytes
        return figures

    def summary(self) -> str:
        """One line for the log at SIGUSR1 and at exit; raises nothing."""
        t, f, gt, gf = self.to_nats, self.from_nats, self.gap_to_nats, self.gap_from_nats
        return (
            f"to NATS {t.messages} messages ({t.bytes} bytes in {t.payloads} NATS messages), "
            f"from NATS {f.messages} messages ({f.bytes} bytes in {f.payloads} NATS messages), "
            f"refused {self.refused_payloads} NATS messages; "
            f"gaps: to NATS {gt.messages} messages ({gt.bytes} bytes) in {gt.events}, "
            f"from NATS {gf.messages} messages ({gf.bytes} bytes) in {gf.events}; "
            f"reconnects {self.reconnects} ({self.disconnected_seconds:.2f} s disconnected); "
            f"dropped by the NATS client {self.client_drops} NATS messages"
            + ("" if self.stream is None else "; JetStream: " + self.stream.summary())
        )

    def missed(self, sender: str, expected: tuple[int, int], sequence: int, offset: int) -> None:
        """Messages ``expected`` up to ``sequence`` of bridge ``sender`` never arrived: count them and say so."""
        missing, missing_bytes = sequence - expected[0], offset - expected[1]
        gap = self.gap_from_nats
        gap.messages += missing
        gap.bytes += missing_bytes
        gap.events += 1
        log.warning(
            "gap from NATS: %d messages (%d bytes) of bridge %s never arrived (messages %d to %d)",
            missing,
            missing_bytes,
            sender,
            expected[0],
            sequence - 1,
        )


class _OpenGap:
    """Messages not sent to NATS since the last one that was: logged with its size when it closes."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.messages = 0
        self.bytes = 0
        self.started = self.logged = time.monotonic()

    def log(self, state: str) -> None:
        log.warning(
            "gap to NATS%s: %d messages (%d bytes) not sent in %.2f s: %s",
            state,
            self.messages,
            self.bytes,
            time.monotonic() - self.started,
            self.reason,
        )
        self.logged = time.monotonic()


class GapToNats:
    """The gap to NATS as it opens, grows and closes: counted in ``gaps``, logged once per gap and reason.

    A gap is logged when it closes (a message reached NATS again, or the
    reason changed), and every ``GAP_LOG_INTERVAL`` seconds while it lasts.
    """

    def __init__(self, gaps: Gaps) -> None:
        self.gaps = gaps
        self._open: _OpenGap | None = None

    def count(self, count: int, size: int, reason: str) -> None:
        """``count`` messages of ``size`` bytes were not handed to NATS, for ``reason``; raises nothing."""
        if self._open is not None and self._open.reason != reason:
            self.close()
        gap = self._open
        if gap is None:
            gap = self._open = _OpenGap(reason)
            self.gaps.events += 1
        gap.messages += count
        gap.bytes += size
        self.gaps.messages += count
        self.gaps.bytes += size
        if time.monotonic() - gap.logged > GAP_LOG_INTERVAL:
            gap.log(" so far")

    def close(self) -> None:
        """The open gap, if any, has ended: log its size; raises nothing."""
        if self._open is not None:
            self._open.log("")
            self._open = None
