"""Reading received messages where they lie: lightweight views, and every header of a batch at once.

A subscriber receives whole messages in batches. Decoding each into a
``protocol.Message`` (a header object, a tuple of records, a copy of the
bytes) costs more than most consumers need per message, who read a sequence
number or a timestamp and pass on. So a batch is read in place:

- ``iter_views(data)`` yields one ``MessageView`` per message: where it lies
  in the batch's bytes, its sequence and timestamp; any other field is
  unpacked when it is read, records are decoded only when ``records`` is
  asked for.
- ``batch_headers(data)`` returns every header of the batch as one numpy
  structured array of ``protocol.HEADER_DTYPE``, for consumers that work on
  columns (all sequences, all timestamps) rather than messages.

Both expect ``data`` to hold whole messages back to back (what the client's
framer hands out) and do not validate beyond what they read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from itertools import repeat

import numpy as np

from jitrelay.core.protocol import (
    HEADER_DTYPE,
    HEADER_SIZE,
    OFF_DOMAIN,
    OFF_FLAGS,
    OFF_PAYLOAD_SIZE,
    OFF_SEQUENCE,
    OFF_SOURCE,
    OFF_TIMESTAMP,
    OFF_VERSION,
    Header,
    Message,
    iter_records,
    message_checksum,
)

_SIZE = struct.Struct("<I")  # payload_size, at OFF_PAYLOAD_SIZE
_SEQUENCE_TIMESTAMP = struct.Struct("<QQ")  # at OFF_SEQUENCE
_FIELDS = struct.Struct("<QQI")  # sequence, timestamp_ns, payload_size, at OFF_SEQUENCE
_U4, _U8 = np.dtype("<u4"), np.dtype("<u8")
_HEADER_BYTES = np.arange(HEADER_SIZE)
COLUMNS_FROM = 32  # messages in a batch from which iter_views reads its header fields as numpy columns

__all__ = ["MessageView", "batch_headers", "iter_views", "message_offsets"]


def _header_byte(offset: int) -> property:
    """A one-byte header field of a ``MessageView``'s message, read where it lies when asked for."""
    return property(lambda view: view._data[view._offset + offset])


class MessageView:
    """One message inside a received batch: header fields and records decoded when read.

    Reads like a ``protocol.Message`` (``header``, ``records``, ``raw``,
    ``checksum_ok``) and adds the header fields as attributes of their own.
    ``sequence`` and ``timestamp_ns``, what consumers read most, are plain
    attributes, filled in when the view is made (a whole batch's at once,
    with numpy, when its messages are of one size); the others are unpacked
    when read (``view.header`` unpacks all nine fields). ``decode()`` gives
    the ``protocol.Message``. The view holds a reference to its batch, so
    keeping views keeps the batch.
    """

    __slots__ = ("_data", "_offset", "_end", "sequence", "timestamp_ns")

    sequence: int
    timestamp_ns: int

    def __init__(self, data: bytes, offset: int, end: int, sequence: int | None = None, timestamp_ns: int = 0):
        self._data = data
        self._offset = offset
        self._end = end
        if sequence is None:
            sequence, timestamp_ns = _SEQUENCE_TIMESTAMP.unpack_from(data, offset + OFF_SEQUENCE)
        self.sequence = sequence
        self.timestamp_ns = timestamp_ns

    @property
    def size(self) -> int:
        """The message's length in bytes, header included."""
        return self._end - self._offset

    relay_domain = _header_byte(OFF_DOMAIN)
    version = _header_byte(OFF_VERSION)
    source = _header_byte(OFF_SOURCE)
    flags = _header_byte(OFF_FLAGS)

    @property
    def payload_size(self) -> int:
        return self._end - self._offset - HEADER_SIZE

    @property
    def checksum(self) -> int:
        return _SIZE.unpack_from(self._data, self._offset + 28)[0]

    @property
    def header(self) -> Header:
        return Header.unpack(self._data, self._offset)

    @property
    def payload(self) -> memoryview:
        """The TLV bytes, without a copy."""
        return memoryview(self._data)[self._offset + HEADER_SIZE : self._end]

    @property
    def records(self) -> tuple[tuple[int, bytes], ...]:
        return tuple(iter_records(self.payload))

    @property
    def raw(self) -> bytes:
        """The message's exact bytes (a copy)."""
        return bytes(self._data[self._offset : self._end])

    @property
    def checksum_ok(self) -> bool:
        return message_checksum(memoryview(self._data)[self._offset : self._end]) == self.checksum

    def decode(self) -> Message:
        """The decoded ``protocol.Message``, as ``protocol.decode_messages`` gives it."""
        return Message(self.header, self.records, self.raw)

    def __len__(self) -> int:
        return self._end - self._offset

    def __repr__(self) -> str:
        return f"MessageView(sequence={self.sequence}, source={self.source}, size={len(self)})"


