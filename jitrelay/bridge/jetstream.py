"""The bridge over NATS JetStream: a domain carried between hosts without loss.

What it must do: every whole-message batch a host's relay forwards reaches
every other host's relay once, in order per sending host, through a bridge
restart, a NATS node failure or a network cut; what still cannot be carried
(a stream limit reached on a lossy domain, retention expired before a host
came back) is counted and logged as a gap, never silent.

The plan:

- One stream per domain (``JITRELAY_<DOMAIN>``, subjects ``<subject>.>``,
  file storage, replicated, limits by age and size, ``discard new``). Each
  host publishes on ``<subject>.<host>``, each NATS message with the headers
  of the core bridge (sender, sequence, offset) plus ``Jitrelay-Previous``
  (where the sender's previous NATS message ended) and ``Nats-Msg-Id``
  ``<host>:<sequence>``, so the stream drops a republished one within its
  duplicate window.
- ``StreamSender`` publishes asynchronously with a bounded window of
  publishes awaiting acknowledgement and its own reply inbox (nats-py's
  ``publish_async`` never resolves a future whose reply is an error). A
  rejected, unanswered or failed publish is sent again, in order, with the same
  id; the window full (the stream is full, or NATS is away) holds the sender
  back. A lossy domain counts a publish the full stream refused as a gap
  instead.
- What the sender publishes comes from the relay's socket, or, where the
  relay journals (execution), from the journal (``JournalTail``): a sending
  bridge that was down resumes after the last message of its own the stream
  holds, so nothing the relay forwarded meanwhile is lost and nothing is sent
  twice. The journal also holds what this host's receiving side wrote into
  the relay; those messages are recognised by their 32-byte header (which
  carries the CRC of the whole message in a checksummed domain) and skipped,
  so nothing comes back to the host it came from.
- The receiving side (``Bridge._read_host``) reads each other host's subject
  through a durable pull consumer ``<host>_from_<remote>``, writes a fetched
  batch into the relay, and acknowledges it only once the relay's socket has
  taken every byte. It keeps, per sending host, the next
  sequence it expects, in a state file replaced atomically after the relay
  took the bytes, so a redelivered message is never written twice; a message
  that arrives before the one it follows (a republish after a node failure)
  waits, unacknowledged, until the one before it arrives.

Not measured yet: fsync of the state file (it is not fsynced: a process kill
loses nothing, a power cut may replay one batch).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.units import MiB
from jitrelay.core.views import message_offsets

log = logging.getLogger("jitrelay.bridge")

HEADER_PREVIOUS = "Jitrelay-Previous"  # sequence where the sender's previous NATS message ended
HEADER_JOURNAL = "Jitrelay-Journal"  # "<segment>:<offset>" of the journal just after this message's last one
HEADER_MSG_ID = "Nats-Msg-Id"
STREAM_FULL_CODES = (10077, 10078)  # maximum bytes / maximum messages exceeded
ACK_TIMEOUT = 2.0  # a publish not acknowledged after this long is sent again
RETRY_WAIT = 0.1  # first pause before a rejected window is sent again; doubles to RETRY_WAIT_MAX
RETRY_WAIT_MAX = 1.0
FETCH_BATCH = 128  # NATS messages asked for per pull: fewer round trips; 128 of 1 MiB stay below the pending limit
FETCH_WAIT = 1.0
# How long a message waits for the one it follows before that one is counted as a gap: longer than the
# consumer's ack wait, after which what a killed receiver had been given is given again.
HOLD_SECONDS = 20.0
HOLD_CHECK = 1.0  # after this long, ask the stream whether the messages a held one follows are there at all
INFO_INTERVAL = 1.0  # consumer and stream figures refreshed this often
TAIL_POLL = 0.05  # the journal is read at least this often; a batch from the relay wakes it at once
TAIL_READ = 1 * MiB
_NAME = re.compile(r"[^A-Za-z0-9_-]")


def stream_name(domain: str) -> str:
    return f"JITRELAY_{domain.upper()}"


def host_token(host: str) -> str:
    """A host name as a NATS subject token and consumer name: letters, digits, ``-`` and ``_``."""
    token = _NAME.sub("_", host)
    if not token:
        raise ValueError(f"not a host name: {host!r}")
    return token


@dataclass
class StreamSettings:
    """The stream and consumer settings the bridge creates (the first bridge to start creates the stream)."""

    replicas: int = 3
    max_age: float = 24 * 3600.0
    max_bytes: int = 1024 * MiB
    duplicate_window: float = 120.0
    max_in_flight: int = 64  # publishes awaiting acknowledgement
    max_ack_pending: int = 1024  # NATS messages a receiver holds unacknowledged
    ack_wait: float = 5.0  # seconds before the stream gives an unacknowledged message again

    def stream_config(self, domain: str, subject: str) -> Any:
        from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

        return StreamConfig(
            name=stream_name(domain),
            description=f"jitrelay {domain} between hosts",
            subjects=[f"{subject}.>"],
            retention=RetentionPolicy.LIMITS,
            max_age=self.max_age,
            max_bytes=self.max_bytes,
            discard=DiscardPolicy.NEW,
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=min(self.duplicate_window, self.max_age),
        )


@dataclass
class StreamFigures:
    """What the JetStream side shows besides the core bridge's figures."""

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
        return (
            f"{self.in_flight} publishes awaiting acknowledgement, {self.republished} republished, "
            f"{self.duplicates} duplicates dropped by the stream, {self.stream_full} refused as full; "
            f"consumer lag {self.consumer_pending} messages, {self.consumer_ack_pending} unacknowledged, "
            f"{self.redelivered} redelivered and not written again, {self.held} held; "
            f"stream {self.stream_messages} messages ({self.stream_bytes} bytes); {self.echoes} journal echoes skipped"
        )


