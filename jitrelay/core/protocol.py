"""Protocol V2: wire constants, the header layout, a message builder and a decoder.

Pure: no I/O, no compiled code. The relay's hot path lives in ``kernels``; this
module is the readable statement of the wire format that tools, clients and
tests build on. All integers are little-endian.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypedDict

import numpy as np

from jitrelay.core import tlv_types

if TYPE_CHECKING:
    from typing import Unpack  # Python 3.11; annotations are not evaluated at run time

MAGIC = 0xDEADBEEF
MAGIC_BYTES = b"\xef\xbe\xad\xde"
# The version jitrelay's own encoders write, and the versions a relay accepts unless told otherwise: Torq's
# services write 1 (``PROTOCOL_VERSION`` in Torq's ``libs/types/src/protocol/constants.rs``); 1 and 2 share
# one layout.
VERSION = 2
VERSIONS = (1, 2)
HEADER_SIZE = 32
CHECKSUM_COVERED = 28  # header bytes 0..27 precede the payload in the CRC

# Header field offsets, for code that reads single fields out of a buffer.
OFF_MAGIC = 0
OFF_DOMAIN = 4
OFF_VERSION = 5
OFF_SOURCE = 6
OFF_FLAGS = 7
OFF_SEQUENCE = 8
OFF_TIMESTAMP = 16
OFF_PAYLOAD_SIZE = 24
OFF_CHECKSUM = 28

HEADER_DTYPE = np.dtype(
    [
        ("magic", "<u4"),
        ("relay_domain", "u1"),
        ("version", "u1"),
        ("source", "u1"),
        ("flags", "u1"),
        ("sequence", "<u8"),
        ("timestamp_ns", "<u8"),
        ("payload_size", "<u4"),
        ("checksum", "<u4"),
    ]
)
assert HEADER_DTYPE.itemsize == HEADER_SIZE
HEADER_FIELDS: tuple[str, ...] = tuple(HEADER_DTYPE.fields or ())  # the header's field names, in order

HEADER_STRUCT = struct.Struct("<IBBBBQQII")  # the fields of HEADER_DTYPE, in order
assert HEADER_STRUCT.size == HEADER_SIZE
# Single fields, for code that reads one or two out of a buffer at their offsets (OFF_*).
MAGIC_FIELD = struct.Struct("<I")  # at OFF_MAGIC
SEQUENCE_FIELD = struct.Struct("<Q")  # at OFF_SEQUENCE
SEQUENCE_TIMESTAMP_FIELDS = struct.Struct("<QQ")  # at OFF_SEQUENCE: sequence, then timestamp_ns
assert OFF_SEQUENCE + SEQUENCE_FIELD.size == OFF_TIMESTAMP

# Relay domains (header byte 4).
MARKET_DATA = 1
SIGNAL = 2
EXECUTION = 3
SYSTEM = 4
DOMAIN_NAMES = {MARKET_DATA: "market_data", SIGNAL: "signal", EXECUTION: "execution", SYSTEM: "system"}
DOMAIN_IDS = {name: ident for ident, name in DOMAIN_NAMES.items()}
# The relay's own control records and notices (subscriptions, positions, shared memory) travel in a
# domain Torq never writes, so that no Torq message, of any domain or type, reads as one (docs/protocol.md).
# Messages of this domain pass only between a client and its relay: never forwarded, never journaled.
CONTROL_DOMAIN = 255

# TLV types each domain carries, as inclusive ranges: the ranges Torq's codec routes by
# (``RelayDomain::from_tlv_type`` in Torq's ``libs/codec/src/protocol/relay_domain.rs``).
DOMAIN_TLV_RANGES: dict[int, tuple[tuple[int, int], ...]] = {
    MARKET_DATA: ((1, 19),),
    SIGNAL: ((20, 39), (60, 79)),
    EXECUTION: ((40, 59),),
    SYSTEM: ((80, 119),),
}
# Vendor types, accepted in every domain unless a relay is told not to (``VendorTLVBuilder`` in Torq's
# ``libs/codec/src/builder.rs``).
VENDOR_TLV_RANGE = (200, 254)

# Checksum policies (``RelayLogic.checksum``), as the kernels take them.
CHECKSUM_OFF = 0  # not verified: speed first
CHECKSUM_IF_SET = 1  # zero means "not computed" and passes; any other value must match
CHECKSUM_REQUIRED = 2  # must match: zero is a bad checksum
CHECKSUM_POLICIES = {"off": CHECKSUM_OFF, "if_set": CHECKSUM_IF_SET, "required": CHECKSUM_REQUIRED}

# Names of the TLV types tools print: Torq's registry (``tlv_types``); a type missing there is printed as
# ``type<N>``.
TLV_TYPE_NAMES = tlv_types.TLV_TYPE_NAMES

EXTENDED_TLV = 255
MAX_STANDARD_VALUE = 255
MAX_EXTENDED_VALUE = 65535

# Verdicts the relay gives a complete message. 0 forwards; the rest are the
# per-message rejects of PROTOCOL.md, in the order they are checked.
FORWARD = 0
BAD_VERSION = 1
WRONG_DOMAIN = 2
MALFORMED_TLV = 3
TLV_OUT_OF_RANGE = 4
BAD_CHECKSUM = 5
# A well-formed control message (``CONTROL_DOMAIN``): consumed by the relay, never forwarded.
CONTROL = 6
VERDICT_NAMES = (
    "forward",
    "bad_version",
    "wrong_domain",
    "malformed_tlv",
    "tlv_out_of_range",
    "bad_checksum",
    "control",
)
REJECT_NAMES = VERDICT_NAMES[BAD_VERSION : BAD_CHECKSUM + 1]

# Control records a client sends in a ``CONTROL_DOMAIN`` message to choose what it
# receives. Bitmaps are 32 bytes: bit ``i % 8`` of byte ``i // 8`` stands for value ``i``.
SUBSCRIBE_TLV_TYPES = 100
SUBSCRIBE_SOURCES = 101
UNSUBSCRIBE = 102
# Empty value: the sender only publishes, so the relay sends it nothing (it never reads, and is never slow).
PUBLISH_ONLY = 103
BITMAP_SIZE = 32
# Empty value: tell me where I am in the relay's stream. A position as value (epoch, offset, message,
# ``POSITION_SIZE`` bytes): send me what follows it. Either way the relay then puts notices in the stream.
POSITIONS = 104
POSITION_SIZE = 24
# Empty value: map the relay's log and read it from shared memory (docs/protocol.md, "Shared memory").
SHARED_MEMORY = 105
# A shared-memory reader's report that the relay lapped it: the offset it was at, messages and bytes it missed.
LAPPED = 106
LAPPED_SIZE = 24

# Notices a relay puts in the stream of a subscriber that asked for positions (``CONTROL_DOMAIN``, never
# forwarded from anyone): where the next message is, and what it missed.
POSITION_NOTICE = 110  # value: the position of the next message
GAP_NOTICE = 111  # value: reason (1 byte), then messages and bytes missed (8 bytes each)
GAP_SIZE = 17
GAP_LEFT_LOG = 1  # the subscriber fell out of the log, or asked for a position that had left it
GAP_UNKNOWN_EPOCH = 2  # it asked for a position of another relay process: how much it missed is not known
UNKNOWN = (1 << 64) - 1  # a gap's count when it cannot be known
# The relay's answer to SHARED_MEMORY, sent with the log's and the reader slots' descriptors (SCM_RIGHTS):
# the epoch, where the mapping takes over the stream (offset, message number), the reader's slot.
SHARED_LOG_NOTICE = 112
SHARED_LOG_SIZE = 32

# Stream-fatal faults: the connection cannot be trusted past them.
NO_FAULT = 0
BAD_MAGIC = 1
OVERSIZE = 2
FAULT_NAMES = ("none", "bad_magic", "oversize")


class ProtocolError(ValueError):
    """Bytes that do not follow Protocol V2."""


@dataclass(frozen=True)
class Header:
    """The 32-byte header's fields, decoded: what tools print and tests compare."""

    magic: int
    relay_domain: int
    version: int
    source: int
    flags: int
    sequence: int
    timestamp_ns: int
    payload_size: int
    checksum: int

    @classmethod
    def unpack(cls, data: bytes | memoryview, offset: int = 0) -> Header:
        """The header at ``offset`` of ``data``; ``struct.error`` when fewer than 32 bytes are there."""
        return cls(*HEADER_STRUCT.unpack_from(data, offset))


