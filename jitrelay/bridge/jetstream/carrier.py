"""The JetStream carrier: the stream, where this host's sending stands in it, and the state file."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np

from jitrelay.bridge.carrier import HEADER_OFFSET, HEADER_SEQUENCE, Carrier, SenderPosition, wait_until
from jitrelay.bridge.figures import StreamFigures
from jitrelay.bridge.jetstream.journal import JournalTail, message_bounds
from jitrelay.bridge.jetstream.receiver import INFO_INTERVAL, StreamReceiver
from jitrelay.bridge.jetstream.sender import Publish, StreamSender, last_position
from jitrelay.bridge.jetstream.state import BridgeState, EchoFilter
from jitrelay.bridge.options import BridgeOptions, StreamSettings
from jitrelay.core import protocol
from jitrelay.core.units import MiB

log = logging.getLogger("jitrelay.bridge")

TAIL_POLL = 0.05  # the journal is read at least this often; a batch from the relay wakes it at once


def stream_name(domain: str) -> str:
    """The domain's stream: ``JITRELAY_<DOMAIN>``."""
    return f"JITRELAY_{domain.upper()}"


def stream_config(settings: StreamSettings, domain: str, subject: str) -> Any:
    """The nats-py StreamConfig of the domain's stream, as the first bridge to start creates it."""
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

    return StreamConfig(
        name=stream_name(domain),
        description=f"jitrelay {domain} between hosts",
        subjects=[f"{subject}.>"],
        retention=RetentionPolicy.LIMITS,
        max_age=settings.max_age,
        max_bytes=settings.max_bytes,
        discard=DiscardPolicy.NEW,
        storage=StorageType.FILE,
        num_replicas=settings.replicas,
        duplicate_window=min(settings.duplicate_window, settings.max_age),
    )


