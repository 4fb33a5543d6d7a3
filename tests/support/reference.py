"""A plain-Python statement of Protocol V2, written from PROTOCOL.md alone.

The kernel tests compare ``jitrelay.kernels`` against this module, so it must
not share code with the project: it encodes with ``struct`` and checks with
``zlib.crc32``, and takes only the verdict and fault codes from
``jitrelay.protocol`` (they are names, not behaviour). It favours being
obviously right over being fast.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from jitrelay.core.protocol import (
    BAD_CHECKSUM,
    BAD_MAGIC,
    BAD_VERSION,
    CONTROL,
    FORWARD,
    MALFORMED_TLV,
    NO_FAULT,
    OVERSIZE,
    TLV_OUT_OF_RANGE,
    WRONG_DOMAIN,
)

MAGIC_WIRE = b"\xef\xbe\xad\xde"
SYSTEM = 4
# docs/protocol.md: jitrelay's control records travel in header domain 255 with version 2, whatever the
# relay's accepted data versions; they are never read from any other domain.
CONTROL_DOMAIN = 255
CONTROL_VERSION = 2
# The control records and the value lengths each may have (docs/protocol.md).
CONTROL_RECORDS = {100: (32,), 101: (32,), 102: (0,), 103: (0,), 104: (0, 24), 105: (0,), 106: (24,)}
PUBLISH_ONLY = 103
SUBSCRIPTION_RECORDS = (100, 101, 102)  # the ones that change what a subscriber receives
HEADER = 32
# PROTOCOL.md's reason names by verdict code; 6, a consumed control message, is docs/protocol.md's.
VERDICTS = ("forward", "bad_version", "wrong_domain", "malformed_tlv", "tlv_out_of_range", "bad_checksum", "control")
VERSION = 2  # what the reference encodes unless told
VERSIONS = (1, 2)  # PROTOCOL.md's default accepted set
VENDOR = (200, 254)  # accepted in every domain
_HEADER = struct.Struct("<4sBBBBQQII")

Ranges = Sequence[tuple[int, int]]
Judged = tuple[int, int, int]  # (offset, length, verdict)


class Domain(NamedTuple):
    ident: int
    ranges: tuple[tuple[int, int], ...]  # vendor types included
    checksum: str  # "off", "if_set" (0 means not computed) or "required"
    max_payload: int
    versions: tuple[int, ...] = VERSIONS


# The domain table of PROTOCOL.md.
DOMAINS = {
    "market_data": Domain(1, ((1, 19), VENDOR), "off", 1 << 20),
    "signal": Domain(2, ((20, 39), (60, 79), VENDOR), "if_set", 32 << 10),
    "execution": Domain(3, ((40, 59), VENDOR), "required", 1 << 20),
    "system": Domain(4, ((80, 119), VENDOR), "if_set", 32 << 10),
}


def standard_record(tlv_type: int, value: bytes) -> bytes:
    """``type``, ``length``, ``value``."""
    return bytes((tlv_type, len(value))) + value


def extended_record(tlv_type: int, value: bytes) -> bytes:
    """``255``, ``0``, ``type``, 2-byte little-endian ``length``, ``value``."""
    return bytes((255, 0, tlv_type)) + struct.pack("<H", len(value)) + value


def message(
    domain: int,
    payload: bytes = b"",
    *,
    version: int = VERSION,
    source: int = 0,
    flags: int = 0,
    sequence: int = 0,
    timestamp_ns: int = 0,
    magic: bytes = MAGIC_WIRE,
    payload_size: int | None = None,
    checksum: int | None = None,
) -> bytes:
    """Header plus payload; the CRC covers header bytes 0..27 then the payload."""
    size = len(payload) if payload_size is None else payload_size
    head = _HEADER.pack(magic, domain, version, source, flags, sequence, timestamp_ns, size, 0)[:28]
    if checksum is None:
        checksum = zlib.crc32(head + payload)
    return head + struct.pack("<I", checksum) + payload


def expected_checksum(msg: bytes) -> int:
    return zlib.crc32(msg[:28] + msg[HEADER:])


def in_ranges(tlv_type: int, ranges: Ranges) -> bool:
    return any(lo <= tlv_type <= hi for lo, hi in ranges)


def record_types(payload: bytes) -> list[int] | None:
    """The TLV type of every record, or None if the records are malformed."""
    found = records(payload)
    return None if found is None else [t for t, _ in found]


def records(payload: bytes) -> list[tuple[int, bytes]] | None:
    """``(type, value)`` of every record, or None if the records are malformed."""
    found = []
    pos, end = 0, len(payload)
    while pos < end:
        if payload[pos] == 255:
            if end - pos < 5 or payload[pos + 1] != 0:
                return None
            tlv_type = payload[pos + 2]
            length = payload[pos + 3] | payload[pos + 4] << 8
            pos += 5
        else:
            if end - pos < 2:
                return None
            tlv_type, length = payload[pos], payload[pos + 1]
            pos += 2
        if tlv_type == 0 or pos + length > end:
            return None
        found.append((tlv_type, payload[pos : pos + length]))
        pos += length
    return found


def checksum_fails(msg: bytes, checksum: str) -> bool:
    """Whether ``msg`` fails a checksum policy: off never; if_set when non-zero and wrong; required when wrong."""
    stored = struct.unpack_from("<I", msg, 28)[0]
    if checksum == "off" or (checksum == "if_set" and stored == 0):
        return False
    return stored != expected_checksum(msg)


def verdict(msg: bytes, domain: int, checksum: str, ranges: Ranges, versions: Sequence[int] = VERSIONS) -> int:
    """The per-message verdict of a relay of ``domain`` for one complete, well-framed message."""
    is_control = msg[4] == CONTROL_DOMAIN and msg[5] == CONTROL_VERSION
    if msg[5] not in versions:
        return control_verdict(msg, checksum) if is_control else BAD_VERSION
    if msg[4] != domain:
        return control_verdict(msg, checksum) if is_control else WRONG_DOMAIN
    types = record_types(msg[HEADER:])
    if types is None:
        return MALFORMED_TLV
    if not all(in_ranges(t, ranges) for t in types):
        return TLV_OUT_OF_RANGE
    if checksum_fails(msg, checksum):
        return BAD_CHECKSUM
    return FORWARD


def control_verdict(msg: bytes, checksum: str) -> int:
    """A control-domain message sent to a relay: a control message when it holds only control records."""
    found = records(msg[HEADER:])
    if not found or any(len(v) not in CONTROL_RECORDS.get(t, ()) for t, v in found):
        return MALFORMED_TLV
    if checksum_fails(msg, checksum):
        return BAD_CHECKSUM
    return CONTROL


Selection = tuple[frozenset[int] | None, frozenset[int] | None]  # (TLV types, sources); None means any


def apply_control(selection: Selection, msg: bytes) -> Selection:
    """A subscriber's selection after a control message: records in order, each set replaced whole."""
    types, sources = selection
    for tlv_type, value in records(msg[HEADER:]) or []:
        chosen = frozenset(i for i in range(256) if value and value[i // 8] >> (i % 8) & 1)
        if tlv_type == 100:
            types = chosen
        elif tlv_type == 101:
            sources = chosen
        elif tlv_type == 102:
            types = sources = None
    return types, sources


def selects(selection: Selection, msg: bytes) -> bool:
    """Whether a subscriber with ``selection`` receives a forwarded message."""
    types, sources = selection
    if sources is not None and msg[6] not in sources:
        return False
    return types is None or any(t in types for t in record_types(msg[HEADER:]) or [])


def reference_scan(
    data: bytes, domain: int, max_payload: int, checksum: str, ranges: Ranges, versions: Sequence[int] = VERSIONS
) -> tuple[list[Judged], int, int]:
    """Frame and judge ``data`` from its start.

    Returns the judged messages, the offset just past the last one (or of the
    faulty header), and the stream fault.
    """
    judged: list[Judged] = []
    pos = 0
    while True:
        avail = len(data) - pos
        if avail < 4:
            return judged, pos, NO_FAULT
        if data[pos : pos + 4] != MAGIC_WIRE:
            return judged, pos, BAD_MAGIC
        if avail < HEADER:
            return judged, pos, NO_FAULT
        size = struct.unpack_from("<I", data, pos + 24)[0]
        if size > max_payload:
            return judged, pos, OVERSIZE
        if avail < HEADER + size:
            return judged, pos, NO_FAULT
        length = HEADER + size
        judged.append((pos, length, verdict(data[pos : pos + length], domain, checksum, ranges, versions)))
        pos += length


def reference_runs(judged: Iterable[Judged]) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of adjacent forwarded messages."""
    runs: list[tuple[int, int]] = []
    previous_forwarded = False
    for offset, length, v in judged:
        if v == FORWARD and previous_forwarded:
            runs[-1] = (runs[-1][0], offset + length)
        elif v == FORWARD:
            runs.append((offset, offset + length))
        previous_forwarded = v == FORWARD
    return runs


def reference_counts(judged: Iterable[Judged], kinds: int = 7) -> list[int]:
    """Messages per verdict code."""
    counts = [0] * kinds
    for _, _, v in judged:
        counts[v] += 1
    return counts