@dataclass(frozen=True)
class Message:
    """One decoded message: its header, its records and its exact bytes."""

    header: Header
    records: tuple[tuple[int, bytes], ...]
    raw: bytes

    @property
    def checksum_ok(self) -> bool:
        return message_checksum(self.raw) == self.header.checksum


def encode_record(tlv_type: int, value: bytes, extended: bool | None = None) -> bytes:
    """One TLV record; extended form when asked, or when the value needs it."""
    if not 0 <= tlv_type <= 255:
        raise ValueError(f"TLV type {tlv_type} is not a byte")
    if extended is None:
        extended = len(value) > MAX_STANDARD_VALUE or tlv_type == EXTENDED_TLV
    if extended:
        if len(value) > MAX_EXTENDED_VALUE:
            raise ValueError(f"TLV value of {len(value)} bytes exceeds {MAX_EXTENDED_VALUE}")
        return bytes((EXTENDED_TLV, 0, tlv_type)) + struct.pack("<H", len(value)) + value
    if len(value) > MAX_STANDARD_VALUE:
        raise ValueError(f"TLV value of {len(value)} bytes needs an extended record")
    return bytes((tlv_type, len(value))) + value


def encode_records(records: Iterable[tuple[int, bytes]]) -> bytes:
    """Records back to back, each standard or extended as its value needs (``encode_record``)."""
    return b"".join(encode_record(t, bytes(v)) for t, v in records)


