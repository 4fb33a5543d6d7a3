"""The bridge's side facing its local relay: the one connection to it, and the check of what goes into it.

Both carriers read the relay through ``RelayLink`` and write what NATS brought
through it, after ``PayloadCheck`` has kept out what would hurt the
connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

import numpy as np

from jitrelay import kernels
from jitrelay.bridge.figures import BridgeFigures
from jitrelay.core import protocol
from jitrelay.core.domains import logic_for
from jitrelay.core.units import MiB
from jitrelay.kernels.framer import MessageFramer

log = logging.getLogger("jitrelay.bridge")

READ_BUFFER = 4 * MiB
RELAY_WRITE_HIGH = 8 * MiB  # bytes queued towards the relay before the NATS side waits
RELAY_WRITE_LOW = 2 * MiB


class RelayLink(asyncio.BufferedProtocol):
    """The bridge's one connection to the local relay: batches of whole messages in, NATS payloads out.

    Each batch the relay forwards goes to ``on_batch``; ``lost`` completes
    when the relay closes the connection.
    """

    def __init__(self, on_batch: Callable[[np.ndarray], None]) -> None:
        self.on_batch = on_batch
        self.framer = MessageFramer(READ_BUFFER)
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()

    @property
    def open(self) -> bool:
        """Whether bytes written now can reach the relay."""
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=RELAY_WRITE_HIGH, low=RELAY_WRITE_LOW)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.framer.space().data

    def buffer_updated(self, nbytes: int) -> None:
        self.framer.commit(nbytes)
        try:
            batch = self.framer.maybe_extract_batch()
        except protocol.ProtocolError as exc:  # the relay forwards whole valid messages only; never expected
            log.error("the relay sent bytes that are not messages (%s); closing", exc)
            assert self.transport is not None
            self.transport.close()
            return
        if batch is not None:
            self.on_batch(batch)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class PayloadCheck:
    """Whether a NATS message may go into the relay, and how many protocol messages it holds.

    The relay judges every message again; this only keeps out what would
    make it close the bridge's connection (bad magic, oversize, a torn
    message) or change what the bridge receives (a control message).
    """

    def __init__(self, domain: str, max_payload: int | None, subject: str, figures: BridgeFigures) -> None:
        logic = logic_for(domain, max_payload=max_payload)
        self.subject = subject
        self.figures = figures
        self._tables = kernels.tables_for(logic)._replace(checksum_policy=protocol.CHECKSUM_OFF)
        self._scan_out = kernels.ScanBuffers(64 * 1024)
        self._scan_counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)

    def whole_messages(self, data: bytes) -> tuple[int, str | None]:
        """How many messages ``data`` holds, or why it must not reach the relay; raises nothing."""
        buf = np.frombuffer(data, dtype=np.uint8)
        if len(buf) > self._scan_out.capacity:
            self._scan_out = kernels.ScanBuffers(len(buf))
        result = kernels.scan_into(buf, 0, len(buf), self._tables, self._scan_out, self._scan_counts)
        if result.fault != protocol.NO_FAULT:
            return 0, f"{protocol.FAULT_NAMES[result.fault]} at byte {result.consumed}"
        if result.consumed != len(buf):
            return 0, f"ends {len(buf) - result.consumed} bytes into an unfinished message"
        if (
            result.count
            and (buf[self._scan_out.offsets[: result.count] + protocol.OFF_DOMAIN] == protocol.CONTROL_DOMAIN).any()
        ):
            return 0, "it holds a control message"
        return result.count, None

    def admit(self, data: bytes) -> int | None:
        """The messages ``data`` holds; None, counted and logged as refused, if it must not reach the relay."""
        count, refusal = self.whole_messages(data)
        if refusal is None:
            return count
        self.figures.refused_payloads += 1
        log.warning("refusing a NATS message of %d bytes on %s: %s", len(data), self.subject, refusal)
        return None
