"""The core NATS carrier: a plain subject, at most once, every loss counted.

Each NATS message goes out on the subject with the headers that number the
sending bridge's stream (``Jitrelay-Bridge``, ``-Sequence``, ``-Offset``); a
receiving bridge that sees the numbers jump counts what it never got as a gap
from NATS. A publish nats-py refuses (disconnected, reconnect buffer full) is
a gap to NATS.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from jitrelay.bridge.carrier import HEADER_BRIDGE, HEADER_OFFSET, HEADER_SEQUENCE, Carrier
from jitrelay.bridge.options import BridgeOptions

log = logging.getLogger("jitrelay.bridge")

MAX_STREAMS = 4096  # remote bridges whose position is remembered


class CoreCarrier(Carrier):
    """Publishes on the subject and subscribes to it; what the relay sends before NATS is reached is a gap."""

    sends_before_connected = True

    def __init__(self, options: BridgeOptions) -> None:
        super().__init__(options, uuid.uuid4().hex[:16])
        self.subscription: Any = None
        self._streams: dict[str, tuple[int, int]] = {}  # remote bridge id -> next (sequence, offset) expected

    async def start(self) -> str:
        """Subscribe to the subject; raises what nats-py raises."""
        bridge = self.bridge
        self.subscription = await bridge.nc.subscribe(
            bridge.subject, cb=self._on_nats, pending_bytes_limit=self.options.nats_pending_limit
        )
        return f"NATS subject {bridge.subject}"

    async def send(self, payload: memoryview, count: int, journal_end: tuple[int, int] | None) -> None:
        """Publish one NATS message numbered by the bridge's position; a refused publish is a gap to NATS."""
        from nats.errors import Error as NatsError

        bridge = self.bridge
        try:
            await bridge.nc.publish(bridge.subject, payload, headers=bridge.position.headers(self.id))
        except NatsError as exc:
            bridge.gaps.count(count, len(payload), _gap_reason(exc, self.options.reconnect_buffer))
        else:
            bridge.gaps.close()
            bridge.figures.to_nats.add(count, len(payload))
        bridge.position.advance(count, len(payload))

    def pending_bytes(self) -> int:
        """What nats-py holds for the subscription's callback now."""
        return getattr(self.subscription, "pending_bytes", 0) if self.subscription is not None else 0

    async def _on_nats(self, msg: Any) -> None:
        bridge = self.bridge
        data: bytes = msg.data
        count = bridge.check.admit(data)
        if count is None:
            return
        self._follow_stream(msg.headers, count, len(data))
        link = bridge.link
        if not count or link is None or not link.open:
            return
        assert link.transport is not None
        link.transport.write(data)
        bridge.figures.from_nats.add(count, len(data))
        if not link.writable.is_set():
            await link.writable.wait()  # the relay is behind: let nats-py hold the rest

    def _follow_stream(self, headers: dict[str, str] | None, count: int, size: int) -> None:
        """Check a NATS message's place in its sender's stream; count and log what went missing before it."""
        if not headers or HEADER_BRIDGE not in headers:
            return  # not from a bridge: nothing to check against
        sender = headers[HEADER_BRIDGE]
        try:
            sequence = int(headers[HEADER_SEQUENCE])
            offset = int(headers[HEADER_OFFSET])
        except (KeyError, ValueError):
            return
        expected = self._streams.pop(sender, None)
        if expected is not None:
            missing = sequence - expected[0]
            if missing > 0:
                self.bridge.figures.missed(sender, expected, sequence, offset)
            elif missing < 0:
                log.warning("bridge %s: messages from %d arrived after %d; out of order", sender, sequence, expected[0])
        elif len(self._streams) >= MAX_STREAMS:
            del self._streams[next(iter(self._streams))]
        self._streams[sender] = (sequence + count, offset + size)


def _gap_reason(exc: Exception, buffer: int) -> str:
    from nats.errors import OutboundBufferLimitError

    if isinstance(exc, OutboundBufferLimitError):
        return f"disconnected from NATS and the {buffer}-byte reconnect buffer is full"
    return f"publish failed: {type(exc).__name__}: {exc}"