def message_checksum(message: bytes | memoryview) -> int:
    """CRC-32 of header bytes 0..27 followed by the payload."""
    view = memoryview(message)
    return zlib.crc32(view[HEADER_SIZE:], zlib.crc32(view[:CHECKSUM_COVERED]))


def build_message(
    domain: int,
    records: Iterable[tuple[int, bytes]] = (),
    *,
    source: int = 0,
    flags: int = 0,
    sequence: int = 0,
    timestamp_ns: int | None = None,
    payload: bytes | None = None,
    version: int = VERSION,
    magic: int = MAGIC,
    checksum: int | None = None,
) -> bytes:
    """A complete message, CRC-32 filled in.

    ``payload`` replaces ``records`` with raw bytes and ``checksum``/``version``/
    ``magic`` override the computed fields, so tests and fuzzers can build
    messages the relay must reject.
    """
    body = encode_records(records) if payload is None else bytes(payload)
    if timestamp_ns is None:
        timestamp_ns = time.time_ns()
    head = HEADER_STRUCT.pack(magic, domain, version, source, flags, sequence, timestamp_ns, len(body), 0)
    if checksum is None:
        checksum = zlib.crc32(body, zlib.crc32(head[:CHECKSUM_COVERED]))
    return head[:CHECKSUM_COVERED] + struct.pack("<I", checksum) + body


class BatchOptions(TypedDict, total=False):
    """The header fields a synthetic batch may set, as ``build_batch`` and ``build_cycled_batch`` take them."""

    source: int  # 0 unless given
    flags: int  # 0
    first_sequence: int  # 0: message k gets first_sequence + k
    timestamp_ns: int | None  # the current time
    checksums: bool  # True: each message's CRC-32 filled in


def build_batch(
    domain: int, count: int, records: Sequence[tuple[int, bytes]], **options: Unpack[BatchOptions]
) -> np.ndarray:
    """``count`` messages with the same records and consecutive sequence numbers.

    Returns one uint8 array of ``count * message_size`` bytes, ready to send in
    one write. Headers are filled with vectorised numpy; checksums (one
    ``zlib.crc32`` per message) can be skipped for domains that do not verify
    them, or filled later by ``kernels.stamp_batch``.
    """
    return build_cycled_batch(domain, count, [records], **options)


def build_cycled_batch(
    domain: int,
    count: int,
    record_sets: Sequence[Sequence[tuple[int, bytes]]],
    *,
    source: int = 0,
    flags: int = 0,
    first_sequence: int = 0,
    timestamp_ns: int | None = None,
    checksums: bool = True,
) -> np.ndarray:
    """``build_batch`` whose message ``k`` carries ``record_sets[k % len(record_sets)]``: a stream for filters.

    Every set must make messages of one size, so the batch can still be
    restamped in place (``kernels.stamp_batch``).
    """
    templates = [
        np.frombuffer(build_message(domain, recs, source=source, flags=flags, timestamp_ns=0), dtype=np.uint8)
        for recs in record_sets
    ]
    if len({template.size for template in templates}) != 1:
        raise ValueError("every record set must make messages of the same size")
    size = templates[0].size
    batch = np.stack(templates)[np.arange(count) % len(templates)]
    headers = batch[:, :HEADER_SIZE].copy().view(HEADER_DTYPE).reshape(count)
    headers["sequence"] = np.arange(first_sequence, first_sequence + count, dtype=np.uint64)
    headers["timestamp_ns"] = time.time_ns() if timestamp_ns is None else timestamp_ns
    headers["checksum"] = 0
    batch[:, :HEADER_SIZE] = headers.view(np.uint8).reshape(count, HEADER_SIZE)
    if checksums:
        flat = batch.reshape(-1).data
        crcs = headers["checksum"]
        for i in range(count):
            crcs[i] = message_checksum(flat[i * size : (i + 1) * size])
        batch[:, OFF_CHECKSUM:HEADER_SIZE] = crcs.astype("<u4").view(np.uint8).reshape(count, 4)
    return batch.reshape(-1)


