"""``jitrelay bridge``: one domain's relays on several hosts, joined through a NATS cluster.

The bridge is an ordinary client of the local relay and a client of NATS, and
nothing more. Every batch the relay forwards to it goes out on the subject
(``jitrelay.<domain>`` by default) as NATS messages that hold whole protocol
messages only, each no larger than the server's ``max_payload``; every NATS
message on the subject is written into the relay, which validates it again,
so an invalid message never crosses. There are no loops: the NATS connection
is made with ``no_echo``, and the relay never echoes a message to its sender.
Run one bridge per relay and host.

Core NATS delivers at most once, so the bridge accounts for what it cannot
deliver instead of hiding it, in messages and bytes:

- gap to NATS: messages the relay gave the bridge that it could not hand to
  the NATS client: while disconnected, once the reconnect buffer is full
  (publishes that fail), and any message larger than a NATS message can hold.
  Logged as a WARNING with its size when the gap closes (or every few seconds
  while it lasts).
- gap from NATS: every NATS message the bridge sends carries headers with the
  bridge's id, the index of its first protocol message and its byte offset in
  that bridge's outgoing stream. A receiving bridge that sees the index jump
  counts the messages and bytes it never got, whatever lost them: a node that
  died with them in flight, its own subscription being away while it
  reconnected, or the sender's own gap. Logged as a WARNING at once.

Both figures, with the traffic counts and reconnects, are served to Prometheus
with ``--metrics-port`` and logged on SIGUSR1 and at exit.

With ``--jetstream`` (the default for execution) the same batches go through
a replicated JetStream stream instead, without loss; ``jetstream.py`` says how.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from jitrelay import kernels
from jitrelay.bridge import jetstream as js_
from jitrelay.core import protocol
from jitrelay.core.domains import logic_for
from jitrelay.core.units import MiB
from jitrelay.kernels.framer import MessageFramer

log = logging.getLogger("jitrelay.bridge")

SUBJECT_PREFIX = "jitrelay"
HEADER_BRIDGE = "Jitrelay-Bridge"  # the sending bridge's id
HEADER_SEQUENCE = "Jitrelay-Sequence"  # index of the payload's first message in the sender's stream
HEADER_OFFSET = "Jitrelay-Offset"  # byte offset of the payload in the sender's stream
HEADER_ROOM = 256  # bytes of max_payload kept for the header block
READ_BUFFER = 4 * MiB
OUTBOX_HIGH = 16 * MiB  # read from the relay no further while this much waits for NATS
OUTBOX_LOW = 4 * MiB
JS_OUTBOX_HIGH = 4 * MiB  # on JetStream the window of publishes awaiting acknowledgement holds more
JS_OUTBOX_LOW = 1 * MiB
RELAY_WRITE_HIGH = 8 * MiB  # bytes queued towards the relay before the NATS callback waits
RELAY_WRITE_LOW = 2 * MiB
RECONNECT_BUFFER = 8 * MiB  # what nats-py holds for NATS while reconnecting; more is dropped (a gap)
SUBSCRIPTION_PENDING_BYTES = 256 * MiB  # what nats-py may hold for the callback before it drops (a gap)
NATS_READ_SIZE = 1 * MiB  # what nats-py reads from its socket at once; its own 32 KiB costs twice the CPU per byte
GAP_LOG_INTERVAL = 5.0  # an open gap to NATS is logged at least this often
ERROR_LOG_INTERVAL = 5.0  # the same NATS client error is logged at most this often
STOP_FLUSH_SECONDS = 1.0
MAX_STREAMS = 4096  # remote bridges whose position is remembered
_SUBJECT = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")
T = TypeVar("T")


class BridgeError(RuntimeError):
    """The bridge cannot start or cannot go on: no relay, the relay went away, or NATS closed for good."""


@dataclass
class BridgeOptions:
    """What ``jitrelay bridge`` is told."""

    domain: str
    servers: tuple[str, ...]
    socket_path: Path | None = None  # default: the domain's socket
    subject: str | None = None  # default: jitrelay.<domain>
    metrics_port: int | None = None
    reconnect_buffer: int = RECONNECT_BUFFER  # bytes buffered for NATS while reconnecting
    reconnect_wait: float = 0.1  # seconds between attempts on the same server
    max_payload: int | None = None  # largest message payload taken from NATS; default: the domain's
    nats_pending_limit: int = SUBSCRIPTION_PENDING_BYTES  # bytes nats-py may hold while the relay is behind
    jetstream: bool | None = None  # default: on where the domain's relay never drops (execution)
    host: str | None = None  # this host's name in the stream and its consumer's; default: the host name
    stream: js_.StreamSettings = field(default_factory=js_.StreamSettings)
    journal_dir: Path | None = None  # where the relay journals; default: the domain's, if it journals
    use_journal: bool | None = None  # read what to send from the journal; default: when the domain journals
    state_dir: Path | None = None  # where the JetStream bridge keeps its state file; default: the socket's folder
    hold_when_full: bool | None = None  # a full stream holds the relay back (else: a gap); default: under block

    def __post_init__(self) -> None:
        logic = logic_for(self.domain)  # ValueError for an unknown domain
        if self.jetstream is None:
            self.jetstream = logic.slow_policy == "block"
        if self.host is None:
            self.host = socket.gethostname()
        self.host = js_.host_token(self.host)
        if self.journal_dir is None:
            base = self.socket_path if self.socket_path is not None else Path(logic.socket_path)
            self.journal_dir = Path(base).parent / "journal"
        if self.hold_when_full is None:
            self.hold_when_full = logic.slow_policy == "block"
        if self.use_journal is None:
            self.use_journal = bool(self.jetstream and logic.journal)
        if self.state_dir is None:
            self.state_dir = Path(self.socket_path if self.socket_path is not None else logic.socket_path).parent
        if self.stream.replicas < 1 or self.stream.max_in_flight < 1 or self.stream.max_ack_pending < 1:
            raise ValueError("replicas, publishes in flight and acknowledgements pending must be at least 1")
        if not (self.stream.max_age > 0 and self.stream.max_bytes > 0 and self.stream.duplicate_window > 0):
            raise ValueError("the stream's max age, max bytes and duplicate window must be positive")
        if not self.servers:
            raise ValueError("no NATS server given")
        if self.socket_path is None:
            self.socket_path = Path(logic.socket_path)
        if self.subject is None:
            self.subject = f"{SUBJECT_PREFIX}.{self.domain}"
        if not _SUBJECT.fullmatch(self.subject):
            raise ValueError(f"not a NATS subject one can publish to: {self.subject!r}")
        if self.max_payload is None:
            self.max_payload = logic.max_payload
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be 0..65535, not {self.metrics_port}")
        if not self.reconnect_wait >= 0:
            raise ValueError("reconnect wait must not be negative")
        if self.nats_pending_limit < 1:
            raise ValueError("the NATS pending limit must be at least one byte")


@dataclass
class Traffic:
    """Protocol messages and bytes one way, and the NATS messages that carried them."""

    messages: int = 0
    bytes: int = 0
    payloads: int = 0


@dataclass
class Gaps:
    """Protocol messages and bytes one way that did not make it, and how many separate gaps."""

    messages: int = 0
    bytes: int = 0
    events: int = 0


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
    stream: js_.StreamFigures | None = None  # the JetStream side's, when the bridge runs on JetStream

    def summary(self) -> str:
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


class _RelayLink(asyncio.BufferedProtocol):
    """The bridge's one connection to the local relay: batches of whole messages in, NATS payloads out."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.framer = MessageFramer(READ_BUFFER)
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=RELAY_WRITE_HIGH, low=RELAY_WRITE_LOW)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.framer.space())

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
            if self.bridge.options.use_journal:  # the journal holds it already: only a sign that there is more to read
                self.bridge.tail_kick.set()
            else:
                self.bridge.queue_for_nats(batch)

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


