"""Publishers and subscribers for applications, blocking and asyncio.

A relay connection carries whole messages back to back with no framing besides
the header, so a subscriber must cut its byte stream into messages itself.
``MessageFramer`` does that once for both flavours: it owns a numpy receive
buffer, hands out its free tail for the next read (``recv_into`` or a copy of
what asyncio read), and returns every complete message as one batch, keeping
the unfinished tail for the next read. Framing is ``kernels.frame``, the same
walk the relay does, so a batch costs one compiled call however many messages
it holds, and a partial message costs a re-read of its header only.

Receiving reads in place: iterating a subscriber yields ``MessageView``s
over each received batch (``core.views``), whose fields are unpacked when
read, so a consumer that reads a sequence number pays for eight bytes, not
for a decoded message.

The relay fans every message out to every other connection, publishers
included. A publisher that never read would look like a slow subscriber: the
relay would drop it (``disconnect`` policy) or stop reading from everyone while
it waited for it (``block``). So a publisher's first bytes declare it
publish-only (a ``PUBLISH_ONLY`` control message): the relay then sends it
nothing, and it never reads. (With ``publish_only=False`` it reads away and
discards what the relay sends it, as before.)

Publishing writes each message into a preallocated buffer and writes the
buffer out: at once by default, or coalesced (``Publisher.batch()``,
``linger``, and the asyncio publisher's write per event-loop turn), so that a
burst costs one system call per ``flush_size`` bytes rather than one per
message. Closing with unread input would reset the connection, and the relay
could lose the publisher's last messages; so a publisher closes gracefully:
it writes out its buffer, shuts down its sending side, reads until the
relay, having read everything, closes its side, then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from jitrelay.client.shared_log import IDLE_CHECK_SECONDS, CutOff, MappedStream
from jitrelay.core import protocol
from jitrelay.core.domains import RelayLogic, logic_for
from jitrelay.core.views import COLUMNS_FROM, MessageView, batch_headers, iter_views, message_offsets
from jitrelay.kernels.framer import DEFAULT_BUFFER_SIZE, Buffer, MessageFramer

__all__ = [
    "AsyncPublisher",
    "AsyncSubscriber",
    "CutOff",
    "MessageFramer",
    "MessageView",
    "Publisher",
    "RelayConnectionError",
    "Subscriber",
]

_DISCARD_CHUNK = 256 * 1024
_FROM_MAPPING: Any = object()  # ``_position`` when it is the mapped reader's own
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
    """What both publishers share: the target, the source id, the sequence counter and the outgoing buffer.

    Messages are written straight into one preallocated buffer: the header
    with a single ``struct.pack_into`` (its first eight bytes, magic to
    flags, precomputed but for the flags), each record's type and length by
    index and its value by slice assignment. The CRC is computed only when
    the domain verifies it (or the caller asked for it); otherwise the
    checksum field is 0, as the relay of a domain that does not verify never
    reads it. What is buffered is always whole messages, so whatever is
    written out, and whatever a killed process leaves behind, is too.
    """

    kind = "publisher"

    def __init__(
        self,
        domain: str,
        socket_path: str | Path | None,
        source: int,
        checksum: bool | None,
        publish_only: bool,
        flush_size: int,
        version: int,
    ):
        super().__init__(domain, socket_path)
        if not 0 <= source <= 255:
            raise ValueError(f"source {source} is not a byte value (0..255)")
        if not 0 <= version <= 255:
            raise ValueError(f"version {version} is not a byte value (0..255)")
        if flush_size < 1:
            raise ValueError("flush_size must be positive")
        self.domain_id = self.logic.domain_id
        self.source = source
        self.next_sequence = 0
        self._checksum = self.logic.verifies_checksums if checksum is None else checksum
        self.version = version
        self.publish_only = publish_only
        self.flush_size = flush_size
        # Room for a full flush plus one more message of standard records; larger ones take the slow path.
        self._buf = bytearray(flush_size + _HEADROOM)
        self._view = memoryview(self._buf)
        self._limit = len(self._buf)
        self._fill = 0
        self._prefix = protocol.MAGIC | self.domain_id << 32 | version << 40 | source << 48
        # A message of one standard record of the value length last published: (length, size, its pack_into).
        self._one: tuple[int, int, Callable[..., None]] = _NO_LAYOUT
        if publish_only:
            declaration = protocol.publish_only_message(source=source)
            self._buf[: len(declaration)] = declaration
            self._fill = len(declaration)

    @property
    def buffered(self) -> int:
        """Bytes of whole messages published but not yet written to the socket."""
        return self._fill

    @property
    def checksum(self) -> bool:
        """Whether each message carries its CRC (the domain's setting unless the publisher was told)."""
        return self._checksum

    @checksum.setter
    def checksum(self, value: bool) -> None:
        self._checksum = bool(value)
        self._one = _NO_LAYOUT  # the fast path writes no CRC: leave it until _encode has seen a message again

    def _encode(
        self, records: Iterable[tuple[int, bytes]], flags: int, sequence: int | None, timestamp_ns: int | None
    ) -> int:
        """Append one message to the buffer and return its sequence number.

        Every shape of message; the publish methods inline its commonest case
        (see ``_one``) and come here for the rest, and for the first message
        of each value length.
        """
        if sequence is None:
            sequence = self.next_sequence
        if timestamp_ns is None:
            timestamp_ns = _time_ns()
        start = self._fill
        try:
            tlv_type, value = records[0] if len(records) == 1 else _NOT_ONE  # type: ignore[arg-type,index]
        except TypeError:  # an iterator: the general walk below
            tlv_type, value = _NOT_ONE
        if value.__class__ is bytes and 0 < tlv_type < _EXTENDED_TLV and len(value) <= _MAX_STANDARD:
            # One standard record: the whole message in one pack_into (and, without a checksum, the layout
            # kept for the publish methods' inlined fast path).
            n = len(value)
            one = (n, _HEADER_SIZE + 2 + n, _one_record(n).pack_into)
            if not self._checksum:
                self._one = one
            pos = start + one[1]
            buf = self._buf if pos <= self._limit else self._grow(pos)
            one[2](buf, start, self._prefix | flags << 56, sequence, timestamp_ns, n + 2, 0, tlv_type, n, value)
        else:
            if start + _HEADER_SIZE > self._limit:
                self._grow(start + _HEADER_SIZE)
            pos = self._records_into(records, start + _HEADER_SIZE)
            buf = self._buf
            size = pos - start - _HEADER_SIZE
            _HEAD.pack_into(buf, start, self._prefix | flags << 56, sequence, timestamp_ns, size, 0)
        if self._checksum:
            view = self._view
            crc = zlib.crc32(view[start + _HEADER_SIZE : pos], zlib.crc32(view[start : start + 28]))
            _CHECKSUM.pack_into(buf, start + protocol.OFF_CHECKSUM, crc)
        self._fill = pos
        self.next_sequence = sequence + 1
        return sequence

    def _records_into(self, records: Iterable[tuple[int, bytes]], pos: int) -> int:
        """Write ``records`` from ``pos`` on, growing the buffer if they need it; return where they end."""
        buf = self._buf
        for tlv_type, value in records:
            n = len(value)
            if n <= _MAX_STANDARD and tlv_type != _EXTENDED_TLV:
                if pos + 2 + n > self._limit:
                    buf = self._grow(pos + 2 + n)
                buf[pos] = tlv_type
                buf[pos + 1] = n
                pos += 2
            else:
                if n > _MAX_EXTENDED:
                    raise ValueError(f"TLV value of {n} bytes exceeds {_MAX_EXTENDED}")
                if pos + 5 + n > self._limit:
                    buf = self._grow(pos + 5 + n)
                _EXTENDED.pack_into(buf, pos, _EXTENDED_TLV, 0, tlv_type, n)
                pos += 5
            buf[pos : pos + n] = value
            pos += n
        return pos

    def _grow(self, needed: int) -> bytearray:
        """A larger buffer holding what is written so far: for a message larger than the room left."""
        grown = bytearray(max(2 * len(self._buf), needed + _HEADROOM))
        grown[: len(self._buf)] = self._buf
        self._buf, self._view, self._limit = grown, memoryview(grown), len(grown)
        return grown

    def _take(self) -> bytes | memoryview:
        """The buffered messages, emptied from the buffer."""
        data = bytes(self._view[: self._fill])
        self._fill = 0
        return data


_time_ns = time.time_ns
_HEADER_SIZE = protocol.HEADER_SIZE
_MAX_STANDARD = protocol.MAX_STANDARD_VALUE
_MAX_EXTENDED = protocol.MAX_EXTENDED_VALUE
_EXTENDED_TLV = protocol.EXTENDED_TLV
_HEAD = struct.Struct("<QQQII")  # magic..flags as one integer, sequence, timestamp_ns, payload_size, checksum
_EXTENDED = struct.Struct("<BBBH")
_CHECKSUM = struct.Struct("<I")
_HEADROOM = 64 * 1024
_VIEW_FIELDS = struct.Struct("<QQI").unpack_from  # sequence, timestamp_ns, payload_size, at OFF_SEQUENCE
_COLUMNS_BYTES = COLUMNS_FROM * protocol.HEADER_SIZE  # below this, no batch holds COLUMNS_FROM messages
DEFAULT_FLUSH_SIZE = 64 * 1024
_NOT_ONE = (-1, None)  # what a records argument that is not one record unpacks to
_NO_LAYOUT = (-1, 0, _HEAD.pack_into)  # no value has length -1: the fast path is never taken
_ONE_RECORD: dict[int, struct.Struct] = {}  # value length -> the layout of a message of one standard record


def _one_record(n: int) -> struct.Struct:
    layout = _ONE_RECORD.get(n)
    if layout is None:
        layout = _ONE_RECORD[n] = struct.Struct(f"<QQQIIBB{n}s")
    return layout


class Publisher(_PublisherState):
    """Publish messages into a relay over its Unix socket.

    ``publish`` numbers messages from 0 unless given a ``sequence``, after
    which numbering continues from it. Raises ``RelayConnectionError`` when
    the relay is not running or has closed the connection.

    When a message goes out (the bound on how long it may wait):

    - by default (``linger=0``), each ``publish`` writes its message before
      it returns: a paced publisher adds no latency;
    - inside ``with pub.batch():`` messages collect in the buffer and go out
      whenever ``flush_size`` bytes are buffered and when the block ends;
    - with ``linger=L`` seconds, messages collect the same way and a
      background thread writes out whatever has waited, every ``L / 2``
      seconds, so no message waits much longer than ``L`` (scheduling
      permitting);
    - ``flush()`` and ``close()`` write out everything buffered.

    Only whole messages are ever buffered or written, so a publisher killed
    with messages still buffered loses those messages, never part of one.

    Headers carry ``version`` (jitrelay's 2 unless told; a relay accepts
    what its ``versions`` setting lists, 1 and 2 by default). The checksum is
    computed when the domain's policy checks it, unless ``checksum`` says.

    The publisher tells the relay it only publishes (a ``PUBLISH_ONLY``
    control message, see docs/protocol.md), so the relay sends it nothing and
    it never reads. With ``publish_only=False`` it stays an ordinary
    connection and reads away what the relay forwards to it before each write.
    """

    def __init__(
        self,
        domain: str,
        socket_path: str | Path | None = None,
        *,
        source: int = 0,
        checksum: bool | None = None,
        linger: float = 0.0,
        flush_size: int = DEFAULT_FLUSH_SIZE,
        publish_only: bool = True,
        version: int = protocol.VERSION,
    ):
        if linger < 0:
            raise ValueError("linger must be at least 0")
        super().__init__(domain, socket_path, source, checksum, publish_only, flush_size, version)
        self.linger = linger
        self._sock: socket.socket | None = _connect(domain, self.socket_path)
        self._sock.setblocking(False)
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN | select.POLLOUT)
        self._scratch = bytearray(_DISCARD_CHUNK)
        self._batching = 0
        self._flush_at = flush_size if linger else 1  # buffered bytes that make publish write out
        self._lock: threading.Lock | None = None
        self._lingering: threading.Event | None = None
        try:
            self._write_out()  # the publish-only declaration
        except BaseException:
            self._sock.close()
            raise
        if linger:
            self._lock = threading.Lock()
            self._lingering = threading.Event()
            threading.Thread(target=self._linger_loop, name="jitrelay-publisher-linger", daemon=True).start()

    def publish(
        self,
        records: Iterable[tuple[int, bytes]] = (),
        *,
        flags: int = 0,
        sequence: int | None = None,
        timestamp_ns: int | None = None,
    ) -> int:
        """Build one message of ``(type, value)`` records into the buffer; return its sequence number.

        It is written out before this returns unless inside ``batch()`` or
        with ``linger`` (then when ``flush_size`` bytes are buffered).
        """
        if self._lock is not None:
            with self._lock:
                number = self._encode(records, flags, sequence, timestamp_ns)
                if self._fill >= self._flush_at:
                    self._write_out()
                return number
        # The fast path, inlined (a call costs as much as the rest): one standard record of the length last
        # published, room in the buffer, no checksum (``_one`` is never set then). Anything else: ``_encode``.
        n, total, pack_into = self._one
        start = self._fill
        try:
            tlv_type, value = records[0] if len(records) == 1 else _NOT_ONE  # type: ignore[arg-type,index]
        except TypeError:  # an iterator
            tlv_type, value = _NOT_ONE
        if (
            value.__class__ is bytes
            and len(value) == n
            and 0 < tlv_type < _EXTENDED_TLV
            and start + total <= self._limit
        ):
            if sequence is None:
                sequence = self.next_sequence
            if timestamp_ns is None:
                timestamp_ns = _time_ns()
            pack_into(
                self._buf, start, self._prefix | flags << 56, sequence, timestamp_ns, n + 2, 0, tlv_type, n, value
            )
            self._fill = start + total
            self.next_sequence = sequence + 1
        else:
            sequence = self._encode(records, flags, sequence, timestamp_ns)
        if self._fill >= self._flush_at:  # 0 once closed, so that _write_out raises
            self._write_out()
        return sequence

    def publish_raw(self, message: Buffer) -> None:
        """Send bytes exactly as given, valid or not, after everything buffered."""
        self._locked(self._send_after, message)

    def publish_batch(self, buffer: Buffer) -> None:
        """Send a buffer of complete messages (e.g. from ``protocol.build_batch``) in one write."""
        self._locked(self._send_after, buffer)

    @contextlib.contextmanager
    def batch(self) -> Iterator[Publisher]:
        """Within the block, publish writes out by size only; leaving it writes out everything."""
        self._batching += 1
        self._flush_at = self.flush_size
        try:
            yield self
        finally:
            self._batching -= 1
            if self._sock is not None:
                if not self._batching and not self.linger:
                    self._flush_at = 1
                self.flush()

    def flush(self) -> None:
        """Write out everything buffered; when it returns, the kernel holds every message published."""
        self._locked(self._write_out)
        if not self.publish_only:
            self._discard()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write out what is buffered, then close once the relay has read everything, waiting at most ``timeout`` s."""
        if self._lingering is not None:
            self._lingering.set()
        sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(RelayConnectionError):
            self._locked(self._write_out)
        self._sock = None
        self._flush_at = 0  # any later publish reaches _write_out, which raises
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

    def _locked(self, action: Callable[..., None], *args: Any) -> None:
        if self._lock is None:
            action(*args)
        else:
            with self._lock:
                action(*args)

    def _linger_loop(self) -> None:
        """Write out, every ``linger / 2`` seconds, whatever has been buffered meanwhile."""
        assert self._lingering is not None and self._lock is not None
        while not self._lingering.wait(self.linger / 2):
            with self._lock:
                if self._sock is None:
                    return
                if self._fill:
                    try:
                        self._write_out()
                    except RelayConnectionError:
                        return  # the next publish raises it

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise self._closed()
        return self._sock

    def _send_after(self, data: Buffer) -> None:
        self._write_out()
        self._send(data)

    def _write_out(self) -> None:
        fill = self._fill
        if not fill:
            return
        sock = self._sock
        if sock is not None and self.publish_only:  # the usual case: one send takes it all
            try:
                sent = sock.send(self._view[:fill])
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise self._lost(exc) from exc
            if sent < fill:
                self._send(self._view[sent:fill])
        else:
            self._send(self._view[:fill])
        self._fill = 0

    def _send(self, data: Buffer) -> None:
        sock = self._socket()
        if not self.publish_only:
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


def _not_connected(*args: Any) -> None:
    raise RuntimeError("the publisher is not connected")  # never called: publish_nowait checks first


def _subscription(tlv_types: Iterable[int] | None, sources: Iterable[int] | None) -> bytes | None:
    """The control message for a subscription, or None for the whole domain."""
    if tlv_types is None and sources is None:
        return None
    return protocol.subscribe_message(tlv_types, sources)


class _SubscriberState(_Endpoint):
    """What both subscribers share: the target, the framer, the subscription sent on connecting, how a stream ends.

    With positions (``positions=True``, or ``resume_from``) the relay puts
    notices in the stream (docs/protocol.md, "Positions"); they are taken out
    here: ``position`` is where the stream stands after the last message
    handed out, and ``gaps`` what the relay said was missed.

    With ``shared_memory=True`` the stream, once the relay has granted it,
    comes from the relay's log mapped into this process (``client.shared_log``)
    instead of the socket: the same bytes, in the same order, without a send
    per subscriber. A subscription is then applied here, with the relay's own
    compiled routing.
    """

    kind = "subscriber"

    def __init__(
        self,
        domain: str,
        socket_path: str | Path | None,
        buffer_size: int,
        tlv_types: Iterable[int] | None,
        sources: Iterable[int] | None,
        positions: bool = False,
        resume_from: protocol.Position | str | None = None,
        shared_memory: bool = False,
    ):
        super().__init__(domain, socket_path)
        self._framer = MessageFramer(buffer_size)
        initial = _subscription(tlv_types, sources)  # before connecting: a bad value raises with nothing open
        self._selection = protocol.apply_control(protocol.EVERYTHING, initial) if initial else protocol.EVERYTHING
        if isinstance(resume_from, str):
            resume_from = protocol.Position.parse(resume_from)
        self.positioned = positions or resume_from is not None
        if self.positioned:
            initial = (initial or b"") + protocol.positions_message(resume_from)
        self.shared_memory = shared_memory
        if shared_memory:
            initial = (initial or b"") + protocol.shared_memory_message()
        self._initial = initial
        self._position: protocol.Position | None = None
        self.gaps: list[protocol.Gap] = []
        self._mapped: MappedStream | None = None

    @property
    def position(self) -> protocol.Position | None:
        """Where the stream stands after the last message handed out: give it as ``resume_from`` to go on from there."""
        if self._position is _FROM_MAPPING:
            return self._mapped.reader.position if self._mapped is not None else None
        return self._position  # type: ignore[return-value]

    def _segments(self, batch: np.ndarray) -> list[tuple[np.ndarray, protocol.Position | None]]:
        """The runs of data messages in ``batch``, each with the position it starts at; notices taken out.

        ``position`` is left where the batch ends.
        """
        if not self.positioned:
            return [(batch, None)]
        starts = message_offsets(batch)
        notices = np.flatnonzero(batch[starts + protocol.OFF_DOMAIN] == protocol.CONTROL_DOMAIN)
        ends = np.append(starts[1:], len(batch))
        found: list[tuple[np.ndarray, protocol.Position | None]] = []
        at = 0
        for k in [*notices.tolist(), len(starts)]:
            first = starts[k] if k < len(starts) else len(batch)
            if first > at and self._position is not None:  # before the first notice: not this stream's yet
                found.append((batch[at:first], self._position))
                self._advance(batch[at:first], int(np.searchsorted(starts, first) - np.searchsorted(starts, at)))
            if k < len(starts):
                notice = protocol.read_notice(batch[first : ends[k]])
                if isinstance(notice, protocol.Position):
                    self._position = notice
                else:
                    self.gaps.append(notice)
                at = int(ends[k])
        return found

    def _advance(self, data: np.ndarray, messages: int) -> None:
        if self._position is not None:
            epoch, offset, number = self._position
            self._position = protocol.Position(epoch, offset + len(data), number + messages)

    def _views(self, batch: np.ndarray) -> Iterator[MessageView]:
        """Views of a batch's messages; with positions, ``position`` moves past each as it is handed out."""
        segments = self._segments(batch)
        end = self._position
        for data, start in segments:
            if start is None:
                yield from iter_views(data.tobytes())
                continue
            epoch, offset, number = start
            for view in iter_views(data.tobytes()):
                offset += view.size
                number += 1
                self._position = protocol.Position(epoch, offset, number)
                yield view
        self._position = end

    def _data(self, batch: np.ndarray) -> np.ndarray | None:
        """The batch without notices (None if it held nothing else); ``position`` at its end."""
        if not self.positioned:
            return batch
        segments = self._segments(batch)
        if not segments:
            return None
        return segments[0][0] if len(segments) == 1 else np.concatenate([data for data, _ in segments])

    # shared memory

    def _open_mapped(self, sock: socket.socket) -> None:
        """Ask for the mapped log and wait for it (blocking); what the socket carried before it is kept."""
        assert self._initial is not None
        try:
            sock.sendall(self._initial)
            self._mapped = MappedStream.take_grant(
                sock,
                self._framer.feed,
                self.logic,
                self._selection,
                self._framer.capacity,
                self.positioned,
                self.gaps,
            )
        except OSError as exc:
            raise RelayConnectionError(
                f"the {self.domain} relay at {self.socket_path} did not hand over its log: {exc}"
            ) from exc

    def _select(self, message: bytes) -> bytes:
        """Note the subscription ``message`` sets: a reader of the mapped log filters by it itself."""
        self._selection = protocol.apply_control(self._selection, message)
        if self._mapped is not None:
            self._mapped.select(self._selection)
        return message

    def _mapped_next(self) -> np.ndarray | None:
        """The next batch: first the stream's part that came over the socket before the grant, then the mapping."""
        while self._framer.buffered:
            raw = self._framer.maybe_extract_batch()
            if raw is None:
                break
            batch = self._data(raw)
            if batch is not None:
                return batch
        assert self._mapped is not None
        self._position = _FROM_MAPPING  # where the reader is: asked for only when wanted
        return self._mapped.poll()

    def _mapped_views(self, batch: np.ndarray) -> Iterator[MessageView]:
        """A mapped batch's views; unfiltered, ``position`` moves past each as it is handed out."""
        views = list(iter_views(batch.tobytes()))
        kept, end = self._position, self.position
        if end is None or (self._mapped is not None and self._mapped.filtered):
            yield from views
            return
        offset, number = end.offset - len(batch), end.message - len(views)
        for view in views:
            offset += view.size
            number += 1
            self._position = protocol.Position(end.epoch, offset, number)
            yield view
        self._position = kept

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

    Iterating yields a ``MessageView`` per message: a view over the received
    batch that reads like a ``protocol.Message`` (``header``, ``records``,
    ``raw``) and unpacks a field only when it is read (``view.sequence``,
    ``view.timestamp_ns``, ...); ``messages()`` yields decoded
    ``protocol.Message`` objects instead. ``batches()`` yields uint8 arrays
    of whole messages, and ``Subscriber.headers(batch)`` every header of one
    as a structured array of ``protocol.HEADER_DTYPE``, in one call. When the relay closes the connection
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
        positions: bool = False,
        resume_from: protocol.Position | str | None = None,
        shared_memory: bool = False,
    ):
        super().__init__(domain, socket_path, buffer_size, tlv_types, sources, positions, resume_from, shared_memory)
        self._sock: socket.socket | None = _connect(domain, self.socket_path)
        self._timeout: float | None = None
        if self._initial is not None:
            try:
                if shared_memory:
                    self._open_mapped(self._sock)
                else:
                    self._control(self._initial)
            except BaseException:
                self.close()  # the caller never gets the object, so nobody else would close the socket
                raise

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
            raise self._lost(exc) from exc

    def recv_batch(self, timeout: float | None = None) -> np.ndarray | None:
        """The next batch of whole messages, or None if none completed within ``timeout`` seconds.

        Raises ``EOFError`` when the relay has closed the connection between
        messages, ``RelayConnectionError`` when it closed it mid-message.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._mapped is not None:
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
        mapped = self._mapped
        assert mapped is not None
        while True:
            batch = self._mapped_next()
            if batch is not None:
                return batch
            remaining = IDLE_CHECK_SECONDS if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return None
            mapped.wait(remaining)

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

    def __iter__(self) -> Iterator[MessageView]:
        if self._mapped is not None:
            for batch in self.batches():
                yield from self._mapped_views(batch)
            return
        if self.positioned:  # notices come out of the stream, and the position moves past each message
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
                raise self._lost(exc) from exc
            if received == 0:
                ended = self._ended()
                if isinstance(ended, EOFError):
                    return
                raise ended

    def messages(self) -> Iterator[protocol.Message]:
        """Each message decoded into a ``protocol.Message``, for code that wants objects rather than views."""
        for batch in self.batches():
            yield from protocol.decode_messages(batch)

    headers = staticmethod(batch_headers)

    def close(self) -> None:
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
        socket_path: str | Path | None = None,
        *,
        source: int = 0,
        checksum: bool | None = None,
        flush_size: int = DEFAULT_FLUSH_SIZE,
        publish_only: bool = True,
        version: int = protocol.VERSION,
    ):
        super().__init__(domain, socket_path, source, checksum, publish_only, flush_size, version)
        self._writer: asyncio.StreamWriter | None = None
        self._discarding: asyncio.Task[None] | None = None
        self._closed_by_relay = False
        self._scheduled = False
        self._live = False  # connected, and the relay has not closed the connection: publish's one check
        self._call_soon: Callable[..., Any] = _not_connected

    async def connect(self) -> AsyncPublisher:
        if self._writer is None:
            reader, self._writer = await _open(self.domain, self.socket_path, _DISCARD_CHUNK)
            self._writer.transport.set_write_buffer_limits(high=0)
            loop = asyncio.get_running_loop()
            self._call_soon = loop.call_soon
            self._discarding = loop.create_task(self._discard(reader))
            self._live = True
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
        if not self._live:
            await self.connect()
            if self._closed_by_relay:
                raise self._lost()
        # The fast path, inlined (a call costs as much as the rest): one standard record of the length last
        # published, room in the buffer, no checksum (``_one`` is never set then). Anything else: ``_encode``.
        n, total, pack_into = self._one
        start = self._fill
        try:
            tlv_type, value = records[0] if len(records) == 1 else _NOT_ONE  # type: ignore[arg-type,index]
        except TypeError:  # an iterator
            tlv_type, value = _NOT_ONE
        if (
            value.__class__ is bytes
            and len(value) == n
            and 0 < tlv_type < _EXTENDED_TLV
            and start + total <= self._limit
        ):
            if sequence is None:
                sequence = self.next_sequence
            if timestamp_ns is None:
                timestamp_ns = _time_ns()
            pack_into(
                self._buf, start, self._prefix | flags << 56, sequence, timestamp_ns, n + 2, 0, tlv_type, n, value
            )
            self._fill = start + total
            self.next_sequence = sequence + 1
        else:
            sequence = self._encode(records, flags, sequence, timestamp_ns)
        if self._fill >= self.flush_size:
            await self._send(b"")
        elif not self._scheduled:
            self._scheduled = True
            self._call_soon(self._write_out)
        return sequence

    def publish_nowait(
        self,
        records: Iterable[tuple[int, bytes]] = (),
        *,
        flags: int = 0,
        sequence: int | None = None,
        timestamp_ns: int | None = None,
    ) -> int:
        """Build one message into the buffer without awaiting anything; return its sequence number.

        The message goes out with everything else buffered when the event
        loop next turns (as with ``publish``); when ``flush_size`` bytes are
        buffered they are handed to the transport at once, which keeps what
        the kernel does not take yet. Nothing waits here, so a caller that
        publishes without ever awaiting should ``await flush()`` now and then
        (``publish`` does that for it). Needs a connected publisher
        (``async with`` or ``await connect()``).
        """
        if not self._live:
            raise self._not_live()
        # The fast path, inlined (a call costs as much as the rest): one standard record of the length last
        # published, room in the buffer, no checksum (``_one`` is never set then). Anything else: ``_encode``.
        n, total, pack_into = self._one
        start = self._fill
        try:
            tlv_type, value = records[0] if len(records) == 1 else _NOT_ONE  # type: ignore[arg-type,index]
        except TypeError:  # an iterator
            tlv_type, value = _NOT_ONE
        if (
            value.__class__ is bytes
            and len(value) == n
            and 0 < tlv_type < _EXTENDED_TLV
            and start + total <= self._limit
        ):
            if sequence is None:
                sequence = self.next_sequence
            if timestamp_ns is None:
                timestamp_ns = _time_ns()
            pack_into(
                self._buf, start, self._prefix | flags << 56, sequence, timestamp_ns, n + 2, 0, tlv_type, n, value
            )
            self._fill = start + total
            self.next_sequence = sequence + 1
        else:
            sequence = self._encode(records, flags, sequence, timestamp_ns)
        if self._fill >= self.flush_size:
            self._write_out()
        elif not self._scheduled:
            self._scheduled = True
            self._call_soon(self._write_out)
        return sequence

    def _not_live(self) -> Exception:
        if self._closed_by_relay:
            return self._lost()
        if self._call_soon is _not_connected:
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
        if self._writer is not None and not self._closed_by_relay:
            with contextlib.suppress(RelayConnectionError):
                await self._send(b"")
        writer, self._writer = self._writer, None
        discarding, self._discarding = self._discarding, None
        self._live = False
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

    def _write_out(self) -> None:
        """Hand the buffered messages to the transport, as an immutable copy (see the uvloop hazard)."""
        self._scheduled = False
        writer = self._writer
        if self._fill and writer is not None and not writer.transport.is_closing():
            writer.write(self._take())

    async def _send(self, data: Buffer) -> None:
        if self._writer is None:
            await self.connect()
        writer = self._writer
        assert writer is not None
        if self._closed_by_relay or writer.transport.is_closing():
            raise self._lost()
        try:
            self._write_out()
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
        self._live = False


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
        positions: bool = False,
        resume_from: protocol.Position | str | None = None,
        shared_memory: bool = False,
    ):
        super().__init__(domain, socket_path, buffer_size, tlv_types, sources, positions, resume_from, shared_memory)
        self._buffer_size = buffer_size
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._sock: socket.socket | None = None  # with shared memory: the socket beside the mapping

    async def connect(self) -> AsyncSubscriber:
        if self.shared_memory:
            if self._sock is None:
                sock = _connect(self.domain, self.socket_path)
                try:
                    await asyncio.get_running_loop().run_in_executor(None, self._open_mapped, sock)
                except BaseException:
                    sock.close()
                    raise
                self._sock = sock
            return self
        if self._reader is None:
            self._reader, self._writer = await _open(self.domain, self.socket_path, self._buffer_size)
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
        if self.shared_memory:
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
        """As ``Subscriber``'s: the sleep on the log's futex word runs in the loop's executor."""
        loop = asyncio.get_running_loop()
        while True:
            if self._mapped is None:
                raise self._closed()
            batch = self._mapped_next()
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
        if self.shared_memory:
            async for batch in self.batches():
                for view in self._mapped_views(batch):
                    yield view
            return
        if self.positioned:  # as Subscriber's: notices out, the position past each message handed out
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
        return self._each_view()

    async def messages(self) -> AsyncIterator[protocol.Message]:
        """Each message decoded into a ``protocol.Message``, as ``Subscriber.messages``."""
        async for batch in self.batches():
            for message in protocol.decode_messages(batch):
                yield message

    headers = staticmethod(batch_headers)

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._mapped = None
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
