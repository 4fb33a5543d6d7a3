"""The typed-record loops: gather every record of one type out of a batch, and write records as messages.

Like ``loops``, plain ``@njit`` functions over uint8 buffers and integer
arrays that never allocate, compiled ahead of time with the rest, by the JIT,
or run as Python. ``records`` (the kernels' face for them) checks arguments
and allocates.

``gather`` walks a batch's headers and each message's records (standard
``type, len8`` and extended ``255, 0, type, len16`` alike) and copies the
value of every record of the asked type and size into consecutive rows,
with its message's sequence, timestamp and source beside it. ``uniform``
finds out whether a batch is all alike (every message one record of the
type), in which case the records can be read in place as a strided view
with no copy at all. ``scatter`` is the reverse of ``gather``: one message
per record, headers filled from a template.
"""

from __future__ import annotations

import numpy as np

from jitrelay.core import protocol as p
from jitrelay.kernels.constants import RECORD_MESSAGES as MESSAGES
from jitrelay.kernels.constants import RECORD_TRUNCATED as TRUNCATED
from jitrelay.kernels.constants import RECORD_WRONG_SIZE as WRONG_SIZE
from jitrelay.kernels.loops import _MEMCPY, _u32, kernel, message_crc

_EIGHT = np.uint64(8)


@kernel
def gather(buf, end, tlv_type, size, out, sequences, timestamps, sources, counts):
    """Copy each ``tlv_type`` record of ``size`` bytes in ``buf[:end]`` into row after row of ``out``.

    ``out`` holds ``len(sequences)`` rows of ``size`` bytes; records past
    that many are not copied (the face sizes ``out`` so that none can be).
    Control messages (header domain 255) are skipped. Returns the rows written.
    """
    source = np.uint64(buf.ctypes.data)
    target = np.uint64(out.ctypes.data)
    sequence_at = np.uint64(sequences.ctypes.data)
    timestamp_at = np.uint64(timestamps.ctypes.data)
    capacity = len(sequences)
    rows = 0
    pos = 0
    while pos + p.HEADER_SIZE <= end:
        stop = pos + p.HEADER_SIZE + _u32(buf, pos + p.OFF_PAYLOAD_SIZE)
        if stop > end:
            counts[TRUNCATED] += 1
            break
        counts[MESSAGES] += 1
        if buf[pos + p.OFF_DOMAIN] == p.CONTROL_DOMAIN:
            pos = stop
            continue
        r = pos + p.HEADER_SIZE
        while r < stop:
            kind = np.int64(buf[r])
            if kind == p.EXTENDED_TLV:
                if r + 5 > stop:
                    counts[TRUNCATED] += 1
                    break
                kind = np.int64(buf[r + 2])
                n = np.int64(buf[r + 3]) | (np.int64(buf[r + 4]) << 8)
                value = r + 5
            else:
                if r + 2 > stop:
                    counts[TRUNCATED] += 1
                    break
                n = np.int64(buf[r + 1])
                value = r + 2
            if value + n > stop:
                counts[TRUNCATED] += 1
                break
            if kind == tlv_type:
                if n != size:
                    counts[WRONG_SIZE] += 1
                elif rows < capacity:
                    _MEMCPY(target + np.uint64(rows * size), source + np.uint64(value), np.uint64(size))
                    _MEMCPY(sequence_at + np.uint64(8 * rows), source + np.uint64(pos + p.OFF_SEQUENCE), _EIGHT)
                    _MEMCPY(timestamp_at + np.uint64(8 * rows), source + np.uint64(pos + p.OFF_TIMESTAMP), _EIGHT)
                    sources[rows] = buf[pos + p.OFF_SOURCE]
                    rows += 1
            r = value + int(n)
        pos = stop
    return rows


@kernel
def uniform(buf, end, tlv_type, size):
    """The length of every message when ``buf[:end]`` is whole messages each holding one ``tlv_type`` record of
    ``size`` bytes in the same form, else 0: then the records can be read in place, one every that many bytes.
    """
    if end < p.HEADER_SIZE:
        return 0
    payload = _u32(buf, p.OFF_PAYLOAD_SIZE)
    stride = p.HEADER_SIZE + payload
    extended = payload == size + 5
    if not (payload == size + 2 or extended) or end % stride:
        return 0
    for pos in range(0, end, stride):
        if _u32(buf, pos + p.OFF_PAYLOAD_SIZE) != payload or buf[pos + p.OFF_DOMAIN] == p.CONTROL_DOMAIN:
            return 0
        r = pos + p.HEADER_SIZE
        if extended:
            if buf[r] != p.EXTENDED_TLV or buf[r + 2] != tlv_type or (buf[r + 3] | (buf[r + 4] << 8)) != size:
                return 0
        elif buf[r] != tlv_type or buf[r + 1] != size:
            return 0
    return stride


@kernel
def scatter(records, count, size, out, template, first_sequence, timestamps, checksums, crc_tables):
    """Write ``count`` records of ``size`` bytes from ``records`` as that many messages, back to back in ``out``.

    Each message starts as a copy of ``template`` (its header and the
    record's head, built once by the caller: magic to flags, timestamp,
    payload size, checksum 0, then ``type, len`` or ``255, 0, type, len16``);
    then its sequence (``first_sequence`` + i) is written, its timestamp
    from ``timestamps[i]`` unless that is empty, its value, and with
    ``checksums`` its CRC. Returns the bytes written.
    """
    head = len(template)
    length = head + size
    source = np.uint64(records.ctypes.data)
    target = np.uint64(out.ctypes.data)
    start = np.uint64(template.ctypes.data)
    stamped = len(timestamps) > 0
    for i in range(count):
        pos = i * length
        at = target + np.uint64(pos)
        _MEMCPY(at, start, np.uint64(head))
        _MEMCPY(at + np.uint64(head), source + np.uint64(i * size), np.uint64(size))
        sequence = first_sequence + i
        for k in range(8):
            out[pos + p.OFF_SEQUENCE + k] = (sequence >> (8 * k)) & 0xFF
        if stamped:
            stamp = timestamps[i]
            for k in range(8):
                out[pos + p.OFF_TIMESTAMP + k] = (stamp >> (8 * k)) & 0xFF
        if checksums:
            checksum = message_crc(out, pos, length, crc_tables)
            for k in range(4):
                out[pos + p.OFF_CHECKSUM + k] = (checksum >> (8 * k)) & 0xFF
    return count * length
