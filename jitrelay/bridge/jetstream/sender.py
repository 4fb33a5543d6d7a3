"""The JetStream carrier's sending side: a window of publishes awaiting acknowledgement, resent in order."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from jitrelay import kernels
from jitrelay.bridge.carrier import HEADER_OFFSET, HEADER_SEQUENCE, SenderPosition
from jitrelay.bridge.figures import StreamFigures
from jitrelay.bridge.options import StreamSettings

log = logging.getLogger("jitrelay.bridge")

HEADER_PREVIOUS = "Jitrelay-Previous"  # sequence where the sender's previous NATS message ended
HEADER_JOURNAL = "Jitrelay-Journal"  # "<segment>:<offset>" of the journal just after this message's last one
HEADER_MSG_ID = "Nats-Msg-Id"
STREAM_FULL_CODES = (10077, 10078)  # maximum bytes / maximum messages exceeded
ACK_TIMEOUT = 2.0  # a publish not acknowledged after this long is sent again
RETRY_WAIT = 0.1  # first pause before a rejected window is sent again; doubles to RETRY_WAIT_MAX
RETRY_WAIT_MAX = 1.0


@dataclass
class Publish:
    """One NATS message in the window: what it carries, its headers, and how its last attempt went."""

    payload: bytes | memoryview
    headers: dict[str, str]
    count: int
    journal_end: tuple[int, int] | None
    token: str = ""
    sent_at: float = 0.0
    result: Any = None  # None: waiting; True: stored; or the error (dict / str)
    attempts: int = 0


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
        on_stored: Callable[[Publish], None],
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
        self.window: collections.deque[Publish] = collections.deque()
        self.by_token: dict[str, Publish] = {}
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
        """Subscribe to the sender's own reply inbox; raises what nats-py raises."""
        self.inbox = self.nc.new_inbox()
        await self.nc.subscribe(f"{self.inbox}.*", cb=self._on_reply)

    async def publish(
        self, payload: bytes | memoryview, count: int, position: SenderPosition, journal_end: Any
    ) -> None:
        """Queue one NATS message (whole messages) after the window has room; ``position`` advances."""
        while len(self.window) >= self.settings.max_in_flight:
            self.room.clear()
            await self.room.wait()
        headers = {**position.headers(self.host), HEADER_MSG_ID: f"{self.host}:{position.sequence}"}
        if not self.lossy:
            headers[HEADER_PREVIOUS] = str(self.previous)
        if journal_end is not None:
            headers[HEADER_JOURNAL] = f"{journal_end[0]}:{journal_end[1]}"
        entry = Publish(payload, headers, count, journal_end)
        position.advance(count, len(payload))
        self.previous = position.sequence
        self.window.append(entry)
        self.drained.clear()
        self.figures.in_flight = len(self.window)
        if self._retry_at is None:  # while a rejected window waits to be resent, new ones wait behind it
            await self._send(entry)

    async def _send(self, entry: Publish) -> None:
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
    sequence = int(headers.get(HEADER_SEQUENCE, 0)) + count
    return SenderPosition(sequence, int(headers.get(HEADER_OFFSET, 0)) + len(data), journal)