class JetStreamCarrier(Carrier):
    """Carries the domain through the replicated stream, without loss; its bridge id is the host's name.

    Nothing goes out before the stream is reached: batches wait in the
    outbox, or in the journal where the relay journals.
    """

    coalesces = True  # every publish waits for the replicas: the batches that wait travel together
    outbox_high = 4 * MiB  # the window of publishes awaiting acknowledgement holds more
    outbox_low = 1 * MiB

    def __init__(self, options: BridgeOptions) -> None:
        assert options.host is not None
        super().__init__(options, options.host)
        self.stream_figures = StreamFigures()
        self.stream = stream_name(options.domain)
        self.lossy = not options.hold_when_full
        self.js: Any = None  # the JetStream context, once connected
        self.sender: StreamSender | None = None
        self.receiver: StreamReceiver | None = None
        self.tail: JournalTail | None = None
        self.tail_kick = asyncio.Event()
        self.echo: EchoFilter | None = None
        self.state: BridgeState | None = None

    async def start(self) -> str:
        """Create (or find) the stream, the sender and the receiver; pick up where this host left off.

        Raises what nats-py raises when the sender cannot subscribe to its replies.
        """
        options, bridge = self.options, self.bridge
        self.js = bridge.nc.jetstream(timeout=5)
        self.state = BridgeState(Path(str(options.state_dir)) / f"bridge-{options.domain}-{self.id}.state").load()
        if options.use_journal:
            self.echo = EchoFilter()
            self.echo.waiting.update(self.state.echo)
        await self._open_stream(bridge.subject)
        found = await self._resume(bridge.position)
        if self.tail is not None and self.state.pending:
            self._reconcile(JournalTail(Path(str(options.journal_dir)), options.domain), found)
        self._remember_sender(bridge.position)
        assert self.stream_figures is not None
        self.sender = StreamSender(
            bridge.nc,
            bridge.subject,
            self.id,
            options.stream,
            self.stream_figures,
            self.lossy,
            self._on_stored,
            bridge.gaps.count,
        )
        self.sender.previous = bridge.position.sequence
        await self.sender.start()
        self.receiver = StreamReceiver(
            bridge, self.js, self.stream, self.state, self.echo, self.stream_figures, self.save_state
        )
        self.save_state()
        return f"JetStream stream {self.stream} as host {self.id}"

    async def _open_stream(self, subject: str) -> None:
        """Create the stream, or use the one another bridge created; try again until JetStream answers."""
        from nats.js.errors import BadRequestError

        config = stream_config(self.options.stream, self.options.domain, subject)
        while True:
            try:
                await self.js.add_stream(config)
                return
            except BadRequestError as exc:  # created by another bridge with other settings: use it as it is
                log.warning(
                    "stream %s exists with other settings (%s); using it as it is", self.stream, exc.description
                )
                await self.js.stream_info(self.stream)
                return
            except Exception as exc:  # no JetStream leader yet, a node away: try again
                log.warning("cannot create stream %s yet (%s: %s); trying again", self.stream, type(exc).__name__, exc)
                await asyncio.sleep(0.5)

    async def _resume(self, position: SenderPosition) -> SenderPosition | None:
        """Move ``position`` to where this host's messages in the stream end (else where the state says);
        open the journal there. What was found, or None."""
        assert self.state is not None
        own = f"{self.bridge.subject}.{self.id}"
        while True:
            try:
                found = await last_position(self.js, self.stream, own)
                break
            except Exception as exc:
                log.warning("cannot read the stream's last message of %s yet (%s); trying again", own, exc)
                await asyncio.sleep(0.5)
        saved = self.state.sender
        if found is None and saved:
            journal = tuple(saved["journal"]) if saved.get("journal") else None
            found = SenderPosition(int(saved["sequence"]), int(saved["offset"]), journal)
        if found is not None:
            position.sequence, position.offset, position.journal = found.sequence, found.offset, found.journal
        if self.options.use_journal:
            self.tail = JournalTail(Path(str(self.options.journal_dir)), self.options.domain)
            if found is not None and found.journal is not None:
                self.tail.position = found.journal
            log.info("sending from journal %s at segment %d byte %d", self.options.journal_dir, *self.tail.position)
        return found

    def _reconcile(self, journal: JournalTail, sent: SenderPosition | None) -> None:
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
            journal.position = tuple(self.state.sender["journal"])
        else:
            journal.position = (1, 0)
        found: set[bytes] = set()
        while (got := journal.read()) is not None:
            buf, journal.position = got
            for first, _ in message_bounds(buf):
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

    def save_state(self, tolerant: bool = False) -> None:
        """Replace the state file with what the carrier knows now, echoes included.

        Raises OSError when the file cannot be written, unless ``tolerant``
        (a periodic save, or the last one at a stop).
        """
        assert self.state is not None
        try:
            self.state.save(self.echo.persisted() if self.echo is not None else None)
        except OSError:
            if not tolerant:
                raise

    def _remember_sender(self, position: SenderPosition) -> None:
        """Where the sending side stands, for the state file; raises nothing."""
        assert self.state is not None
        journal = list(position.journal) if position.journal else None
        self.state.sender = {"sequence": position.sequence, "offset": position.offset, "journal": journal}

    def _on_stored(self, entry: Publish) -> None:
        """A publish the stream stored: count it, and move the sender's saved position past it."""
        self.bridge.figures.to_nats.add(entry.count, len(entry.payload))
        self.bridge.gaps.close()
        sequence = int(entry.headers[HEADER_SEQUENCE]) + entry.count
        offset = int(entry.headers[HEADER_OFFSET]) + len(entry.payload)
        self._remember_sender(SenderPosition(sequence, offset, entry.journal_end))
        if entry.journal_end is not None and self.echo is not None:
            self.echo.passed(entry.journal_end)

    def on_relay_batch(self, batch: np.ndarray) -> bool:
        """Reading the journal, a batch from the relay is only a sign that there is more to read."""
        if not self.options.use_journal:
            return False
        self.tail_kick.set()
        return True

    def pump(self) -> Coroutine[Any, Any, None] | None:
        """The journal reader, where the carrier sends what the relay journals."""
        return self._pump_journal() if self.tail is not None else None

    def tasks(self) -> list[Coroutine[Any, Any, None]]:
        """The sender's resends, the receiver, and the figures' refresh."""
        assert self.sender is not None and self.receiver is not None
        return [self.sender.watch(), self.receiver.run(), self._watch()]

    async def send(self, payload: memoryview, count: int, journal_end: tuple[int, int] | None) -> None:
        """Queue one publish in the window; waits while the window is full."""
        assert self.sender is not None
        # Kept for a resend without a copy: batches from the framer and the journal are never reused.
        await self.sender.publish(payload, count, self.bridge.position, journal_end)

    async def drain(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the stream to acknowledge the window."""
        if self.sender is not None:
            await wait_until(self.sender.drained, seconds)

    def close(self) -> None:
        """Save the state a last time, if there is one."""
        if self.state is not None:
            self.save_state(tolerant=True)

    async def _pump_journal(self) -> None:
        """Send what the relay journals, from the tail's position on, skipping what this bridge wrote into it."""
        tail, echo, bridge = self.tail, self.echo, self.bridge
        assert tail is not None and echo is not None and self.stream_figures is not None
        while True:
            got = tail.read()
            if got is None:
                self.tail_kick.clear()
                await wait_until(self.tail_kick, TAIL_POLL)
                continue
            buf, end = got
            segment, start = tail.position
            tail.position = end
            if not echo.waiting:
                await bridge.publish_batch(buf, (segment, start))
                continue
            run = 0  # start of the current run of this host's own messages
            for first, last in message_bounds(buf):
                if echo.take(bytes(buf[first : first + protocol.HEADER_SIZE]), (segment, start + last)):
                    self.stream_figures.echoes += 1
                    if first > run:
                        await bridge.publish_batch(buf[run:first], (segment, start + run))
                    run = last
            if run < len(buf):
                await bridge.publish_batch(buf[run:], (segment, start + run))

    async def _watch(self) -> None:
        """Refresh the consumers' lag and the stream's size for the figures; save the state."""
        figures, receiver = self.stream_figures, self.receiver
        assert figures is not None and receiver is not None
        while True:
            await asyncio.sleep(INFO_INTERVAL)
            with contextlib.suppress(Exception):
                pending = ack_pending = 0
                for name in list(receiver.consumers.values()):
                    consumer = await self.js.consumer_info(self.stream, name)
                    pending += consumer.num_pending or 0
                    ack_pending += consumer.num_ack_pending or 0
                figures.consumer_pending, figures.consumer_ack_pending = pending, ack_pending
                info = await self.js.stream_info(self.stream)
                figures.stream_messages = info.state.messages
                figures.stream_bytes = info.state.bytes
            self.save_state(tolerant=True)
