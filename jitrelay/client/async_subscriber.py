"""The asyncio subscriber: the same stream state as ``Subscriber``, read through asyncio's streams."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import numpy as np

from jitrelay.client.address import RelayAddress
from jitrelay.client.errors import AsyncConnection, connect, open_connection
from jitrelay.client.records import AsyncRecordReader
from jitrelay.client.shared_log import IDLE_CHECK_SECONDS
from jitrelay.client.stream import SubscriberMode, SubscriberStream
from jitrelay.client.subscriber import next_mapped, open_mapped
from jitrelay.core import protocol
from jitrelay.core.views import MessageView, iter_views
from jitrelay.kernels.framer import DEFAULT_BUFFER_SIZE


class AsyncSubscriber(SubscriberStream, AsyncConnection, AsyncRecordReader):
    """``Subscriber`` for asyncio: ``async for message in sub``, ``async for batch in sub.batches()``.

    Subscribes, ends and raises exactly as ``Subscriber`` does.
    """

    def __init__(
        self,
        domain: str,
        socket_path: str | Path | RelayAddress | None = None,
        *,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        tlv_types: Iterable[int] | None = None,
        sources: Iterable[int] | None = None,
        positions: bool = False,
        resume_from: protocol.Position | str | None = None,
        shared_memory: bool = False,
    ) -> None:
        super().__init__(domain, socket_path, buffer_size, tlv_types, sources, positions, resume_from, shared_memory)
        self._buffer_size = buffer_size
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._sock: socket.socket | None = None  # with shared memory: the socket beside the mapping

    async def connect(self) -> AsyncSubscriber:
        """Connect unless connected, and send the subscription; raises ``RelayConnectionError`` as ``Subscriber``."""
        if self._mode is SubscriberMode.MAPPED:
            if self._sock is None:
                sock = connect(self.domain, self.socket_path)
                try:
                    # The grant comes with the log's descriptors (recvmsg), which asyncio's streams cannot read: the
                    # blocking wait for it (at most GRANT_TIMEOUT) runs in the executor, once per connection.
                    await asyncio.get_running_loop().run_in_executor(None, open_mapped, self, sock)
                except BaseException:
                    sock.close()
                    raise
                self._sock = sock
            return self
        if self._reader is None:
            self._reader, self._writer = await open_connection(self.domain, self.socket_path, self._buffer_size)
            if self._initial is not None:
                await self._control(self._initial)
        return self

    async def subscribe(self, tlv_types: Iterable[int] | None = None, sources: Iterable[int] | None = None) -> None:
        """As ``Subscriber.subscribe``."""
        await self._control(self._select(protocol.subscribe_message(tlv_types, sources)))

    async def unsubscribe(self) -> None:
        """Receive the whole domain again."""
        await self._control(self._select(protocol.unsubscribe_message()))

    async def _control(self, message: bytes) -> None:
        await self.connect()
        if self._mapped is not None:
            try:
                self._mapped.send(message)  # a few dozen bytes on a socket the relay never leaves full
            except OSError as exc:
                raise self._lost(exc) from exc
            return
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
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        if self._mode is SubscriberMode.MAPPED:
            await self.connect()
            return await self._recv_mapped(deadline)
        while True:
            raw = await self._next_raw(None if deadline is None else max(0.0, deadline - loop.time()))
            if raw is None:
                return None
            batch = self._data(raw)
            if batch is not None:
                return batch

    async def _recv_mapped(self, deadline: float | None) -> np.ndarray | None:
        """As ``Subscriber``'s: the sleep on the log's futex word (a blocking system call) runs in the executor."""
        loop = asyncio.get_running_loop()
        while True:
            if self._mapped is None:
                raise self._closed()
            batch = next_mapped(self)
            if batch is not None:
                return batch
            remaining = IDLE_CHECK_SECONDS if deadline is None else deadline - loop.time()
            if remaining <= 0:
                return None
            await loop.run_in_executor(None, self._mapped.wait, remaining)

    async def _next_raw(self, timeout: float | None) -> np.ndarray | None:
        """The next batch as the relay sent it, notices included."""
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

    async def _each_view(self) -> AsyncIterator[MessageView]:
        mode = self._mode
        if mode is SubscriberMode.MAPPED:
            async for batch in self.batches():
                for view in self._mapped_views(batch):
                    yield view
            return
        if mode is SubscriberMode.POSITIONED:  # as Subscriber's: notices out, the position past each message handed out
            while True:
                try:
                    raw = await self._next_raw(None)
                except EOFError:
                    return
                assert raw is not None
                for view in self._views(raw):
                    yield view
        await self.connect()
        framer = self._framer
        while True:
            data = framer.take()
            if data is not None:
                for view in iter_views(data):
                    yield view
                continue
            assert self._reader is not None
            try:
                chunk = await self._reader.read(len(framer.space()))
            except ConnectionError as exc:
                raise self._lost(exc) from exc
            if not chunk:
                ended = self._ended()
                if isinstance(ended, EOFError):
                    return
                raise ended
            framer.feed(chunk)

    def __aiter__(self) -> AsyncIterator[MessageView]:
        """Each message as a ``MessageView``; ends and raises as iterating a ``Subscriber`` does."""
        return self._each_view()

    async def messages(self) -> AsyncIterator[protocol.Message]:
        """Each message decoded into a ``protocol.Message``, as ``Subscriber.messages``."""
        async for batch in self.batches():
            for message in protocol.decode_messages(batch):  # type: ignore[arg-type]  # numpy's stubs do not type an array as a buffer
                yield message

    async def close(self) -> None:
        """Close the connection (and drop the mapping). Never raises."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._mapped = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._reader = self._writer = None