class Bridge:
    """Joins the local relay of one domain to a NATS subject, both ways; ``run`` until told to stop."""

    def __init__(self, options: BridgeOptions) -> None:
        self.options = options
        self.domain = options.domain
        self.subject = options.subject
        self.id = uuid.uuid4().hex[:16]
        self.figures = BridgeFigures()
        self.nc = None  # the nats.aio.client.Client, once connected
        self.subscription = None  # its subscription to the subject
        self.nats_url = ""
        self._link: _RelayLink | None = None
        self._outbox: collections.deque[np.ndarray] = collections.deque()
        self._outbox_bytes = 0
        self._outbox_ready = asyncio.Event()
        self._reading = True
        self._sequence = 0  # protocol messages this bridge has taken from the relay
        self._offset = 0  # and their bytes
        self._gap: _OpenGap | None = None
        self._streams: dict[str, tuple[int, int]] = {}  # remote bridge id -> next (sequence, offset) expected
        self._disconnected_at: float | None = None
        self._last_error: tuple[str, float] = ("", 0.0)
        self._stopping = False
        logic = logic_for(self.domain, max_payload=options.max_payload)
        self._tables = kernels.tables_for(logic)._replace(checksum_policy=protocol.CHECKSUM_OFF)
        self._scan_out = kernels.ScanBuffers(64 * 1024)
        self._scan_counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
        self.lossy = not options.hold_when_full
        self._outbox_high, self._outbox_low = (
            (JS_OUTBOX_HIGH, JS_OUTBOX_LOW) if options.jetstream else (OUTBOX_HIGH, OUTBOX_LOW)
        )
        self.js = None  # the JetStream context, on JetStream
        self.sender: js_.StreamSender | None = None
        self.position = js_.SenderPosition()
        self.tail: js_.JournalTail | None = None
        self.tail_kick = asyncio.Event()
        self.echo: js_.EchoFilter | None = None
        self.state: js_.BridgeState | None = None
        self._held: dict[str, dict[int, tuple[float, object]]] = {}
        self._consumers: dict[str, str] = {}  # remote host -> the durable consumer reading it
        self._held_checked: set[tuple[str, int]] = set()  # held messages whose predecessors were looked for
        self._writing = asyncio.Lock()  # one fetched batch at a time goes into the relay and the state file
        if options.jetstream:
            self.id = options.host
            self.figures.stream = js_.StreamFigures()

    # relay -> NATS

    def queue_for_nats(self, batch: np.ndarray) -> None:
        """A batch of whole messages from the relay: queue it for NATS, and stop reading if too much waits."""
        self._outbox.append(batch)
        self._outbox_bytes += len(batch)
        self._outbox_ready.set()
        if self._outbox_bytes > self._outbox_high and self._reading and self._link is not None:
            self._reading = False
            self._link.transport.pause_reading()

    async def _pump_to_nats(self) -> None:
        while True:
            while not self._outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
            batch = self._outbox.popleft()
            self._outbox_bytes -= len(batch)
            if self.sender is not None and self._outbox:  # JetStream: one publish for the batches waiting
                batch = self._coalesce(batch)
            if not self._reading and self._outbox_bytes < self._outbox_low and self._link is not None:
                self._reading = True
                self._link.transport.resume_reading()
            await self.publish_batch(batch)

    def _coalesce(self, batch: np.ndarray) -> np.ndarray:
        """The batch with the ones queued behind it, up to what one NATS message holds.

        Every JetStream publish waits for the stream's replicas, and only so
        many may wait at once; small batches (a paced publisher) would queue
        behind the window, so those that wait travel together.
        """
        limit = self.nc.max_payload - HEADER_ROOM
        parts, size = [batch], len(batch)
        while self._outbox and size + len(self._outbox[0]) <= limit:
            parts.append(self._outbox.popleft())
            size += len(parts[-1])
            self._outbox_bytes -= len(parts[-1])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    async def publish_batch(self, batch: np.ndarray, journal_at: tuple[int, int] | None = None) -> None:
        """Publish whole messages as NATS messages of at most max_payload, each cut at a message boundary.

        On JetStream, ``journal_at`` is where the batch starts in the journal it was read from.
        """
        from nats.errors import Error as NatsError

        view = memoryview(batch)
        end = len(batch)
        if self.nc is None:
            self._drop(kernels.frame(batch)[0], end, "not connected to NATS yet")
            return
        pos = 0
        while pos < end:
            limit = self.nc.max_payload - HEADER_ROOM
            count, stop, _ = kernels.frame(batch, pos, min(end, pos + limit))
            journal_end = None if journal_at is None else (journal_at[0], journal_at[1] + stop)
            if count == 0:  # one message larger than a NATS message can carry
                at = pos + protocol.OFF_PAYLOAD_SIZE
                size = protocol.HEADER_SIZE + int(batch[at : at + 4].view("<u4")[0])
                self._drop(1, size, f"a message of {size} bytes is larger than NATS max_payload {self.nc.max_payload}")
                self._close_gap()  # not a state: report it at once
                pos += size
                continue
            if self.sender is not None:
                # Kept for a resend without a copy: batches from the framer and the journal are never reused.
                await self.sender.publish(view[pos:stop], count, self.position, journal_end)
                pos = stop
                continue
            headers = {HEADER_BRIDGE: self.id, HEADER_SEQUENCE: str(self._sequence), HEADER_OFFSET: str(self._offset)}
            try:
                await self.nc.publish(self.subject, view[pos:stop], headers=headers)
            except NatsError as exc:
                self._drop(count, stop - pos, _gap_reason(exc, self.options.reconnect_buffer))
            else:
                if self._gap is not None:
                    self._close_gap()
                traffic = self.figures.to_nats
                traffic.messages += count
                traffic.bytes += stop - pos
                traffic.payloads += 1
                self._sequence += count
                self._offset += stop - pos
            pos = stop

    def _drop(self, count: int, size: int, reason: str) -> None:
        self._count_gap(count, size, reason)
        self._sequence += count
        self._offset += size
        self.position.sequence += count
        self.position.offset += size

    def _count_gap(self, count: int, size: int, reason: str) -> None:
        if self._gap is not None and self._gap.reason != reason:
            self._close_gap()
        gap = self._gap
        if gap is None:
            gap = self._gap = _OpenGap(reason)
            self.figures.gap_to_nats.events += 1
        gap.messages += count
        gap.bytes += size
        self.figures.gap_to_nats.messages += count
        self.figures.gap_to_nats.bytes += size
        if time.monotonic() - gap.logged > GAP_LOG_INTERVAL:
            gap.log(" so far")

    def _close_gap(self) -> None:
        if self._gap is not None:
            self._gap.log("")
            self._gap = None

    # NATS -> relay

    async def _on_nats(self, msg: object) -> None:
        data: bytes = msg.data  # type: ignore[attr-defined]
        count, refusal = self._whole_messages(data)
        if refusal is not None:
            self.figures.refused_payloads += 1
            log.warning("refusing a NATS message of %d bytes on %s: %s", len(data), self.subject, refusal)
            return
        self._follow_stream(msg.headers, count, len(data))  # type: ignore[attr-defined]
        if not count:
            return
        link = self._link
        if link is None or link.transport is None or link.transport.is_closing():
            return
        link.transport.write(data)
        traffic = self.figures.from_nats
        traffic.messages += count
        traffic.bytes += len(data)
        traffic.payloads += 1
        if not link.writable.is_set():
            await link.writable.wait()  # the relay is behind: let nats-py hold the rest

    def _whole_messages(self, data: bytes) -> tuple[int, str | None]:
        """How many messages ``data`` holds, or why it must not reach the relay.

        The relay judges every message again; this only keeps out what would
        make it close the bridge's connection (bad magic, oversize, a torn
        message) or change what the bridge receives (a control message).
        """
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

    def _gap_from_nats(self, sender: str, expected: tuple[int, int], sequence: int, offset: int) -> None:
        """Messages ``expected`` up to ``sequence`` of bridge ``sender`` never arrived: count them and say so."""
        missing, missing_bytes = sequence - expected[0], offset - expected[1]
        gap = self.figures.gap_from_nats
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
                self._gap_from_nats(sender, expected, sequence, offset)
            elif missing < 0:
                log.warning("bridge %s: messages from %d arrived after %d; out of order", sender, sequence, expected[0])
        elif len(self._streams) >= MAX_STREAMS:
            del self._streams[next(iter(self._streams))]
        self._streams[sender] = (sequence + count, offset + size)

    # NATS connection events

    async def _on_disconnected(self) -> None:
        self.figures.connected = False
        if self._stopping:
            return
        self._disconnected_at = time.monotonic()
        log.warning(
            "disconnected from NATS at %s; reconnecting, buffering up to %d bytes meanwhile",
            self.nats_url,
            self.options.reconnect_buffer,
        )

    async def _on_reconnected(self) -> None:
        self.figures.connected = True
        self.figures.reconnects += 1
        outage = time.monotonic() - self._disconnected_at if self._disconnected_at is not None else 0.0
        self.figures.disconnected_seconds += outage
        self._disconnected_at = None
        self.nats_url = _url(self.nc)
        log.warning("reconnected to NATS at %s after %.3f s", self.nats_url, outage)

    async def _on_error(self, exc: Exception) -> None:
        from nats.errors import SlowConsumerError

        if isinstance(exc, SlowConsumerError):  # one NATS message dropped; its messages become a gap from NATS
            self.figures.client_drops += 1
            limit = self.options.nats_pending_limit
            text = f"the relay is behind and {limit} bytes wait for it; the NATS client drops NATS messages"
        else:
            text = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if text != self._last_error[0] or now - self._last_error[1] > ERROR_LOG_INTERVAL:
            self._last_error = (text, now)
            log.warning("NATS: %s", text)

    # running

    async def run(self, stop: asyncio.Event) -> None:
        """Connect to the relay and to NATS, bridge until ``stop`` is set; BridgeError if either goes away."""
        loop = asyncio.get_running_loop()
        self._warm_up()
        path = self.options.socket_path
        try:
            _, self._link = await loop.create_unix_connection(lambda: _RelayLink(self), str(path))
        except OSError as exc:
            raise BridgeError(
                f"no {self.domain} relay at {path} ({exc.strerror or exc}); start one with `jitrelay run {self.domain}`"
            ) from exc
        jetstream = bool(self.options.jetstream)
        # Core NATS: until NATS is reached, what the relay sends is a gap. JetStream: it waits in the outbox.
        pump = loop.create_task(self._pump_to_nats() if not jetstream else asyncio.sleep(0))
        tasks: list[asyncio.Task] = []
        closed: asyncio.Future[None] = loop.create_future()
        metrics = None
        try:
            self.nc = await _unless_stopped(stop, self._connect_nats(closed))
            if self.nc is None:
                return
            self.nats_url = _url(self.nc)
            self.figures.connected = True
            log.info("connected to NATS at %s (max_payload %d)", self.nats_url, self.nc.max_payload)
            if jetstream:
                if not await _unless_stopped(stop, self._start_jetstream()):
                    return
                work = self._pump_journal() if self.tail is not None else self._pump_to_nats()
                pump = loop.create_task(work)
                tasks = [loop.create_task(t) for t in (self.sender.watch(), self._receive_js(), self._watch_js())]
                where = f"JetStream stream {js_.stream_name(self.domain)} as host {self.id}"
            else:
                self.subscription = await self.nc.subscribe(
                    self.subject, cb=self._on_nats, pending_bytes_limit=self.options.nats_pending_limit
                )
                where = f"NATS subject {self.subject}"
            await self.nc.flush()
            if self.options.metrics_port is not None:
                metrics = serve_metrics(self, loop, self.options.metrics_port)
            log.info("jitrelay bridge %s ready: relay %s <-> %s (bridge id %s)", self.domain, path, where, self.id)
            stopping = loop.create_task(stop.wait())
            await asyncio.wait([stopping, self._link.lost, closed, pump, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            for task in (pump, *tasks):
                if task.done():
                    task.result()  # raises what stopped it
            if not stop.is_set():
                if self._link.lost.done():
                    raise BridgeError(f"the {self.domain} relay at {path} closed the connection")
                raise BridgeError("the NATS connection closed and will not reconnect")
            await self._flush_outbox(pump)
        finally:
            self._stopping = True
            pump.cancel()
            for task in tasks:
                task.cancel()
            if self.state is not None:
                with contextlib.suppress(OSError):
                    self.state.save(self.echo.persisted() if self.echo is not None else None)
            self._close_gap()
            if self.nc is not None and not self.nc.is_closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.nc.close(), STOP_FLUSH_SECONDS)
            if self._link.transport is not None:
                self._link.transport.close()
            if metrics is not None:
                await loop.run_in_executor(None, metrics.shutdown)
                metrics.server_close()

    # JetStream

    async def _start_jetstream(self) -> bool:
        """Create (or find) the stream, the sender and the durable consumer; pick up where this host left off."""
        from nats.js.errors import BadRequestError

        options, settings = self.options, self.options.stream
        stream = js_.stream_name(self.domain)
        self.js = self.nc.jetstream(timeout=5)
        config = settings.stream_config(self.domain, self.subject)
        state_path = Path(options.state_dir) / f"bridge-{self.domain}-{self.id}.state"
        self.state = js_.BridgeState(state_path).load()
        if options.use_journal:
            self.echo = js_.EchoFilter()
            self.echo.waiting.update(self.state.echo)
        while True:
            try:
                await self.js.add_stream(config)
                break
            except BadRequestError as exc:  # created by another bridge with other settings: use it as it is
                log.warning("stream %s exists with other settings (%s); using it as it is", stream, exc.description)
                await self.js.stream_info(stream)
                break
            except Exception as exc:  # no JetStream leader yet, a node away: try again
                log.warning("cannot create stream %s yet (%s: %s); trying again", stream, type(exc).__name__, exc)
                await asyncio.sleep(0.5)
        own = f"{self.subject}.{self.id}"
        while True:
            try:
                found = await js_.last_position(self.js, stream, own)
                break
            except Exception as exc:
                log.warning("cannot read the stream's last message of %s yet (%s); trying again", own, exc)
                await asyncio.sleep(0.5)
        saved = self.state.sender
        if found is None and saved:
            journal = tuple(saved["journal"]) if saved.get("journal") else None
            found = js_.SenderPosition(int(saved["sequence"]), int(saved["offset"]), journal)  # type: ignore[arg-type]
        if found is not None:
            self.position = js_.SenderPosition(found.sequence, found.offset, found.journal)
        if options.use_journal:
            self.tail = js_.JournalTail(Path(options.journal_dir), self.domain)
            if found is not None and found.journal is not None:
                self.tail.position = found.journal
            log.info("sending from journal %s at segment %d byte %d", options.journal_dir, *self.tail.position)
        if self.tail is not None and self.state.pending:
            self._reconcile(js_.JournalTail(Path(options.journal_dir), self.domain), found)
        self._remember_sender()
        self.sender = js_.StreamSender(
            self.nc,
            self.subject,
            self.id,
            settings,
            self.figures.stream,
            self.lossy,
            self._on_stored,
            lambda count, size, why: self._count_gap(count, size, why),
        )
        self.sender.previous = self.position.sequence
        await self.sender.start()
        self.state.save(self.echo.persisted() if self.echo is not None else None)
        return True

    def _reconcile(self, journal: js_.JournalTail, sent: js_.SenderPosition | None) -> None:
        """After a kill between writing a batch into the relay and saving that it did: what the relay took.

        The relay journals what it accepts, in order, so each piece of that
        batch was taken up to its last message found in the journal; the
        positions move past those, and the rest is written again when the
        stream gives it again. Nothing twice, nothing lost.
        """
        assert self.state is not None
        wanted = {bytes.fromhex(key) for piece in self.state.pending for key in piece[3]}
        if sent is not None and sent.journal is not None:
            journal.position = sent.journal
        elif self.state.sender.get("journal"):
            journal.position = tuple(self.state.sender["journal"])  # type: ignore[assignment]
        else:
            journal.position = (1, 0)
        found: set[bytes] = set()
        while (got := journal.read()) is not None:
            buf, journal.position = got
            for first, _ in js_.message_bounds(buf):
                key = bytes(buf[first : first + protocol.HEADER_SIZE])
                if key in wanted:
                    found.add(key)
        taken = 0
        for sender, sequence, offset, keys, sizes in self.state.pending:
            k = 0
            while k < len(keys) and bytes.fromhex(keys[k]) in found:
                k += 1
            if k and self.state.streams.get(sender, (-1, 0))[0] < sequence + k:
                self.state.streams[sender] = (sequence + k, offset + sum(sizes[:k]))
                taken += k
        log.info("the relay had taken %d messages of the batch being written when the bridge stopped", taken)
        self.state.pending = []

    def _remember_sender(self) -> None:
        p = self.position
        assert self.state is not None
        self.state.sender = {"sequence": p.sequence, "offset": p.offset, "journal": list(p.journal or ()) or None}

    def _on_stored(self, entry: object) -> None:
        """A publish the stream stored: count it, and move the sender's saved position past it."""
        traffic = self.figures.to_nats
        traffic.messages += entry.count  # type: ignore[attr-defined]
        traffic.bytes += len(entry.payload)  # type: ignore[attr-defined]
        traffic.payloads += 1
        if self._gap is not None:
            self._close_gap()
        headers = entry.headers  # type: ignore[attr-defined]
        sequence = int(headers[HEADER_SEQUENCE]) + entry.count  # type: ignore[attr-defined]
        offset = int(headers[HEADER_OFFSET]) + len(entry.payload)  # type: ignore[attr-defined]
        journal = entry.journal_end  # type: ignore[attr-defined]
        assert self.state is not None
        self.state.sender = {"sequence": sequence, "offset": offset, "journal": list(journal) if journal else None}
        if journal is not None and self.echo is not None:
            self.echo.passed(journal)

    async def _pump_journal(self) -> None:
        """Send what the relay journals, from the tail's position on, skipping what this bridge wrote into it."""
        tail, echo = self.tail, self.echo
        assert tail is not None and echo is not None
        while True:
            got = tail.read()
            if got is None:
                self.tail_kick.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.tail_kick.wait(), js_.TAIL_POLL)
                continue
            buf, end = got
            segment, start = tail.position
            tail.position = end
            if not echo.waiting:
                await self.publish_batch(buf, (segment, start))
                continue
            run = 0  # start of the current run of this host's own messages
            for first, last in js_.message_bounds(buf):
                if echo.take(bytes(buf[first : first + protocol.HEADER_SIZE]), (segment, start + last)):
                    self.figures.stream.echoes += 1
                    if first > run:
                        await self.publish_batch(buf[run:first], (segment, start + run))
                    run = last
            if run < len(buf):
                await self.publish_batch(buf[run:], (segment, start + run))

    async def _receive_js(self) -> None:
        """Find the hosts that publish on the stream and read each through a durable consumer of this host's."""
        stream = js_.stream_name(self.domain)
        readers: dict[str, asyncio.Task] = {}
        try:
            while True:
                with contextlib.suppress(Exception):
                    info = await self.js.stream_info(stream, subjects_filter=f"{self.subject}.>")
                    for subject in info.state.subjects or {}:
                        remote = subject[len(self.subject) + 1 :]
                        if remote != self.id and remote not in readers:
                            readers[remote] = asyncio.get_running_loop().create_task(self._read_host(remote))
                for task in readers.values():
                    if task.done():
                        task.result()
                await asyncio.sleep(js_.INFO_INTERVAL)
        finally:
            for task in readers.values():
                task.cancel()

    async def _read_host(self, remote: str) -> None:
        """Read one remote host's messages as they arrive; write them, then acknowledge once the relay has the bytes."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        settings = self.options.stream
        name = f"{self.id}_from_{remote}"
        stream = js_.stream_name(self.domain)
        config = ConsumerConfig(
            durable_name=name,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=settings.ack_wait,
            max_ack_pending=settings.max_ack_pending,
            filter_subject=f"{self.subject}.{remote}",
        )
        while True:
            try:
                await self.js.add_consumer(stream, config)
                break
            except Exception as exc:
                log.warning("cannot create consumer %s yet (%s: %s); trying again", name, type(exc).__name__, exc)
                await asyncio.sleep(0.5)
        reader = js_.PullReader(self.nc, stream, name)
        await reader.start(self.options.nats_pending_limit)
        self._consumers[remote] = name
        log.info("reading host %s through consumer %s", remote, name)
        requests = asyncio.get_running_loop().create_task(reader.request())
        try:
            while True:
                msgs = await reader.take()
                async with self._writing:
                    await self._take(msgs)
        finally:
            requests.cancel()

    async def _take(self, msgs: list) -> None:
        assert self.state is not None
        work = dict(self.state.streams)
        pieces: list[bytes | memoryview] = []
        acks: list = []
        written = [0, 0, 0]  # messages, bytes, NATS messages
        for msg in msgs:
            self._admit(msg, work, pieces, acks, written)
        await self._check_held()
        self._release_held(work, pieces, acks, written)
        figures = self.figures.stream
        assert figures is not None
        figures.held = sum(len(h) for h in self._held.values())
        if pieces:
            link = self._link
            if link is None or link.transport is None or link.transport.is_closing():
                return  # not acknowledged: the stream gives them again to the next bridge of this host
            if self.echo is not None:  # remembered before the relay can journal them
                self.state.pending = []
                for piece, origin in pieces:
                    buf = np.frombuffer(piece, dtype=np.uint8)
                    keys, sizes = [], []
                    for first, last in js_.message_bounds(buf):
                        keys.append(bytes(buf[first : first + protocol.HEADER_SIZE]))
                        sizes.append(last - first)
                    self.echo.waiting.update(keys)
                    if origin is not None:
                        self.state.pending.append([*origin, [k.hex() for k in keys], sizes])
                self.state.save(self.echo.persisted())
            for piece, _ in pieces:
                link.transport.write(piece)
            while link.transport.get_write_buffer_size() and not link.transport.is_closing():
                await asyncio.sleep(0.001)  # acknowledged only once the relay's socket holds every byte
            if link.transport.is_closing():
                return
            traffic = self.figures.from_nats
            traffic.messages += written[0]
            traffic.bytes += written[1]
            traffic.payloads += written[2]
        if work != self.state.streams or pieces:
            self.state.streams = work
            self.state.pending = []
            self.state.save(self.echo.persisted() if self.echo is not None else None)
        for msg in acks:
            with contextlib.suppress(Exception):
                await msg.ack()

    def _admit(self, msg: object, work: dict, pieces: list, acks: list, written: list, force: bool = False) -> None:
        """Decide what one fetched NATS message adds to the relay: all, a tail, nothing (a repeat), or later."""
        headers = msg.headers or {}  # type: ignore[attr-defined]
        data: bytes = msg.data  # type: ignore[attr-defined]
        sender = headers.get(HEADER_BRIDGE)
        if sender == self.id:  # this host's own, given back by the consumer
            acks.append(msg)
            return
        count, refusal = self._whole_messages(data)
        if refusal is not None:
            self.figures.refused_payloads += 1
            log.warning("refusing a NATS message of %d bytes on %s: %s", len(data), self.subject, refusal)
            acks.append(msg)
            return
        if sender is None or not count:
            if count:
                pieces.append((data, None))
                written[0] += count
                written[1] += len(data)
                written[2] += 1
            acks.append(msg)
            return
        try:
            sequence, offset = int(headers[HEADER_SEQUENCE]), int(headers[HEADER_OFFSET])
            previous = int(headers[js_.HEADER_PREVIOUS]) if js_.HEADER_PREVIOUS in headers else None
        except (KeyError, ValueError):
            acks.append(msg)
            return
        expected = work.get(sender)
        if expected is not None:
            if sequence + count <= expected[0]:  # written before: a redelivery or a republish
                self.figures.stream.redelivered += 1
                acks.append(msg)
                return
            if previous is not None and previous > expected[0] and not force:  # the one before it is not here yet
                self._held.setdefault(sender, {})[previous] = (time.monotonic(), msg)
                return
            if sequence > expected[0]:
                self._gap_from_nats(sender, expected, sequence, offset)
        skip = 0 if expected is None else max(0, expected[0] - sequence)
        view = memoryview(data)
        if skip:  # part of it was written before (the sender cut its batches differently after a restart)
            start = js_.message_bounds(np.frombuffer(data, dtype=np.uint8))[skip][0]
            view = view[start:]
        pieces.append((view, (sender, sequence + skip, offset + len(data) - len(view))))
        written[0] += count - skip
        written[1] += len(view)
        written[2] += 1
        work[sender] = (sequence + count, offset + len(data))
        acks.append(msg)

    async def _check_held(self) -> None:
        """A message held for a second: if the stream holds nothing of its sender before it, the ones it follows
        are gone (aged out, or never stored), so it need not wait any longer."""
        now = time.monotonic()
        for sender, held in self._held.items():
            first = min(held)
            since, msg = held[first]
            if now - since < js_.HOLD_CHECK or (sender, first) in self._held_checked:
                continue
            self._held_checked.add((sender, first))
            with contextlib.suppress(Exception):
                oldest = await self.js.get_msg(
                    js_.stream_name(self.domain), 1, subject=f"{self.subject}.{sender}", next=True
                )
                sequence = int(msg.headers[HEADER_SEQUENCE])  # type: ignore[attr-defined]
                if int((oldest.headers or {}).get(HEADER_SEQUENCE, -1)) >= sequence:
                    held[first] = (now - js_.HOLD_SECONDS, msg)  # due: released with its gap at once

    def _release_held(self, work: dict, pieces: list, acks: list, written: list) -> None:
        """Write held messages whose predecessor has arrived; after HOLD_SECONDS, the rest with their gap."""
        now = time.monotonic()
        for sender in list(self._held):
            held = self._held[sender]
            while held:
                expected = work.get(sender, (0, 0))[0]
                ready = [p for p in held if p <= expected]
                if ready:
                    for previous in sorted(ready):
                        self._admit(held.pop(previous)[1], work, pieces, acks, written, force=True)
                    continue
                first = min(held)
                if now - held[first][0] < js_.HOLD_SECONDS:
                    break
                self._admit(held.pop(first)[1], work, pieces, acks, written, force=True)
            if not held:
                del self._held[sender]
        if not self._held:
            self._held_checked.clear()

    async def _watch_js(self) -> None:
        """Refresh the consumer's lag and the stream's size for the figures; save the sender's position."""
        stream = js_.stream_name(self.domain)
        figures = self.figures.stream
        assert figures is not None and self.state is not None
        while True:
            await asyncio.sleep(js_.INFO_INTERVAL)
            with contextlib.suppress(Exception):
                pending = ack_pending = 0
                for name in list(self._consumers.values()):
                    consumer = await self.js.consumer_info(stream, name)
                    pending += consumer.num_pending or 0
                    ack_pending += consumer.num_ack_pending or 0
                figures.consumer_pending, figures.consumer_ack_pending = pending, ack_pending
                info = await self.js.stream_info(stream)
                figures.stream_messages = info.state.messages
                figures.stream_bytes = info.state.bytes
            with contextlib.suppress(OSError):
                self.state.save(self.echo.persisted() if self.echo is not None else None)

    async def _connect_nats(self, closed: asyncio.Future[None]) -> object:
        """A nats-py client with no echo that reconnects forever, to the next server of the cluster at once.

        ``closed`` is set if the client ever gives up for good.
        """
        import nats

        _widen_nats_reads()

        async def on_closed() -> None:
            if not closed.done():
                closed.set_result(None)

        return await nats.connect(
            list(self.options.servers),
            name=f"jitrelay-bridge {self.domain} {socket.gethostname()} {os.getpid()}",
            no_echo=True,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=self.options.reconnect_wait,  # type: ignore[arg-type]
            connect_timeout=2,
            pending_size=self.options.reconnect_buffer,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=on_closed,
        )

    async def _flush_outbox(self, pump: asyncio.Task) -> None:
        """On a stop, give what the relay already handed over up to a second to reach NATS."""
        if self._link is not None and self._link.transport is not None:
            self._link.transport.pause_reading()
        deadline = time.monotonic() + STOP_FLUSH_SECONDS
        while self._outbox and not pump.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.sender is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.sender.drained.wait(), max(0.01, deadline - time.monotonic()))
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=max(0.1, deadline - time.monotonic()))

    def _warm_up(self) -> None:
        """Compile (or load) the kernels the bridge calls, for writable and read-only buffers, before traffic."""
        sample = protocol.build_message(logic_for(self.domain).domain_id, [], timestamp_ns=0) * 2
        kernels.frame(np.frombuffer(sample, dtype=np.uint8).copy(), 0, len(sample))
        self._whole_messages(sample)

    def log_figures(self, state: str) -> None:
        log.info("jitrelay bridge %s %s: %s", self.domain, state, self.figures.summary())


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[T]) -> T | None:
    """The result of ``work``, or None if ``stop`` is set first (``work`` is then cancelled)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


def _widen_nats_reads() -> None:
    """Make nats-py read its socket ``NATS_READ_SIZE`` bytes at a time instead of 32 KiB.

    nats-py has no option for it: its read loop and its transports look up
    the module constant ``DEFAULT_BUFFER_SIZE`` each time. With 32 KiB reads a
    receiving bridge spends about twice the CPU per byte (a read-loop turn,
    a StreamReader pause and resume and a growth of the parser's buffer per
    32 KiB), and at full speed the server drops it as a slow consumer sooner.
    """
    import nats.aio.client

    if getattr(nats.aio.client, "DEFAULT_BUFFER_SIZE", NATS_READ_SIZE) < NATS_READ_SIZE:
        nats.aio.client.DEFAULT_BUFFER_SIZE = NATS_READ_SIZE


def _gap_reason(exc: Exception, buffer: int) -> str:
    from nats.errors import OutboundBufferLimitError

    if isinstance(exc, OutboundBufferLimitError):
        return f"disconnected from NATS and the {buffer}-byte reconnect buffer is full"
    return f"publish failed: {type(exc).__name__}: {exc}"


def _url(nc: object) -> str:
    url = getattr(nc, "connected_url", None)
    return f"nats://{url.hostname}:{url.port}" if url is not None else "?"


# Metrics


class _BridgeCollector:
    """The bridge's figures as Prometheus metric families, read on the event-loop thread at scrape time."""

    def __init__(self, bridge: Bridge, loop: asyncio.AbstractEventLoop) -> None:
        self.bridge = bridge
        self.loop = loop

    def _snapshot(self) -> BridgeFigures:
        f = self.bridge.figures
        subscription = self.bridge.subscription
        return BridgeFigures(
            Traffic(**vars(f.to_nats)),
            Traffic(**vars(f.from_nats)),
            Gaps(**vars(f.gap_to_nats)),
            Gaps(**vars(f.gap_from_nats)),
            f.refused_payloads,
            f.reconnects,
            f.disconnected_seconds,
            f.connected,
            f.client_drops,
            getattr(subscription, "pending_bytes", 0) if subscription is not None else 0,
            js_.StreamFigures(**vars(f.stream)) if f.stream is not None else None,
        )

    def collect(self) -> Iterator[object]:
        from prometheus_client.metrics_core import CounterMetricFamily

        from jitrelay.server.exposition import call_on_loop, domain_counter, domain_gauge

        f = call_on_loop(self.loop, self._snapshot)
        domain = self.bridge.domain
        counter = functools.partial(domain_counter, domain)
        gauge = functools.partial(domain_gauge, domain)

        def by_direction(name: str, doc: str, to_nats: float, from_nats: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["domain", "direction"])
            family.add_metric([domain, "to_nats"], to_nats)
            family.add_metric([domain, "from_nats"], from_nats)
            return family

        to, back = f.to_nats, f.from_nats
        yield by_direction("jitrelay_bridge_messages_total", "Protocol messages carried.", to.messages, back.messages)
        yield by_direction("jitrelay_bridge_bytes_total", "Bytes of protocol messages carried.", to.bytes, back.bytes)
        yield by_direction(
            "jitrelay_bridge_nats_messages_total", "NATS messages that carried them.", to.payloads, back.payloads
        )
        lost, missed = f.gap_to_nats, f.gap_from_nats
        yield by_direction(
            "jitrelay_bridge_gap_messages_total",
            "Protocol messages lost: not handed to NATS (to_nats), or missing from a remote bridge's stream.",
            lost.messages,
            missed.messages,
        )
        yield by_direction(
            "jitrelay_bridge_gap_bytes_total", "Bytes of the messages counted as lost.", lost.bytes, missed.bytes
        )
        yield by_direction("jitrelay_bridge_gaps_total", "Separate gaps.", lost.events, missed.events)
        yield counter(
            "jitrelay_bridge_refused_total",
            "NATS messages not written to the relay: not whole messages, oversize, or holding control messages.",
            f.refused_payloads,
        )
        yield counter("jitrelay_bridge_reconnects_total", "Reconnections to NATS.", f.reconnects)
        yield counter(
            "jitrelay_bridge_disconnected_seconds_total", "Time spent reconnecting to NATS.", f.disconnected_seconds
        )
        yield counter(
            "jitrelay_bridge_client_drops_total",
            "NATS messages the NATS client dropped because the relay was behind (their messages are a gap from NATS).",
            f.client_drops,
        )

        yield gauge("jitrelay_bridge_connected", "1 while connected to NATS.", 1.0 if f.connected else 0.0)
        yield gauge("jitrelay_bridge_nats_pending_bytes", "Bytes the NATS client holds for the relay.", f.pending_bytes)
        if f.stream is not None:
            yield from _stream_families(f.stream, counter, gauge)


