"""The blocking subscriber, and the blocking steps of taking the relay's log from shared memory.

Receiving reads in place: iterating a subscriber yields ``MessageView``s over
each received batch (``core.views``), whose fields are unpacked when read, so
a consumer that reads a sequence number pays for eight bytes, not for a
decoded message.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from jitrelay.client.address import RelayAddress
from jitrelay.client.errors import RelayConnectionError
from jitrelay.client.errors import connect as _connect  # a module global, so that a test can stand in for it
from jitrelay.client.reconnect import Reconnect, ReconnectFailed, announce_lost, log, policy_for, retry
from jitrelay.client.records import RecordReader
from jitrelay.client.shared_log import IDLE_CHECK_SECONDS, MappedStream
from jitrelay.client.stream import SubscriberMode, SubscriberStream
from jitrelay.core import protocol
from jitrelay.core.views import COLUMNS_FROM, MessageView, iter_views
from jitrelay.kernels.framer import DEFAULT_BUFFER_SIZE

_HEADER_SIZE = protocol.HEADER_SIZE
_VIEW_FIELDS = struct.Struct("<QQI").unpack_from  # sequence, timestamp_ns, payload_size, at OFF_SEQUENCE
_COLUMNS_BYTES = COLUMNS_FROM * protocol.HEADER_SIZE  # below this, no batch holds COLUMNS_FROM messages


def open_mapped(stream: SubscriberStream, sock: socket.socket) -> None:
    """Ask for the mapped log and wait for it (blocking, up to the grant's timeout); keep what came before it.

    Raises ``RelayConnectionError`` when the relay does not hand its log over.
    """
    assert stream._initial is not None
    try:
        sock.sendall(stream._initial)
        stream._mapped = MappedStream.take_grant(
            sock,
            stream._framer.feed,
            stream.logic,
            stream._selection,
            stream._framer.capacity,
            stream.positioned,
            stream.gaps,
        )
    except OSError as exc:
        raise RelayConnectionError(
            f"the {stream.domain} relay at {stream.socket_path} did not hand over its log: {exc}"
        ) from exc


def next_mapped(stream: SubscriberStream) -> np.ndarray | None:
    """The next batch: first the stream's part that came over the socket before the grant, then the mapping.

    Never waits; raises ``EOFError`` (``CutOff``) once the relay has lapped a reader without positions.
    """
    batch = stream._buffered_batch()
    if batch is not None:
        return batch
    return stream._reading_mapping().poll()


class Subscriber(SubscriberStream, RecordReader):
    """Receive the messages the relay forwards, blocking: all of them, or those a subscription selects.

    With ``tlv_types`` and/or ``sources`` the relay sends only messages from
    one of ``sources`` that carry a record of one of ``tlv_types`` (each set,
    when given); ``subscribe``/``unsubscribe`` change that on the live
    connection, effective from the next message the relay forwards.

    Iterating yields a ``MessageView`` per message: a view over the received
    batch that reads like a ``protocol.Message`` (``header``, ``records``,
    ``raw``) and unpacks a field only when it is read (``view.sequence``,
    ``view.timestamp_ns``, ...); ``messages()`` yields decoded
    ``protocol.Message`` objects instead. ``batches()`` yields uint8 arrays
    of whole messages, and ``Subscriber.headers(batch)`` every header of one
    as a structured array of ``protocol.HEADER_DTYPE``, in one call. A
    stream that stops making sense (bad magic) raises ``protocol.ProtocolError``.

    A lost relay (a restart, a deploy) is reconnected to as ``reconnect``
    says (``client.reconnect``; on by default): the subscriber connects
    again with its subscription and shared-memory request, and with
    positions resumes right after the last message it handed out, the
    relay's ``gaps`` notice saying what that cannot give back (an exact
    count, or "not known" when the relay restarted; nothing on execution,
    whose journal replays it). Without positions what was published while it
    was away is not known. ``ReconnectFailed`` is raised when it gives up:
    iteration never simply ends on a lost relay. With ``reconnect=False``,
    when the relay closes the connection between messages iteration ends;
    when it closes it in the middle of a message, ``RelayConnectionError``
    is raised.
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
        self._timeout: float | None = None
        self._sock: socket.socket | None = self._open()

    def _open(self) -> socket.socket:
        """A connection to the relay that has been sent the initial control message (or granted the mapped log)."""
        sock = _connect(self.domain, self.socket_path)
        try:
            if self._initial is not None:
                if self._mode is SubscriberMode.MAPPED:
                    open_mapped(self, sock)
                else:
                    try:
                        sock.sendall(self._initial)
                    except OSError as exc:
                        raise self._lost(exc) from exc
        except BaseException:
            sock.close()  # the caller never gets it, so nobody else would close it
            self._fresh_framer()
            raise
        return sock

    def _may_reconnect(self) -> bool:
        """Whether a lost relay is to be reconnected to; if not, the caller raises the loss itself.

        (Raising it here would tie the exception to this frame in a cycle, which keeps a mapping alive until the
        garbage collector runs.)
        """
        return self.reconnect is not None and self._sock is not None

    def _recover(self, lost: BaseException) -> None:
        """Reconnect after losing the relay (``_resume_message`` says how); ``ReconnectFailed`` on giving up."""
        assert self.reconnect is not None and self._sock is not None
        what = f"subscriber to the {self.domain} relay at {self.socket_path}"
        announce_lost(self.reconnect, what, lost if isinstance(lost, RelayConnectionError) else self._lost())
        self._sock.close()
        self._sock = None
        partial = self._forget_connection()
        if partial and not self.positioned:
            log.warning("%s lost the %d bytes it had of an unfinished message", what, partial)
        try:
            self._sock = retry(self.reconnect, what, self._open)
        except ReconnectFailed as failed:
            self._gave_up = failed
            raise
        self._timeout = None
        self.reconnects += 1

    def subscribe(self, tlv_types: Iterable[int] | None = None, sources: Iterable[int] | None = None) -> None:
        """Receive only messages from ``sources`` carrying a record of ``tlv_types``; None leaves that set as it is."""
        self._control(self._select(protocol.subscribe_message(tlv_types, sources)))

    def unsubscribe(self) -> None:
        """Receive the whole domain again."""
        self._control(self._select(protocol.unsubscribe_message()))

    def _control(self, message: bytes) -> None:
        sock = self._socket()
        self._set_timeout(None)
        try:
            sock.sendall(message)
        except OSError as exc:
            if not self._may_reconnect():
                raise self._lost(exc) from exc
            self._recover(self._lost(exc))  # the new connection starts with the subscription asked for

    def recv_batch(self, timeout: float | None = None) -> np.ndarray | None:
        """The next batch of whole messages, or None if none completed within ``timeout`` seconds.

        Raises ``EOFError`` when the relay has closed the connection between
        messages, ``RelayConnectionError`` when it closed it mid-message.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._mode is SubscriberMode.MAPPED:
            return self._recv_mapped(deadline)
        while True:
            raw = self._next_raw(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if raw is None:
                return None
            batch = self._data(raw)
            if batch is not None:
                return batch

    def _recv_mapped(self, deadline: float | None) -> np.ndarray | None:
        self._socket()
        while True:
            mapped = self._mapped
            assert mapped is not None
            batch = next_mapped(self)
            if batch is not None:
                return batch
            remaining = IDLE_CHECK_SECONDS if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                mapped.wait(remaining)
            except EOFError as ended:
                if not self._may_reconnect():
                    raise
                self._recover(ended)

    def _next_raw(self, timeout: float | None) -> np.ndarray | None:
        """The next batch as the relay sent it, notices included."""
        sock = self._socket()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self._framer.maybe_extract_batch()
            if batch is not None:
                return batch
            self._set_timeout(None if deadline is None else max(0.0, deadline - time.monotonic()))
            try:
                received = sock.recv_into(self._framer.space())  # type: ignore[arg-type]  # numpy's stubs do not type an array as a buffer
            except (TimeoutError, BlockingIOError):
                return None
            except OSError as exc:
                if not self._may_reconnect():
                    raise self._lost(exc) from exc
                self._recover(self._lost(exc))
                sock = self._socket()
                continue
            if received == 0:
                if not self._may_reconnect():
                    raise self._ended()
                self._recover(self._ended())
                sock = self._socket()
                continue
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

    def __iter__(self) -> Iterator[MessageView]:
        """Each message as a ``MessageView``, until the relay closes the connection between messages.

        Raises ``RelayConnectionError`` when it closes it mid-message, ``protocol.ProtocolError`` for a stream
        that stops making sense.
        """
        mode = self._mode
        if mode is SubscriberMode.MAPPED:
            for batch in self.batches():
                yield from self._mapped_views(batch)
            return
        if mode is SubscriberMode.POSITIONED:  # notices out of the stream, the position past each message
            while True:
                try:
                    raw = self._next_raw(None)
                except EOFError:
                    return
                assert raw is not None
                yield from self._views(raw)
        # recv_batch's loop without what iterating does not need (deadlines, a numpy batch then its bytes).
        framer = self._framer
        take, read_from = framer.take, framer.read_from
        while True:
            if framer is not self._framer:  # a new one, after a reconnection
                framer = self._framer
                take, read_from = framer.take, framer.read_from
            data = take()
            if data is not None:
                if len(data) >= _COLUMNS_BYTES:
                    yield from iter_views(data)
                    continue
                # A few messages (a paced stream's one): iter_views's walk, inlined to spare a generator.
                offset, end = 0, len(data)
                while offset < end:
                    sequence, stamp, payload_size = _VIEW_FIELDS(data, offset + protocol.OFF_SEQUENCE)
                    stop = offset + _HEADER_SIZE + payload_size
                    yield MessageView(data, offset, stop, sequence, stamp)
                    offset = stop
                continue
            sock = self._socket()
            if self._timeout is not None:
                self._set_timeout(None)
            try:
                received = read_from(sock.recv_into)
            except OSError as exc:
                if not self._may_reconnect():
                    raise self._lost(exc) from exc
                self._recover(self._lost(exc))
                continue
            if received == 0:
                if not self._may_reconnect():
                    if self._framer.buffered:
                        raise self._ended()
                    return
                self._recover(self._ended())

    def messages(self) -> Iterator[protocol.Message]:
        """Each message decoded into a ``protocol.Message``, for code that wants objects rather than views."""
        for batch in self.batches():
            yield from protocol.decode_messages(batch)  # type: ignore[arg-type]  # numpy's stubs do not type an array as a buffer

    def close(self) -> None:
        """Close the connection (and drop the mapping); the relay forgets this subscriber. Never raises."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._mapped = None

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise self._gave_up or self._closed()
        return self._sock

    def _set_timeout(self, timeout: float | None) -> None:
        if timeout != self._timeout:
            assert self._sock is not None
            self._sock.settimeout(timeout)
            self._timeout = timeout
