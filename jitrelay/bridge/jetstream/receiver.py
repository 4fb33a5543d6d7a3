"""The JetStream carrier's receiving side: each other host's messages, once and in order, into the relay."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jitrelay.bridge.carrier import HEADER_BRIDGE, HEADER_OFFSET, HEADER_SEQUENCE, Lifecycle
from jitrelay.bridge.figures import StreamFigures, Traffic
from jitrelay.bridge.jetstream.journal import message_bounds
from jitrelay.bridge.jetstream.sender import HEADER_PREVIOUS
from jitrelay.bridge.jetstream.state import BridgeState, EchoFilter
from jitrelay.core import protocol

log = logging.getLogger("jitrelay.bridge")

FETCH_BATCH = 128  # NATS messages asked for per pull: fewer round trips; 128 of 1 MiB stay below the pending limit
FETCH_WAIT = 1.0
# How long a message waits for the one it follows before that one is counted as a gap: longer than the
# consumer's ack wait, after which what a killed receiver had been given is given again.
HOLD_SECONDS = 20.0
HOLD_CHECK = 1.0  # after this long, ask the stream whether the messages a held one follows are there at all
INFO_INTERVAL = 1.0  # consumer and stream figures refreshed this often


@dataclass
class _Batch:
    """What one fetched batch adds to the relay: pieces to write with their origin, messages to acknowledge."""

    work: dict[str, tuple[int, int]]  # per sending host, the next (sequence, offset) expected once it is written
    pieces: list[tuple[bytes | memoryview, tuple[str, int, int] | None]] = field(default_factory=list)
    acks: list[Any] = field(default_factory=list)
    written: Traffic = field(default_factory=Traffic)


@dataclass(eq=False, repr=False)
class StreamReceiver:
    """Reads every other host's subject through a durable consumer of this host's and writes it into the relay.

    A message is acknowledged only once the relay's socket holds its bytes;
    what was written before (a redelivery, a republish) is not written again,
    and a message that arrives before the one it follows waits for it.
    """

    bridge: Lifecycle
    js: Any
    stream: str
    state: BridgeState
    echo: EchoFilter | None
    figures: StreamFigures
    save_state: Callable[[], None]
    consumers: dict[str, str] = field(default_factory=dict, init=False)  # remote host -> its durable consumer
    _held: dict[str, dict[int, tuple[float, Any]]] = field(default_factory=dict, init=False)
    # held messages whose predecessors were looked for
    _held_checked: set[tuple[str, int]] = field(default_factory=set, init=False)
    # one fetched batch at a time goes into the relay and the state file
    _writing: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    async def run(self) -> None:
        """Find the hosts that publish on the stream and read each (a task); raises what stops a reader."""
        subject = self.bridge.subject
        readers: dict[str, asyncio.Task] = {}
        try:
            while True:
                with contextlib.suppress(Exception):
                    info = await self.js.stream_info(self.stream, subjects_filter=f"{subject}.>")
                    for name in info.state.subjects or {}:
                        remote = name[len(subject) + 1 :]
                        if remote != self.bridge.id and remote not in readers:
                            readers[remote] = asyncio.get_running_loop().create_task(self._read_host(remote))
                for task in readers.values():
                    if task.done():
                        task.result()
                await asyncio.sleep(INFO_INTERVAL)
        finally:
            for task in readers.values():
                task.cancel()

    async def _read_host(self, remote: str) -> None:
        """Read one remote host's messages as they arrive; write them, then acknowledge once the relay has the bytes."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        options = self.bridge.options
        name = f"{self.bridge.id}_from_{remote}"
        config = ConsumerConfig(
            durable_name=name,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=options.stream.ack_wait,
            max_ack_pending=options.stream.max_ack_pending,
            filter_subject=f"{self.bridge.subject}.{remote}",
        )
        while True:
            try:
                await self.js.add_consumer(self.stream, config)
                break
            except Exception as exc:
                log.warning("cannot create consumer %s yet (%s: %s); trying again", name, type(exc).__name__, exc)
                await asyncio.sleep(0.5)
        reader = PullReader(self.bridge.nc, self.stream, name)
        await reader.start(options.nats_pending_limit)
        self.consumers[remote] = name
        log.info("reading host %s through consumer %s", remote, name)
        requests = asyncio.get_running_loop().create_task(reader.request())
        try:
            while True:
                msgs = await reader.take()
                async with self._writing:
                    await self._take(msgs)
        finally:
            requests.cancel()

    async def _take(self, msgs: list[Any]) -> None:
        """Write what a fetch brought into the relay, save where each sender stands, then acknowledge."""
        batch = _Batch(dict(self.state.streams))
        for msg in msgs:
            self._admit(msg, batch)
        await self._check_held()
        self._release_held(batch)
        self.figures.held = sum(len(h) for h in self._held.values())
        if batch.pieces and not await self._write(batch):
            return  # not acknowledged: the stream gives them again to the next bridge of this host
        if batch.work != self.state.streams or batch.pieces:
            self.state.streams = batch.work
            self.state.pending = []
            self.save_state()
        for msg in batch.acks:
            with contextlib.suppress(Exception):
                await msg.ack()

    async def _write(self, batch: _Batch) -> bool:
        """Write the batch's pieces into the relay; whether its socket took every byte."""
        link = self.bridge.link
        if link is None or not link.open:
            return False
        assert link.transport is not None
        if self.echo is not None:  # remembered before the relay can journal them
            self._remember_echoes(batch, self.echo)
        for piece, _ in batch.pieces:
            link.transport.write(piece)
        while link.transport.get_write_buffer_size() and not link.transport.is_closing():
            await asyncio.sleep(0.001)  # acknowledged only once the relay's socket holds every byte
        if link.transport.is_closing():
            return False
        self.bridge.figures.from_nats.add_traffic(batch.written)
        return True

    def _remember_echoes(self, batch: _Batch, echo: EchoFilter) -> None:
        """Name the batch's messages in the state, saved, before the relay can journal them."""
        self.state.pending = []
        for piece, origin in batch.pieces:
            buf = np.frombuffer(piece, dtype=np.uint8)
            keys, sizes = [], []
            for first, last in message_bounds(buf):
                keys.append(bytes(buf[first : first + protocol.HEADER_SIZE]))
                sizes.append(last - first)
            echo.waiting.update(keys)
            if origin is not None:
                self.state.pending.append([*origin, [k.hex() for k in keys], sizes])
        self.save_state()

    def _admit(self, msg: Any, batch: _Batch, force: bool = False) -> None:
        """Decide what one fetched NATS message adds to the relay: all, a tail, nothing (a repeat), or later."""
        headers = msg.headers or {}
        data: bytes = msg.data
        sender = headers.get(HEADER_BRIDGE)
        if sender == self.bridge.id:  # this host's own, given back by the consumer
            batch.acks.append(msg)
            return
        count = self.bridge.check.admit(data)
        if count is None:
            batch.acks.append(msg)
            return
        if sender is None or not count:
            if count:
                batch.pieces.append((data, None))
                batch.written.add(count, len(data))
            batch.acks.append(msg)
            return
        try:
            sequence, offset = int(headers[HEADER_SEQUENCE]), int(headers[HEADER_OFFSET])
            previous = int(headers[HEADER_PREVIOUS]) if HEADER_PREVIOUS in headers else None
        except (KeyError, ValueError):
            batch.acks.append(msg)
            return
        expected = batch.work.get(sender)
        if expected is not None:
            if sequence + count <= expected[0]:  # written before: a redelivery or a republish
                self.figures.redelivered += 1
                batch.acks.append(msg)
                return
            if previous is not None and previous > expected[0] and not force:  # the one before it is not here yet
                self._held.setdefault(sender, {})[previous] = (time.monotonic(), msg)
                return
            if sequence > expected[0]:
                self.bridge.figures.missed(sender, expected, sequence, offset)
        skip = 0 if expected is None else max(0, expected[0] - sequence)
        view = memoryview(data)
        if skip:  # part of it was written before (the sender cut its batches differently after a restart)
            start = message_bounds(np.frombuffer(data, dtype=np.uint8))[skip][0]
            view = view[start:]
        batch.pieces.append((view, (sender, sequence + skip, offset + len(data) - len(view))))
        batch.written.add(count - skip, len(view))
        batch.work[sender] = (sequence + count, offset + len(data))
        batch.acks.append(msg)

    async def _check_held(self) -> None:
        """A message held for a second: if the stream holds nothing of its sender before it, the ones it follows
        are gone (aged out, or never stored), so it need not wait any longer."""
        now = time.monotonic()
        for sender, held in self._held.items():
            first = min(held)
            since, msg = held[first]
            if now - since < HOLD_CHECK or (sender, first) in self._held_checked:
                continue
            self._held_checked.add((sender, first))
            with contextlib.suppress(Exception):
                oldest = await self.js.get_msg(self.stream, 1, subject=f"{self.bridge.subject}.{sender}", next=True)
                sequence = int(msg.headers[HEADER_SEQUENCE])
                if int((oldest.headers or {}).get(HEADER_SEQUENCE, -1)) >= sequence:
                    held[first] = (now - HOLD_SECONDS, msg)  # due: released with its gap at once

    def _release_held(self, batch: _Batch) -> None:
        """Write held messages whose predecessor has arrived; after HOLD_SECONDS, the rest with their gap."""
        now = time.monotonic()
        for sender in list(self._held):
            held = self._held[sender]
            while held:
                expected = batch.work.get(sender, (0, 0))[0]
                ready = [p for p in held if p <= expected]
                if ready:
                    for previous in sorted(ready):
                        self._admit(held.pop(previous)[1], batch, force=True)
                    continue
                first = min(held)
                if now - held[first][0] < HOLD_SECONDS:
                    break
                self._admit(held.pop(first)[1], batch, force=True)
            if not held:
                del self._held[sender]
        if not self._held:
            self._held_checked.clear()