def bitmap(values: Iterable[int]) -> bytes:
    """The 32-byte bitmap of a set of byte values."""
    bits = bytearray(BITMAP_SIZE)
    for value in values:
        if not 0 <= value <= 255:
            raise ValueError(f"{value} is not a byte value (0..255)")
        bits[value >> 3] |= 1 << (value & 7)
    return bytes(bits)


def bitmap_values(bits: bytes) -> frozenset[int]:
    """The set of byte values a 32-byte bitmap holds."""
    if len(bits) != BITMAP_SIZE:
        raise ValueError(f"a bitmap has {BITMAP_SIZE} bytes, not {len(bits)}")
    return frozenset(i for i in range(256) if bits[i >> 3] >> (i & 7) & 1)


def subscribe_message(
    tlv_types: Iterable[int] | None = None, sources: Iterable[int] | None = None, *, source: int = 0
) -> bytes:
    """A control message that sets the sender's TLV type set, source set, or both.

    A set left as None keeps its current state at the relay; an empty set
    receives nothing.
    """
    records = []
    if tlv_types is not None:
        records.append((SUBSCRIBE_TLV_TYPES, bitmap(tlv_types)))
    if sources is not None:
        records.append((SUBSCRIBE_SOURCES, bitmap(sources)))
    if not records:
        raise ValueError("a subscription needs tlv_types, sources, or both")
    return build_message(CONTROL_DOMAIN, records, source=source)


def unsubscribe_message(*, source: int = 0) -> bytes:
    """A control message that returns the sender to receiving the whole domain."""
    return build_message(CONTROL_DOMAIN, [(UNSUBSCRIBE, b"")], source=source)


def publish_only_message(*, source: int = 0) -> bytes:
    """A control message declaring that the sender only publishes: the relay stops sending it anything."""
    return build_message(CONTROL_DOMAIN, [(PUBLISH_ONLY, b"")], source=source)


class Position(NamedTuple):
    """Where a message is in one relay process's stream: its epoch, the stream offset and number of the message."""

    epoch: int
    offset: int
    message: int

    def encode(self) -> bytes:
        """The 24 bytes a ``POSITIONS`` record or a ``POSITION`` notice carries."""
        return _POSITION.pack(self.epoch, self.offset, self.message)

    @classmethod
    def decode(cls, value: bytes | memoryview) -> Position:
        """A position from its 24 bytes; ``struct.error`` for any other length."""
        return cls(*_POSITION.unpack(bytes(value)))

    def __str__(self) -> str:
        return f"{self.epoch:x}:{self.offset}:{self.message}"

    @classmethod
    def parse(cls, text: str) -> Position:
        """``EPOCH:OFFSET:MESSAGE`` (epoch in hex), as ``str`` writes it."""
        try:
            epoch, offset, message = text.split(":")
            return cls(int(epoch, 16), int(offset), int(message))
        except ValueError:
            raise ValueError(f"not a position: {text!r} (EPOCH:OFFSET:MESSAGE, as a subscriber reports it)") from None


class Gap(NamedTuple):
    """What a gap notice says: why, and how many messages and bytes the subscriber missed (``UNKNOWN`` if unknown)."""

    reason: int
    messages: int
    bytes: int


class SharedLog(NamedTuple):
    """What a shared-log notice says: where the mapping takes the stream over, and the reader's slot in it."""

    epoch: int
    offset: int
    message: int
    slot: int

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.offset, self.message)


class Lapped(NamedTuple):
    """A shared-memory reader's report: the offset the relay lapped it at, and what it missed there."""

    offset: int
    messages: int
    bytes: int


