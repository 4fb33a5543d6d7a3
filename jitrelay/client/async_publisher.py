"""The asyncio publisher: messages built into a buffer, written out once per event-loop turn.

It builds messages with the same encoder and fast path as ``Publisher``
(``encoder``) and declares itself publish-only as ``Publisher`` does; where
the blocking publisher writes at once, this one schedules one write-out per
event-loop turn, as nats-py's flusher does.

A relay lost (its end of the connection closes) is reconnected to in the
background (``client.reconnect``); messages published meanwhile are kept in
the buffer and written out, after the publish-only declaration, on the new
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from jitrelay.client.address import RelayAddress
from jitrelay.client.encoder import DEFAULT_FLUSH_SIZE, Encoder, Link
from jitrelay.client.errors import (
    CLOSE_TIMEOUT,
    DISCARD_CHUNK,
    AsyncConnection,
    PublishTimeout,
    RelayConnectionError,
    open_connection,
)
from jitrelay.client.reconnect import (
    Reconnect,
    ReconnectBufferFull,
    ReconnectFailed,
    announce_lost,
    log,
    policy_for,
    retry_async,
)
from jitrelay.client.records import AsyncRecordWriter
from jitrelay.core import protocol
from jitrelay.kernels.framer import Buffer


def _not_connected(*args: Any) -> None:
    raise RuntimeError("the publisher is not connected")  # never called: publish_nowait checks first


class AsyncPublisher(Encoder, AsyncConnection, AsyncRecordWriter):
    """``Publisher`` for asyncio: ``async with AsyncPublisher(domain) as pub: await pub.publish(...)``.

    ``publish`` builds the message into the buffer and returns without
    writing; the buffer is written out once per event-loop turn (a callback
    scheduled by the first publish after a write, as nats-py's flusher does),
    so a burst published between two awaits that yield goes out as one
    write, and a message published alone goes out as soon as the caller
    yields. A publisher that never yields is written out every
    ``flush_size`` bytes, and then waits until the kernel has taken them.
    ``flush()`` writes out everything and waits until the kernel holds it;
    ``close()`` does the same first. Whole messages only, as ``Publisher``.

    ``publish_raw``/``publish_batch`` return once the kernel holds the bytes,
    so the caller may reuse a buffer it passed (an event loop such as uvloop
    may otherwise keep sending from it later). It declares itself
    publish-only as ``Publisher`` does.

    Back-pressure: ``await publish(..., timeout=T)`` first waits at most
    ``T`` seconds for the relay to have taken what was written before, and
    raises ``PublishTimeout`` (the message not published) if it has not;
    ``async with asyncio.timeout(T): await pub.flush()`` bounds a flush.

    A lost relay is reconnected to in the background as ``reconnect`` says
    (see ``Publisher``): ``publish_nowait`` keeps the messages meanwhile,
    ``publish`` and ``flush`` wait for the new connection;
    ``ReconnectFailed`` when it gives up. What the event loop's transport or
    the kernel held for the old connection is lost with it (logged, with the
    transport's byte count).
    """

    def __init__(
        self,
        domain: str,
        socket_path: str | Path | RelayAddress | None = None,
        *,
        source: int = 0,
        checksum: bool | None = None,
        flush_size: int = DEFAULT_FLUSH_SIZE,
        publish_only: bool = True,
        version: int = protocol.VERSION,
        reconnect: bool | Reconnect = True,
    ) -> None:
        super().__init__(domain, socket_path, source, checksum, publish_only, flush_size, version)
        self.reconnect = policy_for(reconnect)
        self.reconnects = 0  # how many times a lost relay was reconnected to
        self._fill = 0  # the encoder's publish-only declaration: _open writes it on every connection
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._discarding: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._gave_up: ReconnectFailed | None = None
        self._closing = False
        self._link = Link.NEW
        self._call_soon: Callable[..., Any] = _not_connected  # the loop's call_soon, once connected

    async def connect(self) -> AsyncPublisher:
        """Connect unless connected; raises ``RelayConnectionError`` when no relay listens."""
        if self._writer is None:
            await self._open()
            self._link = Link.OPEN
        return self

    async def _open(self) -> None:
        """A new connection: declared publish-only (if so), read away by ``_discard``, what is buffered written out."""
        reader, writer = await open_connection(self.domain, self.socket_path, DISCARD_CHUNK)
        writer.transport.set_write_buffer_limits(high=0)
        if self.publish_only:
            writer.write(protocol.publish_only_message(source=self.source))
        loop = asyncio.get_running_loop()
        self._call_soon = loop.call_soon
        self._reader, self._writer = reader, writer
        self._discarding = loop.create_task(self._discard(reader))
        self._flush_at = 1
        if self._fill:
            writer.write(self._take())

    def _relay_lost(self, exc: OSError | None = None) -> None:
        """The relay closed the connection: reconnect in the background, unless told not to (or closing)."""
        if self._link is Link.LOST or self._closing or self._writer is None:
            return
        self._link = Link.LOST
        writer = self._writer
        held = writer.transport.get_write_buffer_size()
        if held:
            log.warning("publisher to the %s relay lost %d bytes its transport held", self.domain, held)
        if self.reconnect is None:
            return
        writer.close()
        announce_lost(self.reconnect, self._what(), self._lost(exc))
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect(self.reconnect))

    async def _reconnect(self, policy: Reconnect) -> None:
        try:
            await retry_async(policy, self._what(), self._open)
        except ReconnectFailed as failed:
            self._gave_up = failed
            return
        self.reconnects += 1
        self._link = Link.OPEN

    def _what(self) -> str:
        return f"publisher to the {self.domain} relay at {self.socket_path}"

    async def _back(self) -> None:
        """Wait for the reconnection under way; raise why the link is down if there is none, or it gave up."""
        if self._reconnecting is not None:
            await asyncio.shield(self._reconnecting)
        if self._gave_up is not None:
            raise self._gave_up
        if self._link is not Link.OPEN:
            raise self._not_live()

    async def publish(
        self,
        records: Iterable[tuple[int, bytes]] = (),
        *,
        flags: int = 0,
        sequence: int | None = None,
        timestamp_ns: int | None = None,
        timeout: float | None = None,
        block: bool = True,
    ) -> int:
        """Build one message of ``(type, value)`` records into the buffer; return its sequence number.

        As ``publish_nowait``, but connects first if need be (and waits for a
        reconnection under way), and when ``flush_size`` bytes are buffered
        writes them out and waits until the kernel has taken them (the
        publisher's back-pressure). With ``timeout``, ``PublishTimeout`` when
        the relay has not taken what was written before within it;
        ``block=False`` is ``timeout=0``.
        """
        if not block:
            timeout = 0.0
        if self._link is not Link.OPEN:
            if self._link is Link.NEW:
                await self.connect()
            else:
                await self._back()
        if timeout is not None:
            deadline = asyncio.get_running_loop().time() + timeout
            await self._room(timeout)
        # publish_nowait's fast path, which hands a full buffer to the transport at once (leaving it
        # empty) or, when the transport is closing, keeps it: then wait until the kernel has taken it,
        # or raise.
        sequence = self.publish_nowait(records, flags=flags, sequence=sequence, timestamp_ns=timestamp_ns)
        if not self._fill or self._fill >= self.flush_size:
            if timeout is None:
                await self._send(b"")
            else:  # the message is the transport's now, so published: what is left of the timeout bounds the wait
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._send(b""), max(0.0, deadline - asyncio.get_running_loop().time()))
        return sequence

    async def _room(self, timeout: float) -> None:
        """Wait at most ``timeout`` s for the transport to have handed everything to the kernel."""
        writer = self._writer
        if writer is None or not writer.transport.get_write_buffer_size():
            return
        try:
            await asyncio.wait_for(writer.drain(), timeout)
        except asyncio.TimeoutError:
            raise PublishTimeout(
                f"the {self.domain} relay at {self.socket_path} held the publisher for {timeout} s: the message "
                f"is not published ({writer.transport.get_write_buffer_size()} bytes before it wait)"
            ) from None
        except ConnectionError:
            pass  # lost: the discarding task reconnects, and the next write waits for it

    publish_nowait = Encoder._append  # the one fast path: see encoder.py

    def _publish_guarded(
        self,
        records: Iterable[tuple[int, bytes]],
        flags: int,
        sequence: int | None,
        timestamp_ns: int | None,
        timeout: float | None,
    ) -> int:
        """``publish_nowait`` while reconnecting (kept in the buffer), or not connected (raises, see ``_not_live``)."""
        if timeout:  # 0 (block=False) is what publish_nowait does anyway
            raise TypeError("publish_nowait never waits: give the timeout to `await publish(...)`")
        if self._link is Link.LOST and self._reconnecting is not None and self._gave_up is None:
            assert self.reconnect is not None
            if self._fill >= self.reconnect.buffer_limit:
                raise ReconnectBufferFull(
                    f"{self._what()} is reconnecting and keeps {self._fill} bytes already (buffer_limit): "
                    "the message is not published"
                )
            return self._encode(records, flags, sequence, timestamp_ns)
        if self._link is Link.OPEN:  # with a timeout given as None explicitly
            return Encoder._append(self, records, flags=flags, sequence=sequence, timestamp_ns=timestamp_ns)
        raise self._not_live()

    def _filled(self) -> None:
        """Hand ``flush_size`` bytes to the transport at once; anything less at the loop's next turn."""
        if self._fill >= self.flush_size:
            self._write_out()
        else:
            self._flush_at = self.flush_size  # scheduled: until then, only a full buffer calls again
            self._call_soon(self._write_out)

    def _not_live(self) -> Exception:
        if self._gave_up is not None:
            return self._gave_up
        if self._link is Link.LOST:
            return self._lost()
        if self._link is Link.NEW:
            return RuntimeError(
                f"the {self.kind} to the {self.domain} relay is not connected: use async with, or connect()"
            )
        return self._closed()

    async def publish_raw(self, message: Buffer) -> None:
        """Send bytes exactly as given, valid or not, after everything buffered."""
        await self._send(message)

    async def publish_batch(self, buffer: Buffer) -> None:
        """Send a buffer of complete messages in one write, after everything buffered."""
        await self._send(buffer)

    async def flush(self) -> None:
        """Write out everything buffered and wait until the kernel holds it."""
        await self._send(b"")

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write out what is buffered, then close once the relay has read everything, waiting at most ``timeout`` s."""
        if self._writer is not None and self._link is not Link.LOST:
            with contextlib.suppress(RelayConnectionError):
                await self._send(b"")
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self._fill:
            log.warning("publisher to the %s relay closed with %d bytes unwritten", self.domain, self._fill)
        writer, self._writer = self._writer, None
        discarding, self._discarding = self._discarding, None
        if self._link is Link.OPEN:
            self._link = Link.CLOSED
        if writer is None or discarding is None:
            return
        try:
            if writer.can_write_eof():  # TLS cannot half-close: there, closing sends what is buffered first
                if not writer.transport.is_closing():
                    writer.write_eof()
                await asyncio.wait_for(discarding, timeout)  # the relay closes its side once it has read our EOF
        except (asyncio.TimeoutError, OSError):
            pass
        finally:
            discarding.cancel()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _write_out(self) -> None:
        """Hand the buffered messages to the transport, as an immutable copy (see the uvloop hazard)."""
        self._flush_at = 1  # the next publish schedules the next write-out
        writer = self._writer
        if self._fill and writer is not None and not writer.transport.is_closing():
            writer.write(self._take())

    async def _send(self, data: Buffer) -> None:
        if self._writer is None:
            await self.connect()
        writer = self._writer
        assert writer is not None
        if self._link is Link.OPEN and writer.transport.is_closing():
            self._relay_lost()
        if self._link is not Link.OPEN:
            await self._back()
            writer = self._writer
            assert writer is not None
        try:
            self._write_out()
            if len(data):
                writer.write(memoryview(data).cast("B"))  # type: ignore[arg-type]  # numpy's stubs do not type an array as a buffer
            await writer.drain()
        except ConnectionError as exc:
            if self.reconnect is None or self._closing:
                raise self._lost(exc) from exc
            self._relay_lost(exc)  # what the transport held is gone; what is buffered from now on is kept
            await self._back()

    async def _discard(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(DISCARD_CHUNK):
                pass
        if reader is self._reader:  # not an old connection, closed after a reconnection
            self._relay_lost()
