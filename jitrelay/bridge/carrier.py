"""What a carrier is to the bridge's lifecycle, and what both carriers share.

The lifecycle (``bridge.Bridge``) connects to the relay and to NATS, frames
what the relay forwards into NATS messages, keeps the figures and stops; a
carrier (``core_nats.CoreCarrier`` or ``jetstream.carrier.JetStreamCarrier``)
puts those NATS messages on the wire and writes what comes back into the
relay. The options choose the carrier once, at start (``carrier_kind``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from jitrelay.bridge.figures import BridgeFigures, GapToNats, StreamFigures
from jitrelay.bridge.options import BridgeOptions
from jitrelay.bridge.relay import PayloadCheck, RelayLink
from jitrelay.core.units import MiB

HEADER_BRIDGE = "Jitrelay-Bridge"  # the sending bridge's id
HEADER_SEQUENCE = "Jitrelay-Sequence"  # index of the payload's first message in the sender's stream
HEADER_OFFSET = "Jitrelay-Offset"  # byte offset of the payload in the sender's stream


@dataclass
class SenderPosition:
    """Where this bridge's outgoing stream stands: messages and bytes taken from the relay, and the journal."""

    sequence: int = 0
    offset: int = 0
    journal: tuple[int, int] | None = None

    def headers(self, bridge_id: str) -> dict[str, str]:
        """The headers that number a NATS message starting here; raises nothing."""
        return {HEADER_BRIDGE: bridge_id, HEADER_SEQUENCE: str(self.sequence), HEADER_OFFSET: str(self.offset)}

    def advance(self, count: int, size: int) -> None:
        """Move past ``count`` messages of ``size`` bytes, sent or lost; raises nothing."""
        self.sequence += count
        self.offset += size


class Lifecycle(Protocol):
    """What a carrier may use of the bridge that runs it."""

    options: BridgeOptions
    id: str
    subject: str
    figures: BridgeFigures
    position: SenderPosition
    gaps: GapToNats
    check: PayloadCheck
    link: RelayLink | None
    nc: Any

    async def publish_batch(self, batch: np.ndarray, journal_at: tuple[int, int] | None = None) -> None:
        """Publish whole messages through the carrier, cut into NATS messages."""


class Carrier:
    """One way of carrying NATS messages between hosts; the lifecycle calls it at each of its steps.

    Subclasses say, as class attributes, whether the relay's batches go out
    before NATS is reached (as a gap) and whether waiting batches travel
    together, and how much may wait for NATS before the relay is read no more.
    """

    sends_before_connected = False
    coalesces = False
    outbox_high = 16 * MiB  # read from the relay no further while this much waits for NATS
    outbox_low = 4 * MiB

    def __init__(self, options: BridgeOptions, bridge_id: str) -> None:
        self.options = options
        self.id = bridge_id
        self.stream_figures: StreamFigures | None = None
        self._bridge: Lifecycle | None = None

    def attach(self, bridge: Lifecycle) -> None:
        """Serve ``bridge``, whose lifecycle calls this carrier from now on."""
        self._bridge = bridge

    @property
    def bridge(self) -> Lifecycle:
        """The bridge this carrier serves; RuntimeError before ``attach``."""
        if self._bridge is None:
            raise RuntimeError("the carrier serves no bridge yet")
        return self._bridge

    async def start(self) -> str:
        """Set up on the bridge's connected NATS client; where the bridge now carries to, for the log.

        Raises what NATS raises when it cannot be set up.
        """
        raise NotImplementedError

    def on_relay_batch(self, batch: np.ndarray) -> bool:
        """A batch the relay forwarded: True if the carrier takes it itself, False to leave it to the outbox."""
        return False

    def pump(self) -> Coroutine[Any, Any, None] | None:
        """The carrier's own pump to NATS instead of the outbox's, if it has one."""
        return None

    def tasks(self) -> list[Coroutine[Any, Any, None]]:
        """What else runs while the bridge does; each raises what stops the bridge."""
        return []

    async def send(self, payload: memoryview, count: int, journal_end: tuple[int, int] | None) -> None:
        """Put one NATS message of ``count`` whole messages on the wire; a loss is counted, never raised."""
        raise NotImplementedError

    async def drain(self, seconds: float) -> None:
        """On a stop, wait up to ``seconds`` for what was sent to be taken; raises nothing."""

    def close(self) -> None:
        """After the last step: keep what must survive a restart; raises nothing."""

    def pending_bytes(self) -> int:
        """What nats-py holds for the relay now, for the figures."""
        return 0


async def wait_until(event: asyncio.Event, seconds: float) -> None:
    """Wait for ``event`` at most ``seconds``; raises nothing."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