def _stream_families(s: js_.StreamFigures, counter: Callable, gauge: Callable) -> Iterator[object]:
    """The JetStream side's figures: publishes awaiting acknowledgement, the consumer's lag, the stream's size."""
    yield gauge("jitrelay_bridge_js_publishes_in_flight", "Publishes awaiting acknowledgement.", s.in_flight)
    yield counter("jitrelay_bridge_js_republished_total", "NATS messages published again, in order.", s.republished)
    yield counter("jitrelay_bridge_js_duplicates_total", "Publishes the stream had already stored.", s.duplicates)
    yield counter("jitrelay_bridge_js_stream_full_total", "Publishes the stream refused as full.", s.stream_full)
    yield gauge(
        "jitrelay_bridge_js_consumer_pending", "Stream messages not given to this host yet.", s.consumer_pending
    )
    yield gauge("jitrelay_bridge_js_consumer_ack_pending", "Delivered, not acknowledged yet.", s.consumer_ack_pending)
    yield counter(
        "jitrelay_bridge_js_redelivered_total", "NATS messages given again and not written again.", s.redelivered
    )
    yield gauge("jitrelay_bridge_js_held", "NATS messages waiting for the one they follow.", s.held)
    yield counter("jitrelay_bridge_js_echoes_total", "Journal messages not sent: this bridge wrote them.", s.echoes)
    yield gauge("jitrelay_bridge_js_stream_messages", "Messages the stream holds.", s.stream_messages)
    yield gauge("jitrelay_bridge_js_stream_bytes", "Bytes the stream holds.", s.stream_bytes)