# The state file


class BridgeState:
    """What a bridge must remember across its own restart, in one JSON file replaced atomically.

    ``streams``: per sending host, the next (sequence, offset) the receiver
    expects. ``echo``: headers of messages the receiver wrote into the relay
    that the journal reader has not passed yet. ``sender``: where the sending
    side stands (sequence, offset, journal position), for when the stream holds
    nothing of this host's. ``pending``: the batch being written into the relay
    (saved before the write, cleared after it), for a restart to find out from
    the journal how much of it the relay took.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.streams: dict[str, tuple[int, int]] = {}
        self.echo: collections.Counter[bytes] = collections.Counter()
        self.sender: dict[str, Any] = {}
        self.pending: list[list[Any]] = []  # the batch being written: [sender, sequence, offset, headers, sizes]
        self.writes = 0

    def load(self) -> BridgeState:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return self
        except (OSError, ValueError) as exc:
            log.warning("ignoring the bridge state in %s: %s", self.path, exc)
            return self
        self.streams = {k: (int(v[0]), int(v[1])) for k, v in data.get("streams", {}).items()}
        self.echo = collections.Counter(bytes.fromhex(h) for h in data.get("echo", []))
        self.sender = dict(data.get("sender", {}))
        self.pending = list(data.get("pending", []))
        return self

    def save(self, echo_extra: collections.Counter[bytes] | None = None) -> None:
        echo = self.echo + echo_extra if echo_extra else self.echo
        data = {
            "streams": {k: list(v) for k, v in self.streams.items()},
            "echo": [key.hex() for key, n in echo.items() for _ in range(n)],
            "sender": self.sender,
            "pending": self.pending,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)
        self.writes += 1


# Publishing


@dataclass
class _Publish:
    payload: bytes | memoryview
    headers: dict[str, str]
    count: int
    journal_end: tuple[int, int] | None
    token: str = ""
    sent_at: float = 0.0
    result: Any = None  # None: waiting; True: stored; or the error (dict / str)
    attempts: int = 0


@dataclass
class SenderPosition:
    sequence: int = 0
    offset: int = 0
    journal: tuple[int, int] | None = None


class StreamSender:
    """Asynchronous publishes to the stream, a bounded window awaiting acknowledgement, resent in order."""

    def __init__(
        self,
        nc: Any,
        subject: str,
        host: str,
        settings: StreamSettings,
        figures: StreamFigures,
        lossy: bool,
        on_stored: Callable[[_Publish], None],
        on_lost: Callable[[int, int, str], None],
    ) -> None:
        self.nc = nc
        self.subject = subject
        self.host = host
        self.settings = settings
        self.figures = figures
        self.lossy = lossy
        self.on_stored = on_stored
        self.on_lost = on_lost
        self.window: collections.deque[_Publish] = collections.deque()
        self.by_token: dict[str, _Publish] = {}
        self.room = asyncio.Event()
        self.room.set()
        self.drained = asyncio.Event()
        self.drained.set()
        self.inbox = ""
        self.previous = 0
        self._retry_wait = RETRY_WAIT
        self._retry_at: float | None = None
        self._full_since: float | None = None
        self._serial = 0

    async def start(self) -> None:
        self.inbox = self.nc.new_inbox()
        await self.nc.subscribe(f"{self.inbox}.*", cb=self._on_reply)

    async def publish(
        self, payload: bytes | memoryview, count: int, position: SenderPosition, journal_end: Any
    ) -> None:
        """Queue one NATS message (whole messages) after the window has room; ``position`` advances."""
        while len(self.window) >= self.settings.max_in_flight:
            self.room.clear()
            await self.room.wait()
        sequence, offset = position.sequence, position.offset
        headers = {
            "Jitrelay-Bridge": self.host,
            "Jitrelay-Sequence": str(sequence),
            "Jitrelay-Offset": str(offset),
            HEADER_MSG_ID: f"{self.host}:{sequence}",
        }
        if not self.lossy:
            headers[HEADER_PREVIOUS] = str(self.previous)
        if journal_end is not None:
            headers[HEADER_JOURNAL] = f"{journal_end[0]}:{journal_end[1]}"
        entry = _Publish(payload, headers, count, journal_end)
        position.sequence += count
        position.offset += len(payload)
        self.previous = position.sequence
        self.window.append(entry)
        self.drained.clear()
        self.figures.in_flight = len(self.window)
        if self._retry_at is None:  # while a rejected window waits to be resent, new ones wait behind it
            await self._send(entry)

    async def _send(self, entry: _Publish) -> None:
        self._serial += 1
        if entry.token:
            self.by_token.pop(entry.token, None)
        entry.token = str(self._serial)
        entry.sent_at = time.monotonic()
        entry.result = None
        entry.attempts += 1
        self.by_token[entry.token] = entry
        subject = f"{self.subject}.{self.host}"
        await self.nc.publish(subject, entry.payload, reply=f"{self.inbox}.{entry.token}", headers=entry.headers)

    async def _on_reply(self, msg: Any) -> None:
        entry = self.by_token.pop(msg.subject.rsplit(".", 1)[1], None)
        if entry is None:
            return
        if msg.headers and msg.headers.get("Status") == "503":
            entry.result = "no JetStream server answered (no responders)"
        else:
            try:
                reply = json.loads(msg.data)
            except ValueError:
                reply = {"error": {"description": f"unreadable reply {msg.data[:80]!r}"}}
            if "error" in reply:
                entry.result = reply["error"]
            else:
                entry.result = True
                if reply.get("duplicate"):
                    self.figures.duplicates += 1
        self._settle()

    def _settle(self) -> None:
        """Take acknowledged publishes off the head of the window; a failed head schedules a resend."""
        while self.window and self.window[0].result is not None:
            head = self.window[0]
            if head.result is True:
                self.window.popleft()
                self._retry_wait = RETRY_WAIT
                if self._full_since is not None:
                    log.warning("the stream takes messages again after %.2f s", time.monotonic() - self._full_since)
                    self._full_since = None
                self.on_stored(head)
                continue
            error = head.result
            full = isinstance(error, dict) and error.get("err_code") in STREAM_FULL_CODES
            if full:
                self.figures.stream_full += 1
            if full and self.lossy:
                self.window.popleft()
                self.on_lost(head.count, len(head.payload), f"the stream is full ({error.get('description')})")
                continue
            if full and self._full_since is None:
                self._full_since = time.monotonic()
                log.warning(
                    "the stream is full (%s): holding back the relay until it takes messages again",
                    error.get("description"),
                )
            elif not full and head.attempts == 1:
                log.warning("publish to the stream failed (%s); sending again", _describe(error))
            self._schedule_retry()
            break
        self.figures.in_flight = len(self.window)
        if len(self.window) < self.settings.max_in_flight:
            self.room.set()
        if not self.window:
            self.drained.set()

    def _schedule_retry(self) -> None:
        if self._retry_at is None:
            self._retry_at = time.monotonic() + self._retry_wait
            self._retry_wait = min(RETRY_WAIT_MAX, 2 * self._retry_wait)

    async def watch(self) -> None:
        """Resend the window, in order, when its head failed or went unanswered for ``ACK_TIMEOUT``."""
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            head = self.window[0] if self.window else None
            if head is not None and self._retry_at is None and head.result is None and now - head.sent_at > ACK_TIMEOUT:
                log.warning("no acknowledgement from the stream in %.1f s; sending the window again", ACK_TIMEOUT)
                self._schedule_retry()
                self._retry_at = now
            if self._retry_at is not None and now >= self._retry_at:
                self._retry_at = None
                with contextlib.suppress(Exception):
                    for entry in list(self.window):
                        if entry.result is not True:
                            self.figures.republished += 1
                            await self._send(entry)


def _describe(error: Any) -> str:
    if isinstance(error, dict):
        return f"{error.get('description')} (code {error.get('code')}, err_code {error.get('err_code')})"
    return str(error)


async def last_position(js: Any, stream: str, subject: str) -> SenderPosition | None:
    """Where this host's messages in the stream end, from the last one it holds; None if it holds none."""
    from nats.js.errors import NotFoundError

    try:
        last = await js.get_last_msg(stream, subject)
    except NotFoundError:
        return None
    headers = last.headers or {}
    data = last.data or b""
    count = kernels.frame(np.frombuffer(data, dtype=np.uint8))[0] if data else 0
    journal = None
    if HEADER_JOURNAL in headers:
        segment, offset = headers[HEADER_JOURNAL].split(":")
        journal = (int(segment), int(offset))
    sequence = int(headers.get("Jitrelay-Sequence", 0)) + count
    return SenderPosition(sequence, int(headers.get("Jitrelay-Offset", 0)) + len(data), journal)


