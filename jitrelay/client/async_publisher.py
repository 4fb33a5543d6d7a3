"""The asyncio publisher: messages built into a buffer, written out once per event-loop turn.

It builds messages with the same encoder and fast path as ``Publisher``
(``encoder``) and declares itself publish-only as ``Publisher`` does; where
the blocking publisher writes at once, this one schedules one write-out per
event-loop turn, as nats-py's flusher does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from jitrelay.client.address import RelayAddress
from jitrelay.client.encoder import DEFAULT_FLUSH_SIZE, Encoder, Link
from jitrelay.client.errors import CLOSE_TIMEOUT, DISCARD_CHUNK, AsyncConnection, RelayConnectionError, open_connection
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
    ) -> None:
        super().__init__(domain, socket_path, source, checksum, publish_only, flush_size, version)
        self._writer: asyncio.StreamWriter | None = None
        self._discarding: asyncio.Task[None] | None = None
        self._link = Link.NEW
        self._call_soon: Callable[..., Any] = _not_connected  # the loop's call_soon, once connected

    async def connect(self) -> AsyncPublisher:
        """Connect unless connected; raises ``RelayConnectionError`` when no relay listens."""
        if self._writer is None:
            reader, self._writer = await open_connection(self.domain, self.socket_path, DISCARD_CHUNK)
            self._writer.transport.set_write_buffer_limits(high=0)
            loop = asyncio.get_running_loop()
            self._call_soon = loop.call_soon
            self._discarding = loop.create_task(self._discard(reader))
            self._link = Link.OPEN
            self._write_out()  # the publish-only declaration
        return self

    async def publish(
        self,
        records: Iterable[tuple[int, bytes]] = (),
        *,
        flags: int = 0,
        sequence: int | None = None,
        timestamp_ns: int | None = None,
    ) -> int:
        """Build one message of ``(type, value)`` records into the buffer; return its sequence number.

        As ``publish_nowait``, but connects first if need be, and when
        ``flush_size`` bytes are buffered writes them out and waits until the
        kernel has taken them (the publisher's back-pressure).
        """
        if self._link is not Link.OPEN:
            lost = self._link is Link.LOST
            await self.connect()
            if lost:
                raise self._lost()
        # publish_nowait's fast path, which hands a full buffer to the transport at once (leaving it
        # empty) or, when the transport is closing, keeps it: then wait until the kernel has taken it,
        # or raise.
        sequence = self.publish_nowait(records, flags=flags, sequence=sequence, timestamp_ns=timestamp_ns)
        if not self._fill or self._fill >= self.flush_size:
            await self._send(b"")
        return sequence

    publish_nowait = Encoder._append  # the one fast path: see encoder.py

    def _publish_guarded(
        self, records: Iterable[tuple[int, bytes]], flags: int, sequence: int | None, timestamp_ns: int | None
    ) -> int:
        """``publish_nowait`` on a publisher that is not connected: raises why (see ``_not_live``)."""
        raise self._not_live()

    def _filled(self) -> None:
        """Hand ``flush_size`` bytes to the transport at once; anything less at the loop's next turn."""
        if self._fill >= self.flush_size:
            self._write_out()
        else:
            self._flush_at = self.flush_size  # scheduled: until then, only a full buffer calls again
            self._call_soon(self._write_out)

    def _not_live(self) -> Exception:
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
        if self._link is Link.LOST or writer.transport.is_closing():
            raise self._lost()
        try:
            self._write_out()
            if len(data):
                writer.write(memoryview(data).cast("B"))  # type: ignore[arg-type]  # numpy's stubs do not type an array as a buffer
            await writer.drain()
        except ConnectionError as exc:
            raise self._lost(exc) from exc

    async def _discard(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(DISCARD_CHUNK):
                pass
        self._link = Link.LOST