def serve_metrics(bridge: Bridge, loop: asyncio.AbstractEventLoop, port: int) -> object:
    """Serve the bridge's figures on http://127.0.0.1:PORT/metrics (port 0 picks one); the server."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    from jitrelay.server.exposition import serve_http

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_BridgeCollector(bridge, loop))  # type: ignore[arg-type]
    ProcessCollector(registry=registry)
    try:
        server, _ = serve_http(registry, port)
    except OSError as exc:
        raise BridgeError(exc.strerror or str(exc)) from exc
    return server


async def serve_bridge(options: BridgeOptions) -> Bridge:
    """Run a bridge until SIGINT/SIGTERM; return it for its figures."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    bridge = Bridge(options)
    loop.add_signal_handler(signal.SIGUSR1, bridge.log_figures, "running")
    try:
        await bridge.run(stop)
    finally:
        bridge.log_figures("stopped")
    return bridge


def run_bridge(options: BridgeOptions) -> int:
    """``jitrelay bridge`` on uvloop: 0 after SIGINT/SIGTERM, 1 when the relay or NATS cannot be used."""
    import uvloop

    try:
        import nats  # noqa: F401  (an extra: the relay itself does not need it)
    except ImportError:
        log.error("the bridge needs nats-py, which is not installed: pip install 'jitrelay[bridge]'")
        return 1
    try:
        uvloop.run(serve_bridge(options))
    except BridgeError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot reach NATS at %s: %s", ",".join(options.servers), exc)
        return 1
    return 0