_POSITION = struct.Struct("<QQQ")
_GAP = struct.Struct("<BQQ")
_SHARED_LOG = struct.Struct("<QQQQ")
_LAPPED = struct.Struct("<QQQ")


def positions_message(resume_from: Position | None = None, *, source: int = 0) -> bytes:
    """A control message asking for position notices, and to start after ``resume_from`` when given."""
    return build_message(
        CONTROL_DOMAIN, [(POSITIONS, b"" if resume_from is None else resume_from.encode())], source=source
    )


def position_notice(position: Position) -> bytes:
    """The notice a relay sends a positioned subscriber: where the next message is."""
    return build_message(CONTROL_DOMAIN, [(POSITION_NOTICE, position.encode())], timestamp_ns=time.time_ns())


def gap_notice(gap: Gap) -> bytes:
    """The notice a relay sends a positioned subscriber: what it missed, and why."""
    return build_message(CONTROL_DOMAIN, [(GAP_NOTICE, _GAP.pack(*gap))], timestamp_ns=time.time_ns())


def shared_memory_message(*, source: int = 0) -> bytes:
    """A control message asking to read the relay's log from shared memory instead of the socket."""
    return build_message(CONTROL_DOMAIN, [(SHARED_MEMORY, b"")], source=source)


def shared_log_notice(grant: SharedLog) -> bytes:
    """The relay's grant of its mapped log, sent with the two descriptors."""
    return build_message(CONTROL_DOMAIN, [(SHARED_LOG_NOTICE, _SHARED_LOG.pack(*grant))], timestamp_ns=time.time_ns())


def lapped_message(report: Lapped, *, source: int = 0) -> bytes:
    """A shared-memory reader's control message: the relay overwrote what it had yet to read."""
    return build_message(CONTROL_DOMAIN, [(LAPPED, _LAPPED.pack(*report))], source=source)


def read_notice(message: bytes | memoryview) -> Position | Gap | SharedLog:
    """The position, gap or shared log a relay's notice carries; ``ProtocolError`` for anything else."""
    for tlv_type, value in iter_records(memoryview(message)[HEADER_SIZE:]):
        if tlv_type == POSITION_NOTICE and len(value) == POSITION_SIZE:
            return Position.decode(value)
        if tlv_type == GAP_NOTICE and len(value) == GAP_SIZE:
            return Gap(*_GAP.unpack(bytes(value)))
        if tlv_type == SHARED_LOG_NOTICE and len(value) == SHARED_LOG_SIZE:
            return SharedLog(*_SHARED_LOG.unpack(bytes(value)))
    raise ProtocolError("a control-domain message in the stream that is not a position, gap or shared-log notice")


def requests_shared_memory(message: bytes | memoryview) -> bool:
    """Whether a well-formed control message holds a ``SHARED_MEMORY`` record."""
    return any(tlv_type == SHARED_MEMORY for tlv_type, _ in iter_records(memoryview(message)[HEADER_SIZE:]))


def lapped_report(message: bytes | memoryview) -> Lapped | None:
    """The ``LAPPED`` report a well-formed control message holds, if any."""
    for tlv_type, value in iter_records(memoryview(message)[HEADER_SIZE:]):
        if tlv_type == LAPPED:
            return Lapped(*_LAPPED.unpack(bytes(value)))
    return None


def requested_position(message: bytes | memoryview) -> Position | None | bool:
    """What a well-formed control message asks of positions: False (nothing), True (notices), or a resume position."""
    asked: Position | None | bool = False
    for tlv_type, value in iter_records(memoryview(message)[HEADER_SIZE:]):
        if tlv_type == POSITIONS:
            asked = Position.decode(value) if len(value) else True
    return asked


Filter = tuple[frozenset[int] | None, frozenset[int] | None]  # (TLV types, sources); None: any
EVERYTHING: Filter = (None, None)


def apply_control(current: Filter, message: bytes | memoryview) -> Filter:
    """The filter a connection has after a well-formed control message, its records applied in order."""
    tlv_types, sources = current
    for tlv_type, value in iter_records(memoryview(message)[HEADER_SIZE:]):
        if tlv_type == SUBSCRIBE_TLV_TYPES:
            tlv_types = bitmap_values(value)
        elif tlv_type == SUBSCRIBE_SOURCES:
            sources = bitmap_values(value)
        elif tlv_type == UNSUBSCRIBE:
            tlv_types = sources = None
        elif tlv_type not in (PUBLISH_ONLY, POSITIONS, SHARED_MEMORY, LAPPED):  # none changes the filter
            raise ProtocolError(f"record type {tlv_type} is not a control record")
    return tlv_types, sources


