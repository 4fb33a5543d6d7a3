"""The wire encoder every publisher builds its messages with, and its one fast path.

Messages are written straight into one preallocated buffer: the header with a
single ``struct.pack_into`` (its first eight bytes, magic to flags,
precomputed but for the flags), each record's type and length by index and
its value by slice assignment. The CRC is computed only when the domain
verifies it (or the caller asked for it); otherwise the checksum field is 0,
as the relay of a domain that does not verify never reads it. What is
buffered is always whole messages, so whatever is written out, and whatever a
killed process leaves behind, is too.

The commonest message, one standard record of the value length last
published, is written by ``Encoder._append`` with one ``pack_into`` and no
call besides: the blocking publisher's ``publish`` and the asyncio
publisher's ``publish_nowait`` *are* that method, and each publisher says in
``_publish_guarded`` and ``_filled`` what happens around it.
"""

from __future__ import annotations

import enum
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

from jitrelay.client.address import RelayAddress
from jitrelay.client.errors import Endpoint
from jitrelay.core import protocol

_time_ns = time.time_ns
_HEADER_SIZE = protocol.HEADER_SIZE
_MAX_STANDARD = protocol.MAX_STANDARD_VALUE
_MAX_EXTENDED = protocol.MAX_EXTENDED_VALUE
_EXTENDED_TLV = protocol.EXTENDED_TLV
_HEAD = struct.Struct("<QQQII")  # magic..flags as one integer, sequence, timestamp_ns, payload_size, checksum
_EXTENDED = struct.Struct("<BBBH")
_CHECKSUM = struct.Struct("<I")
_HEADROOM = 64 * 1024
DEFAULT_FLUSH_SIZE = 64 * 1024
_NOT_ONE = (-1, None)  # what a records argument that is not one record unpacks to
_NO_LAYOUT = (-1, 0, _HEAD.pack_into)  # no value has length -1: the fast path is never taken
_ONE_RECORD: dict[int, struct.Struct] = {}  # value length -> the layout of a message of one standard record


def _one_record(n: int) -> struct.Struct:
    layout = _ONE_RECORD.get(n)
    if layout is None:
        layout = _ONE_RECORD[n] = struct.Struct(f"<QQQIIBB{n}s")
    return layout


class Link(enum.Enum):
    """Where a publisher's connection stands: only an ``OPEN`` one publishes on the fast path."""

    NEW = "not connected yet"
    OPEN = "open"
    LOCKED = "open, shared with a background writer: publish under its lock"
    LOST = "closed by the relay"
    CLOSED = "closed"


_OPEN = Link.OPEN  # a module global: the fast path's check is one load and one ``is``


class Encoder(Endpoint):
    """What both publishers share: the target, the source id, the sequence counter and the outgoing buffer.

    Raises ``ValueError`` for a source, version or ``flush_size`` out of range.
    """

    kind = "publisher"

    def __init__(
        self,
        domain: str,
        socket_path: str | Path | RelayAddress | None,
        source: int,
        checksum: bool | None,
        publish_only: bool,
        flush_size: int,
        version: int,
    ) -> None:
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
        self._flush_at = 1  # buffered bytes at which _append hands over to _filled
        self._link = Link.OPEN  # what a publisher without a connection yet says otherwise
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

    def _append(
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

        Once ``buffered`` reaches what the publisher's policy says (see the
        publisher's class docstring), the buffer is handed on. With
        ``timeout`` (seconds) it is written out at once, and ``PublishTimeout``
        raised, the message not published, when the relay takes none of it in
        time; ``block=False`` is ``timeout=0``: never wait (Aeron's
        ``BACK_PRESSURED``, pyzmq's ``NOBLOCK``). Raises ``RelayConnectionError`` when
        the connection is closed or lost for good (and the asyncio
        publisher's ``RuntimeError`` before it is connected), ``ValueError``
        for a record value too long for the wire.
        """
        if self._link is not _OPEN or timeout is not None or block is not True:
            return self._publish_guarded(records, flags, sequence, timestamp_ns, timeout if block else 0.0)
        # The fast path (a call costs as much as the rest): one standard record of the length last published,
        # room in the buffer, no checksum (``_one`` is never set then). Anything else: ``_encode``.
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
        if self._fill >= self._flush_at:  # 0 once closed, so that _filled raises
            self._filled()
        return sequence

    def _publish_guarded(
        self,
        records: Iterable[tuple[int, bytes]],
        flags: int,
        sequence: int | None,
        timestamp_ns: int | None,
        timeout: float | None,
    ) -> int:
        """``_append`` when the link is not ``OPEN`` or a timeout is given: the publisher's own way."""
        raise NotImplementedError

    def _filled(self) -> None:
        """What ``_append`` does once ``_flush_at`` bytes are buffered: write out, or schedule it."""
        raise NotImplementedError

    def _encode(
        self, records: Iterable[tuple[int, bytes]], flags: int, sequence: int | None, timestamp_ns: int | None
    ) -> int:
        """Append one message to the buffer and return its sequence number.

        Every shape of message; ``_append`` inlines its commonest case (see
        ``_one``) and comes here for the rest, and for the first message of
        each value length.
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
            # kept for _append's fast path).
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