def iter_views(data: bytes) -> Iterator[MessageView]:
    """A ``MessageView`` for each of the back-to-back messages that fill ``data``.

    A batch of at least ``COLUMNS_FROM`` messages of one size (market data
    usually is) has its sequences and timestamps read as two numpy columns
    and its views made by ``map``, without a Python step per message beyond
    the view itself; any other walks the headers, one ``unpack_from`` per
    message (numpy's per-call cost would outweigh it for a handful).
    """
    total = len(data)
    if total >= COLUMNS_FROM * HEADER_SIZE:
        size = HEADER_SIZE + _SIZE.unpack_from(data, OFF_PAYLOAD_SIZE)[0]
        count, rest = divmod(total, size)
        if not rest and count >= COLUMNS_FROM:
            sizes = np.ndarray((count,), _U4, data, OFF_PAYLOAD_SIZE, (size,))
            if (sizes == size - HEADER_SIZE).all():
                sequences = np.ndarray((count,), _U8, data, OFF_SEQUENCE, (size,)).tolist()
                stamps = np.ndarray((count,), _U8, data, OFF_TIMESTAMP, (size,)).tolist()
                starts = range(0, total, size)
                return map(MessageView, repeat(data, count), starts, range(size, total + size, size), sequences, stamps)
    return _walk(data)


def _walk(data: bytes) -> Iterator[MessageView]:
    unpack = _FIELDS.unpack_from
    offset, end = 0, len(data)
    while offset < end:
        sequence, stamp, payload_size = unpack(data, offset + OFF_SEQUENCE)
        stop = offset + HEADER_SIZE + payload_size
        yield MessageView(data, offset, stop, sequence, stamp)
        offset = stop


def message_offsets(data: bytes | np.ndarray) -> np.ndarray:
    """Where each message of ``data`` starts (int64).

    A batch of one message size (market data usually is) is recognised with
    numpy alone; any other walks the headers, one small step per message.
    """
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    total = len(raw)
    if total < HEADER_SIZE:
        return np.zeros(0, dtype=np.int64)
    size = HEADER_SIZE + int(raw[OFF_PAYLOAD_SIZE : OFF_PAYLOAD_SIZE + 4].view("<u4")[0])
    if total % size == 0:
        starts = np.arange(0, total, size, dtype=np.int64)
        sizes = raw[(starts[:, None] + OFF_PAYLOAD_SIZE + np.arange(4))].reshape(-1).view("<u4")
        if np.all(sizes == size - HEADER_SIZE):
            return starts
    buf = raw.tobytes() if not isinstance(data, bytes) else data
    found = []
    offset = 0
    unpack = _SIZE.unpack_from
    while offset < total:
        found.append(offset)
        offset += HEADER_SIZE + unpack(buf, offset + OFF_PAYLOAD_SIZE)[0]
    return np.asarray(found, dtype=np.int64)


def batch_headers(data: bytes | np.ndarray) -> np.ndarray:
    """Every header of a batch of whole messages, as one structured array of ``protocol.HEADER_DTYPE``.

    A copy: the array stays valid whatever happens to ``data``.
    """
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    starts = message_offsets(data)
    return raw[starts[:, None] + _HEADER_BYTES].view(HEADER_DTYPE).reshape(-1)