# The journal as the sender's source


class JournalTail:
    """Reads the relay's journal segments ``<dir>/<name>-<NNNNNN>.journal`` from a position on, whole messages."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = Path(directory)
        self.name = name
        self._segment = re.compile(re.escape(name) + r"-(\d+)\.journal")
        self.position = self.end()

    def segments(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := self._segment.fullmatch(n)))

    def path(self, index: int) -> Path:
        return self.directory / f"{self.name}-{index:06d}.journal"

    def end(self) -> tuple[int, int]:
        """The position just after the journal's last byte now."""
        found = self.segments()
        if not found:
            return (1, 0)
        return (found[-1], self.path(found[-1]).stat().st_size)

    def read(self) -> tuple[np.ndarray, tuple[int, int]] | None:
        """The next whole messages after ``position`` (up to about 1 MiB) and the position after them; or None."""
        segment, offset = self.position
        final = False  # a later segment exists, so this one will not grow any more
        while True:
            try:
                with open(self.path(segment), "rb") as f:
                    f.seek(offset)
                    data = f.read(TAIL_READ)
            except FileNotFoundError:
                data = b""
                if final:
                    log.warning("journal segment %s is gone: what it held past byte %d is not sent", segment, offset)
            if data:
                buf = np.frombuffer(data, dtype=np.uint8)
                count, consumed, fault = kernels.frame(buf)
                if fault != protocol.NO_FAULT:
                    raise protocol.ProtocolError(f"{self.path(segment)}: not a message at byte offset {offset}")
                if consumed == 0 and len(data) == TAIL_READ:  # one message longer than a read
                    payload = buf[protocol.OFF_PAYLOAD_SIZE : protocol.OFF_PAYLOAD_SIZE + 4].view("<u4")
                    size = protocol.HEADER_SIZE + int(payload[0])
                    with open(self.path(segment), "rb") as f:
                        f.seek(offset)
                        data = f.read(size)
                    buf = np.frombuffer(data, dtype=np.uint8)
                    count, consumed, _ = kernels.frame(buf)
                if consumed:
                    return buf[:consumed], (segment, offset + consumed)
            later = [s for s in self.segments() if s > segment]
            if not later:
                return None
            if not final:  # the relay may have appended to it before it moved on: read it once more
                final = True
                continue
            if data:  # a finished segment ends in a torn message: the relay died mid-append
                log.warning("journal %s ends in %d bytes of a torn message; skipped", self.path(segment), len(data))
            segment, offset, final = later[0], 0, False
            self.position = (segment, offset)


def message_bounds(buf: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each message of ``buf``, a batch of whole messages."""
    starts = message_offsets(buf)
    return list(zip(starts.tolist(), [*starts[1:].tolist(), len(buf)], strict=True))


@dataclass
class EchoFilter:
    """Headers of messages the receiver wrote into the relay, to be skipped when the journal reader meets them.

    A matched header is kept until the stream has acknowledged a publish whose
    journal position is past it, so that a sender resuming from the stream's
    last message meets it again and skips it again.
    """

    waiting: collections.Counter[bytes] = field(default_factory=collections.Counter)
    matched: collections.deque[tuple[tuple[int, int], bytes]] = field(default_factory=collections.deque)

    def persisted(self) -> collections.Counter[bytes]:
        kept = collections.Counter(self.waiting)
        for _, key in self.matched:
            kept[key] += 1
        return kept

    def take(self, key: bytes, position: tuple[int, int]) -> bool:
        if self.waiting.get(key, 0) <= 0:
            return False
        self.waiting[key] -= 1
        if not self.waiting[key]:
            del self.waiting[key]
        self.matched.append((position, key))
        return True

    def passed(self, position: tuple[int, int]) -> None:
        while self.matched and self.matched[0][0] <= position:
            self.matched.popleft()


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