class PullReader:
    """A durable pull consumer read as a flow: one request for up to ``batch`` messages outstanding at a time,
    every message handed over as soon as it arrives.

    nats-py's ``fetch`` collects a batch before it returns: a lingering pull
    waits for the whole batch or its timeout, which at a paced rate adds the
    time ``batch`` messages take to arrive to every message's latency. Here a
    message is ready the moment it is delivered, and the next request goes out
    once the one before is fulfilled or over (the server's 408 at its expiry,
    404, 409) and what it brought has mostly been taken, so at most about two
    batches wait in memory.
    """

    def __init__(self, nc: Any, stream: str, consumer: str, batch: int = FETCH_BATCH, expires: float = 2.0) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.batch = batch
        self.expires = expires
        self.queue: collections.deque[Any] = collections.deque()
        self.ready = asyncio.Event()
        self.taken = asyncio.Event()
        self.done = asyncio.Event()
        self.asked = self.received = 0
        self.last_status = ""
        self.inbox = ""

    async def start(self, pending_bytes_limit: int) -> None:
        """Subscribe to the reader's inbox; raises what nats-py raises."""
        self.inbox = self.nc.new_inbox()
        await self.nc.subscribe(self.inbox, cb=self._on_msg, pending_bytes_limit=pending_bytes_limit)

    async def _on_msg(self, msg: Any) -> None:
        status = msg.headers.get("Status") if msg.headers and not msg.data else None
        if status is not None:  # 404 no messages, 408 the request expired, 409 max ack pending or a leader change
            if status != "100":
                self.last_status = status
                self.done.set()
            return
        self.queue.append(msg)
        self.ready.set()
        self.received += 1
        if self.received >= self.asked:
            self.done.set()

    async def request(self) -> None:
        """Keep one pull request outstanding, forever (a task)."""
        request = json.dumps({"batch": self.batch, "expires": int(self.expires * 1e9)}).encode()
        while True:
            while len(self.queue) > self.batch // 2:
                self.taken.clear()
                await self.taken.wait()
            self.asked, self.received, self.last_status = self.batch, 0, ""
            self.done.clear()
            with contextlib.suppress(Exception):
                await self.nc.publish(self.subject, request, reply=self.inbox)
            with contextlib.suppress(asyncio.TimeoutError):  # a request lost with a server: ask again
                await asyncio.wait_for(self.done.wait(), self.expires + 1.0)
            if self.last_status not in ("", "408") and not self.received:
                await asyncio.sleep(0.05)  # refused (409: too many unacknowledged, no leader yet): not at once

    async def take(self, timeout: float = FETCH_WAIT) -> list[Any]:
        """Every message delivered and not yet taken; waits up to ``timeout`` for one; [] if none came."""
        if not self.queue:
            self.ready.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ready.wait(), timeout)
        msgs = list(self.queue)
        self.queue.clear()
        self.taken.set()
        return msgs