def declares_publish_only(message: bytes | memoryview) -> bool:
    """Whether a well-formed control message holds a ``PUBLISH_ONLY`` record."""
    return any(tlv_type == PUBLISH_ONLY for tlv_type, _ in iter_records(memoryview(message)[HEADER_SIZE:]))


def describe_filter(selection: Filter) -> str:
    """``types 1,2; sources any``: a filter as an operator reads it."""

    def listed(values: frozenset[int] | None) -> str:
        if values is None:
            return "any"
        return ",".join(map(str, sorted(values))) or "none"

    return f"types {listed(selection[0])}; sources {listed(selection[1])}"


def iter_records(payload: bytes | memoryview) -> Iterator[tuple[int, bytes]]:
    """Yield (type, value) for each record; raise ProtocolError if they do not fill the payload."""
    data = bytes(payload)
    pos, end = 0, len(data)
    while pos < end:
        tlv_type = data[pos]
        if tlv_type == EXTENDED_TLV:
            if pos + 5 > end or data[pos + 1] != 0:
                raise ProtocolError(f"truncated or invalid extended record at payload offset {pos}")
            tlv_type = data[pos + 2]
            length = data[pos + 3] | (data[pos + 4] << 8)
            pos += 5
        else:
            if pos + 2 > end:
                raise ProtocolError(f"truncated record at payload offset {pos}")
            length = data[pos + 1]
            pos += 2
        if tlv_type == 0:
            raise ProtocolError("record of type 0")
        if pos + length > end:
            raise ProtocolError(f"record value overruns the payload at offset {pos}")
        yield tlv_type, data[pos : pos + length]
        pos += length


def decode_message(data: bytes | memoryview, offset: int = 0) -> tuple[Message, int]:
    """Decode the message at ``offset``; return it and the offset just past it."""
    view = memoryview(data)
    if len(view) - offset < HEADER_SIZE:
        raise ProtocolError("incomplete header")
    header = Header.unpack(view, offset)
    if header.magic != MAGIC:
        raise ProtocolError(f"bad magic 0x{header.magic:08x} at offset {offset}")
    end = offset + HEADER_SIZE + header.payload_size
    if end > len(view):
        raise ProtocolError("incomplete payload")
    raw = bytes(view[offset:end])
    return Message(header, tuple(iter_records(raw[HEADER_SIZE:])), raw), end


def decode_messages(data: bytes | memoryview) -> Iterator[Message]:
    """Decode back-to-back messages that fill ``data`` exactly."""
    offset, end = 0, len(data)
    while offset < end:
        message, offset = decode_message(data, offset)
        yield message


_MIN_SIZE = HEADER_SIZE + 2
_STANDARD_MAX = HEADER_SIZE + 2 + MAX_STANDARD_VALUE
_EXTENDED_MIN = HEADER_SIZE + 5 + MAX_STANDARD_VALUE + 1
_MAX_SIZE = HEADER_SIZE + 5 + MAX_EXTENDED_VALUE


def synthetic_record(domain_id: int, size: int) -> tuple[int, bytes]:
    """The one record of the domain's first TLV type that makes a message of exactly ``size`` bytes.

    A value up to 255 bytes takes a standard record (2 bytes of type and
    length), a longer one an extended record (5 bytes), so 290..292 bytes
    cannot be made: 255 bytes of value is the most a standard record holds
    and 256 the least an extended one is used for.
    """
    value_len = size - HEADER_SIZE - 2
    if value_len > MAX_STANDARD_VALUE:
        value_len = size - HEADER_SIZE - 5
        if value_len <= MAX_STANDARD_VALUE:
            value_len = -1
    if not 0 <= value_len <= MAX_EXTENDED_VALUE:
        raise ValueError(
            f"cannot make a {size}-byte message of one record: sizes run from {_MIN_SIZE} to {_STANDARD_MAX} "
            f"(standard record) and from {_EXTENDED_MIN} to {_MAX_SIZE} (extended record)"
        )
    tlv_type = DOMAIN_TLV_RANGES[domain_id][0][0]
    return tlv_type, (np.arange(value_len) % 251).astype(np.uint8).tobytes()
