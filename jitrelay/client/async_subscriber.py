"""The asyncio subscriber: the same stream state as ``Subscriber``, read through asyncio's streams."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import numpy as np

from jitrelay.client.address import RelayAddress
from jitrelay.client.errors import AsyncConnection, RelayConnectionError, connect, open_connection
from jitrelay.client.reconnect import Reconnect, ReconnectFailed, announce_lost, log, policy_for, retry_async
from jitrelay.client.records import AsyncRecordReader
from jitrelay.client.shared_log import IDLE_CHECK_SECONDS
from jitrelay.client.stream import SubscriberMode, SubscriberStream
from jitrelay.client.subscriber import next_mapped, open_mapped
from jitrelay.core import protocol
from jitrelay.core.views import MessageView, iter_views
from jitrelay.kernels.framer import DEFAULT_BUFFER_SIZE


class AsyncSubscriber(SubscriberStream, AsyncConnection, AsyncRecordReader):
    """``Subscriber`` for asyncio: ``async for message in sub``, ``async for batch in sub.batches()``.

    Subscribes, reconnects, ends and raises exactly as ``Subscriber`` does.
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
        reconnect: bool | Reconnect = True,
    ) -> None:
        super().__init__(domain, socket_path, buffer_size, tlv_types, sources, positions, resume_from, shared_memory)
        self.reconnect = policy_for(reconnect)
        self.reconnects = 0  # how many times a lost relay was reconnected to
        self._buffer_size = buffer_size
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._sock: socket.socket | None = None  # with shared memory: the socket beside the mapping
        self._closed_by_caller = False

    async def connect(self) -> AsyncSubscriber:
        """Connect unless connected, and send the subscription; raises ``RelayConnectionError`` as ``Subscriber``."""
        if self._gave_up is not None:
            raise self._gave_up
        if self._sock is None and self._reader is None:
            await self._open()
        return self

    async def _open(self) -> None:
        """A connection that has been sent the initial control message (or granted the mapped log)."""
        if self._mode is SubscriberMode.MAPPED:
            sock = connect(self.domain, self.socket_path)
            try:
                # The grant comes with the log's descriptors (recvmsg), which asyncio's streams cannot read: the
                # blocking wait for it (at most GRANT_TIMEOUT) runs in the executor, once per connection.
                await asyncio.get_running_loop().run_in_executor(None, open_mapped, self, sock)
            except BaseException:
                sock.close()
                self._fresh_framer()
                raise
            self._sock = sock
            return
        reader, writer = await open_connection(self.domain, self.socket_path, self._buffer_size)
        if self._initial is not None:
            writer.write(self._initial)
            try:
                await writer.drain()
            except BaseException:
                writer.close()
                raise
        self._reader, self._writer = reader, writer

    def _may_reconnect(self) -> bool:
        """Whether a lost relay is to be reconnected to; if not, the caller raises the loss (as ``Subscriber``)."""
        return self.reconnect is not None and not self._closed_by_caller

    async def _recover(self, lost: BaseException) -> None:
        """Reconnect after losing the relay, as ``Subscriber`` does; ``ReconnectFailed`` on giving up."""
        assert self.reconnect is not None
        what = f"subscriber to the {self.domain} relay at {self.socket_path}"
        announce_lost(self.reconnect, what, lost if isinstance(lost, RelayConnectionError) else self._lost())
        partial = self._forget_connection()  # first: a mapped stream's position is the mapping's
        await self._drop()
        if partial and not self.positioned:
            log.warning("%s lost the %d bytes it had of an unfinished message", what, partial)
        try:
            await retry_async(self.reconnect, what, self._open)
        except ReconnectFailed as failed:
            self._gave_up = failed
            raise
        self.reconnects += 1

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
                if not self._may_reconnect():
                    raise self._lost(exc) from exc
                await self._recover(self._lost(exc))  # the new connection starts with the subscription asked for
            return
        assert self._writer is not None
        self._writer.write(message)
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            if not self._may_reconnect():
                raise self._lost(exc) from exc
            await self._recover(self._lost(exc))

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
            try:
                await loop.run_in_executor(None, self._mapped.wait, remaining)
            except EOFError as ended:
                if not self._may_reconnect():
                    raise
                await self._recover(ended)

    async def _next_raw(self, timeout: float | None) -> np.ndarray | None:
        """The next batch as the relay sent it, notices included."""
        await self.connect()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            batch = self._framer.maybe_extract_batch()
            if batch is not None:
                return batch
            assert self._reader is not None
            read = self._reader.read(len(self._framer.space()))
            try:
                if deadline is None:
                    data = await read
                else:
                    data = await asyncio.wait_for(read, max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return None
            except ConnectionError as exc:
                if not self._may_reconnect():
                    raise self._lost(exc) from exc
                await self._recover(self._lost(exc))
                continue
            if not data:
                if not self._may_reconnect():
                    raise self._ended()
                await self._recover(self._ended())
                continue
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
        while True:
            framer = self._framer  # a new one after a reconnection
            data = framer.take()
            if data is not None:
                for view in iter_views(data):
                    yield view
                continue
            assert self._reader is not None
            try:
                chunk = await self._reader.read(len(framer.space()))
            except ConnectionError as exc:
                if not self._may_reconnect():
                    raise self._lost(exc) from exc
                await self._recover(self._lost(exc))
                continue
            if not chunk:
                if not self._may_reconnect():
                    if self._framer.buffered:
                        raise self._ended()
                    return
                await self._recover(self._ended())
                continue
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
        self._closed_by_caller = True
        await self._drop()

    async def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._mapped = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._reader = self._writer = None
