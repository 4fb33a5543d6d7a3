"""Publishers and subscribers for applications, blocking and asyncio.

A relay connection carries whole messages back to back with no framing besides
the header, so a subscriber must cut its byte stream into messages itself.
``MessageFramer`` does that once for both flavours: it owns a numpy receive
buffer, hands out its free tail for the next read (``recv_into`` or a copy of
what asyncio read), and returns every complete message as one batch, keeping
the unfinished tail for the next read. Framing is ``kernels.frame``, the same
walk the relay does, so a batch costs one compiled call however many messages
it holds, and a partial message costs a re-read of its header only.

The relay fans every message out to every other connection, publishers
included. A publisher that never read would look like a slow subscriber: the
relay would drop it (``disconnect`` policy) or stop reading from everyone while
it waited for it (``block``). So publishers read away and discard whatever the
relay sends them: the blocking one before each write and whenever a write must
wait, the asyncio one in a background task. Closing with unread input would
also reset the connection, and the relay could lose the publisher's last
messages; so a publisher closes gracefully: it shuts down its sending side,
reads until the relay, having read everything, closes its side, then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from types import TracebackType

import numpy as np

from jitrelay.core import protocol
from jitrelay.core.domains import RelayLogic, logic_for
from jitrelay.kernels.framer import DEFAULT_BUFFER_SIZE, Buffer, MessageFramer

__all__ = [
    "AsyncPublisher",
    "AsyncSubscriber",
    "MessageFramer",
    "Publisher",
    "RelayConnectionError",
    "Subscriber",
]

_DISCARD_CHUNK = 256 * 1024
CLOSE_TIMEOUT = 5.0


class RelayConnectionError(ConnectionError):
    """The relay is not there, or went away."""


def _missing(domain: str, path: Path, exc: OSError) -> RelayConnectionError:
    return RelayConnectionError(
        f"no {domain} relay at {path} ({exc.strerror or exc}); start one with `jitrelay run {domain}`"
    )


def _connect(domain: str, path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise _missing(domain, path, exc) from exc
    except BaseException:
        sock.close()
        raise
    return sock


class _Endpoint:
    """What every client shares: the relay it talks to, and the errors that name it."""

    kind = "client"

    def __init__(self, domain: str, socket_path: str | Path | None):
        self.logic: RelayLogic = logic_for(domain)
        self.socket_path = Path(socket_path) if socket_path is not None else self.logic.socket_path
        self.domain = domain

    def _closed(self) -> RelayConnectionError:
        return RelayConnectionError(f"{self.kind} to the {self.domain} relay at {self.socket_path} is closed")

    def _lost(self, exc: OSError | None = None) -> RelayConnectionError:
        why = f" ({exc.strerror or exc})" if exc is not None else ""
        return RelayConnectionError(f"the {self.domain} relay at {self.socket_path} closed the connection{why}")


class _PublisherState(_Endpoint):
    """What both publishers share: the target, the source id and the sequence counter."""

    kind = "publisher"

    def __init__(self, domain: str, socket_path: str | Path | None, source: int):
        super().__init__(domain, socket_path)
        self.domain_id = self.logic.domain_id
        self.source = source
        self.next_sequence = 0

    def _build(
        self, records: Iterable[tuple[int, bytes]], flags: int, sequence: int | None, timestamp_ns: int | None
    ) -> tuple[bytes, int]:
        if sequence is None:
            sequence = self.next_sequence
        self.next_sequence = sequence + 1
        message = protocol.build_message(
            self.domain_id, records, source=self.source, flags=flags, sequence=sequence, timestamp_ns=timestamp_ns
        )
        return message, sequence


class Publisher(_PublisherState):
    """Publish messages into a relay over its Unix socket, blocking until the kernel has them.

    ``publish`` numbers messages from 0 unless given a ``sequence``, after
    which numbering continues from it. Raises ``RelayConnectionError`` when
    the relay is not running or has closed the connection.

    It reads what the relay forwards to it only while it publishes; one that
    idles for long on a busy relay should call ``flush()`` now and then.
    """

    def __init__(self, domain: str, socket_path: str | Path | None = None, *, source: int = 0):
        super().__init__(domain, socket_path, source)
        self._sock: socket.socket | None = _connect(domain, self.socket_path)
        self._sock.setblocking(False)
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN | select.POLLOUT)
        self._scratch = bytearray(_DISCARD_CHUNK)

    def publish(
        self,
        records: Iterable[tuple[int, bytes]] = (),
        *,
        flags: int = 0,
        sequence: int | None = None,
        timestamp_ns: int | None = None,
    ) -> int:
        """Build one message of ``(type, value)`` records and send it; return its sequence number."""
        message, sequence = self._build(records, flags, sequence, timestamp_ns)
        self._send(message)
        return sequence

    def publish_raw(self, message: Buffer) -> None:
        """Send bytes exactly as given, valid or not."""
        self._send(message)

    def publish_batch(self, buffer: Buffer) -> None:
        """Send a buffer of complete messages (e.g. from ``protocol.build_batch``) in one write."""
        self._send(buffer)

    def flush(self) -> None:
        """Every send has reached the kernel already; this only reads away what the relay sent us."""
        self._discard()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close once the relay has read everything sent, waiting at most ``timeout`` seconds."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_WR)
            self._poll.modify(sock, select.POLLIN)
            deadline = time.monotonic() + timeout
            while (remaining := deadline - time.monotonic()) > 0 and self._poll.poll(remaining * 1000):
                with contextlib.suppress(BlockingIOError):
                    if sock.recv_into(self._scratch) == 0:
                        break
        except OSError:
            pass
        finally:
            sock.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise self._closed()
        return self._sock

    def _send(self, data: Buffer) -> None:
        sock = self._socket()
        self._discard()
        view = memoryview(data).cast("B")
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                # Wait until the relay takes more, reading what it sends us meanwhile.
                for _, events in self._poll.poll():
                    if events & select.POLLIN:
                        self._discard()
            except OSError as exc:
                raise self._lost(exc) from exc

    def _discard(self) -> None:
        sock = self._socket()
        while True:
            try:
                received = sock.recv_into(self._scratch)
            except BlockingIOError:
                return
            except OSError as exc:
                raise self._lost(exc) from exc
            if received == 0:
                raise self._lost()
            if received < len(self._scratch):
                return


def _subscription(tlv_types: Iterable[int] | None, sources: Iterable[int] | None) -> bytes | None:
    """The control message for a subscription, or None for the whole domain."""
    if tlv_types is None and sources is None:
        return None
    return protocol.subscribe_message(tlv_types, sources)


class _SubscriberState(_Endpoint):
    """What both subscribers share: the target, the framer, the subscription sent on connecting, how a stream ends."""

    kind = "subscriber"

    def __init__(
        self,
        domain: str,
        socket_path: str | Path | None,
        buffer_size: int,
        tlv_types: Iterable[int] | None,
        sources: Iterable[int] | None,
    ):
        super().__init__(domain, socket_path)
        self._framer = MessageFramer(buffer_size)
        self._initial = _subscription(tlv_types, sources)  # before connecting: a bad value raises with nothing open

    def _ended(self) -> EOFError | RelayConnectionError:
        """What the relay closing the connection means: the end between messages, a lost connection within one."""
        if self._framer.buffered:
            return RelayConnectionError(
                f"the {self.domain} relay at {self.socket_path} closed the connection in the middle of a message "
                f"({self._framer.buffered} bytes of it received)"
            )
        return EOFError(f"the {self.domain} relay at {self.socket_path} closed the connection")


class Subscriber(_SubscriberState):
    """Receive the messages the relay forwards, blocking: all of them, or those a subscription selects.

    With ``tlv_types`` and/or ``sources`` the relay sends only messages from
    one of ``sources`` that carry a record of one of ``tlv_types`` (each set,
    when given); ``subscribe``/``unsubscribe`` change that on the live
    connection, effective from the next message the relay forwards.

    Iterating yields decoded ``protocol.Message`` objects; ``batches()`` yields
    uint8 arrays of whole messages. When the relay closes the connection
    between messages, iteration simply ends; when it closes it in the middle
    of a message, ``RelayConnectionError`` is raised. A stream that stops
    making sense (bad magic) raises ``protocol.ProtocolError``.
    """

    def __init__(
        self,
        domain: str,
        socket_path: str | Path | None = None,
        *,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        tlv_types: Iterable[int] | None = None,
        sources: Iterable[int] | None = None,
    ):
        super().__init__(domain, socket_path, buffer_size, tlv_types, sources)
        self._sock: socket.socket | None = _connect(domain, self.socket_path)
        self._timeout: float | None = None
        if self._initial is not None:
            try:
                self._control(self._initial)
            except BaseException:
                self.close()  # the caller never gets the object, so nobody else would close the socket
                raise

    def subscribe(self, tlv_types: Iterable[int] | None = None, sources: Iterable[int] | None = None) -> None:
        """Receive only messages from ``sources`` carrying a record of ``tlv_types``; None leaves that set as it is."""
        self._control(protocol.subscribe_message(tlv_types, sources))

    def unsubscribe(self) -> None:
        """Receive the whole domain again."""
        self._control(protocol.unsubscribe_message())

    def _control(self, message: bytes) -> None:
        sock = self._socket()
        self._set_timeout(None)
        try:
            sock.sendall(message)
        except OSError as exc:
            raise self._lost(exc) from exc

    def recv_batch(self, timeout: float | None = None) -> np.ndarray | None:
        """The next batch of whole messages, or None if none completed within ``timeout`` seconds.

        Raises ``EOFError`` when the relay has closed the connection between
        messages, ``RelayConnectionError`` when it closed it mid-message.
        """
        sock = self._socket()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self._framer.maybe_extract_batch()
            if batch is not None:
                return batch
            self._set_timeout(None if deadline is None else max(0.0, deadline - time.monotonic()))
            try:
                received = sock.recv_into(self._framer.space())
            except (TimeoutError, BlockingIOError):
                return None
            except OSError as exc:
                raise self._lost(exc) from exc
            if received == 0:
                raise self._ended()
            self._framer.commit(received)

    def batches(self) -> Iterator[np.ndarray]:
        """Each batch of whole messages as it arrives, until the relay closes the connection."""
        while True:
            try:
                batch = self.recv_batch()
            except EOFError:
                return
            assert batch is not None
            yield batch

    def __iter__(self) -> Iterator[protocol.Message]:
        for batch in self.batches():
            yield from protocol.decode_messages(batch)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise self._closed()
        return self._sock

    def _set_timeout(self, timeout: float | None) -> None:
        if timeout != self._timeout:
            assert self._sock is not None
            self._sock.settimeout(timeout)
            self._timeout = timeout


async def _open(domain: str, path: Path, limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.open_unix_connection(str(path), limit=limit)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise _missing(domain, path, exc) from exc


class AsyncPublisher(_PublisherState):
    """``Publisher`` for asyncio: ``async with AsyncPublisher(domain) as pub: await pub.publish(...)``.

    Each publish returns once the kernel holds the bytes, so the caller may
    reuse a buffer it passed to ``publish_batch`` (an event loop such as
    uvloop may otherwise keep sending from it later).
    """

    def __init__(self, domain: str, socket_path: str | Path | None = None, *, source: int = 0):
        super().__init__(domain, socket_path, source)
        self._writer: asyncio.StreamWriter | None = None
        self._discarding: asyncio.Task[None] | None = None
        self._closed_by_relay = False

    async def connect(self) -> AsyncPublisher:
        if self._writer is None:
            reader, self._writer = await _open(self.domain, self.socket_path, _DISCARD_CHUNK)
            self._writer.transport.set_write_buffer_limits(high=0)
            self._discarding = asyncio.get_running_loop().create_task(self._discard(reader))
        return self

    async def publish(
        self,
        records: Iterable[tuple[int, bytes]] = (),
        *,
        flags: int = 0,
        sequence: int | None = None,
        timestamp_ns: int | None = None,
    ) -> int:
        """Build one message of ``(type, value)`` records and send it; return its sequence number."""
        await self.connect()
        message, sequence = self._build(records, flags, sequence, timestamp_ns)
        await self._send(message)
        return sequence

    async def publish_raw(self, message: Buffer) -> None:
        """Send bytes exactly as given, valid or not."""
        await self._send(message)

    async def publish_batch(self, buffer: Buffer) -> None:
        """Send a buffer of complete messages in one write."""
        await self._send(buffer)

    async def flush(self) -> None:
        """Wait until the kernel holds everything written."""
        await self._send(b"")

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close once the relay has read everything sent, waiting at most ``timeout`` seconds."""
        writer, self._writer = self._writer, None
        discarding, self._discarding = self._discarding, None
        if writer is None or discarding is None:
            return
        try:
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

    async def __aenter__(self) -> AsyncPublisher:
        return await self.connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _send(self, data: Buffer) -> None:
        await self.connect()
        writer = self._writer
        assert writer is not None
        if self._closed_by_relay or writer.transport.is_closing():
            raise self._lost()
        try:
            if len(data):
                writer.write(memoryview(data).cast("B"))
            await writer.drain()
        except ConnectionError as exc:
            raise self._lost(exc) from exc

    async def _discard(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(_DISCARD_CHUNK):
                pass
        self._closed_by_relay = True


class AsyncSubscriber(_SubscriberState):
    """``Subscriber`` for asyncio: ``async for message in sub``, ``async for batch in sub.batches()``.

    Subscribes, ends and raises exactly as ``Subscriber`` does.
    """

    def __init__(
        self,
        domain: str,
        socket_path: str | Path | None = None,
        *,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        tlv_types: Iterable[int] | None = None,
        sources: Iterable[int] | None = None,
    ):
        super().__init__(domain, socket_path, buffer_size, tlv_types, sources)
        self._buffer_size = buffer_size
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> AsyncSubscriber:
        if self._reader is None:
            self._reader, self._writer = await _open(self.domain, self.socket_path, self._buffer_size)
            if self._initial is not None:
                await self._control(self._initial)
        return self

    async def subscribe(self, tlv_types: Iterable[int] | None = None, sources: Iterable[int] | None = None) -> None:
        """As ``Subscriber.subscribe``."""
        await self._control(protocol.subscribe_message(tlv_types, sources))

    async def unsubscribe(self) -> None:
        """Receive the whole domain again."""
        await self._control(protocol.unsubscribe_message())

    async def _control(self, message: bytes) -> None:
        await self.connect()
        assert self._writer is not None
        self._writer.write(message)
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise self._lost(exc) from exc

    async def recv_batch(self, timeout: float | None = None) -> np.ndarray | None:
        """The next batch of whole messages, or None if none completed within ``timeout`` seconds.

        Raises ``EOFError`` when the relay has closed the connection between
        messages, ``RelayConnectionError`` when it closed it mid-message.
        """
        await self.connect()
        assert self._reader is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            batch = self._framer.maybe_extract_batch()
            if batch is not None:
                return batch
            read = self._reader.read(len(self._framer.space()))
            try:
                if deadline is None:
                    data = await read
                else:
                    data = await asyncio.wait_for(read, max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return None
            except ConnectionError as exc:
                raise self._lost(exc) from exc
            if not data:
                raise self._ended()
            self._framer.feed(data)

    async def batches(self) -> AsyncIterator[np.ndarray]:
        """Each batch of whole messages as it arrives, until the relay closes the connection."""
        while True:
            try:
                batch = await self.recv_batch()
            except EOFError:
                return
            assert batch is not None
            yield batch

    async def _messages(self) -> AsyncIterator[protocol.Message]:
        async for batch in self.batches():
            for message in protocol.decode_messages(batch):
                yield message

    def __aiter__(self) -> AsyncIterator[protocol.Message]:
        return self._messages()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._reader = self._writer = None

    async def __aenter__(self) -> AsyncSubscriber:
        return await self.connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
