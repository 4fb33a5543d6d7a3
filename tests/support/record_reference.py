"""A plain-Python statement of what the record kernels must do, written from PROTOCOL.md's framing alone.

``gather`` walks whole messages with ``struct`` and collects every record of one type and length,
with its message's sequence, timestamp and source; ``encode`` builds one message per record with
``support.reference.message``. No code is shared with ``jitrelay.kernels``.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from support.reference import CONTROL_DOMAIN, HEADER, message

_HEAD = struct.Struct("<4sBBBBQQII")


class Gathered(NamedTuple):
    values: list[bytes]
    sequences: list[int]
    timestamps: list[int]
    sources: list[int]
    wrong_size: int
    truncated: int


def gather(batch: bytes, tlv_type: int, size: int) -> Gathered:
    """Every ``tlv_type`` record of ``size`` bytes in ``batch``; others of the type counted, broken ones too."""
    found = Gathered([], [], [], [], 0, 0)
    wrong = truncated = 0
    pos = 0
    while pos + HEADER <= len(batch):
        _, domain, _, source, _, sequence, stamp, payload, _ = _HEAD.unpack_from(batch, pos)
        stop = pos + HEADER + payload
        if stop > len(batch):
            truncated += 1
            break
        if domain != CONTROL_DOMAIN:
            for kind, value, broken in _records(batch[pos + HEADER : stop]):
                if broken:
                    truncated += 1
                elif kind == tlv_type and len(value) != size:
                    wrong += 1
                elif kind == tlv_type:
                    found.values.append(value)
                    found.sequences.append(sequence)
                    found.timestamps.append(stamp)
                    found.sources.append(source)
        pos = stop
    return found._replace(wrong_size=wrong, truncated=truncated)


def _records(payload: bytes) -> list[tuple[int, bytes, bool]]:
    """(type, value, False) for each record; a last (0, b"", True) when one runs past the payload."""
    out: list[tuple[int, bytes, bool]] = []
    r = 0
    while r < len(payload):
        if payload[r] == 255:
            if r + 5 > len(payload):
                return [*out, (0, b"", True)]
            kind, length = payload[r + 2], struct.unpack_from("<H", payload, r + 3)[0]
            start = r + 5
        else:
            if r + 2 > len(payload):
                return [*out, (0, b"", True)]
            kind, length, start = payload[r], payload[r + 1], r + 2
        if start + length > len(payload):
            return [*out, (0, b"", True)]
        out.append((kind, payload[start : start + length], False))
        r = start + length
    return out


def record(kind: int, value: bytes, extended: bool = False) -> bytes:
    """A record in the standard form, or the extended one (``255, 0, type, len16``)."""
    if extended or len(value) > 255:
        return bytes((255, 0, kind)) + struct.pack("<H", len(value)) + value
    return bytes((kind, len(value))) + value


def encode(
    values: list[bytes],
    kind: int,
    *,
    domain: int,
    source: int,
    version: int,
    first_sequence: int,
    timestamps: list[int],
    checksums: bool,
) -> bytes:
    """One message per value, numbered from ``first_sequence``; checksum 0 unless ``checksums``."""
    return b"".join(
        message(
            domain,
            record(kind, value),
            version=version,
            source=source,
            sequence=(first_sequence + i) % (1 << 64),
            timestamp_ns=timestamps[i],
            checksum=None if checksums else 0,
        )
        for i, value in enumerate(values)
    )
