"""Typed records in whole batches: one compiled call decodes a batch into columns, one encodes columns into messages.

The face of ``record_loops``, as ``kernels`` is the face of ``loops``: it
checks every argument (the ahead-of-time build trusts them), allocates the
outputs and wraps the results. A batch is what ``Subscriber.batches()``
yields, a journal segment's messages, a capture file's: whole messages back
to back in a contiguous uint8 array.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.records import LAYOUTS, RecordLayout, layout
from jitrelay.kernels.constants import RECORD_TRUNCATED, RECORD_WRONG_SIZE


class Columns(NamedTuple):
    """Every record of one type in a batch, in order, with the header fields of the message each came in."""

    records: np.ndarray  # the layout's structured dtype, one element per record
    sequence: np.ndarray  # uint64
    timestamp_ns: np.ndarray  # uint64: the header's timestamp
    source: np.ndarray  # uint8
    wrong_size: int  # records of the type whose length was not the layout's (left out)
    truncated: int  # messages whose records ran past their payload, or a partial message at the end (left out)


def decode(batch: np.ndarray, record: int | str | RecordLayout, *, copy: bool = False) -> Columns:
    """Every ``record`` in ``batch``, gathered into a structured array by one compiled call.

    When every message of the batch is one record of the type in the same
    form, the result is a strided view of the batch's own memory (no copy)
    unless ``copy``; otherwise a contiguous array. Standard and extended
    records alike; control messages are skipped. Raises ``TypeError`` for a
    batch that is not a contiguous uint8 array, ``UnknownRecord`` for a type
    with no layout.
    """
    kind = layout(record)
    buf = kernels._bytes(batch, "batch")
    loops = _loops()
    size = kind.size
    if not copy:
        stride = int(loops.record_uniform(buf, len(buf), kind.tlv_type, size))
        if stride:
            return _in_place(buf, kind, stride)
    rows = len(buf) // (size + 2) + 1
    out = np.empty(rows * size, dtype=np.uint8)
    sequence = np.empty(rows, dtype=np.uint64)
    stamps = np.empty(rows, dtype=np.uint64)
    source = np.empty(rows, dtype=np.uint8)
    counts = np.zeros(3, dtype=np.int64)
    found = int(loops.record_gather(buf, len(buf), kind.tlv_type, size, out, sequence, stamps, source, counts))
    return Columns(
        out[: found * size].view(kind.dtype),
        sequence[:found],
        stamps[:found],
        source[:found],
        int(counts[RECORD_WRONG_SIZE]),
        int(counts[RECORD_TRUNCATED]),
    )


def _in_place(buf: np.ndarray, kind: RecordLayout, stride: int) -> Columns:
    """A uniform batch's records and header fields as strided views of its memory."""
    n = len(buf) // stride
    value = stride - kind.size  # past the header and the record's head, in whichever form the batch uses

    def column(dtype: object, offset: int) -> np.ndarray:
        return np.ndarray((n,), dtype=dtype, buffer=buf, offset=offset, strides=(stride,))  # type: ignore[arg-type]

    return Columns(
        column(kind.dtype, value),
        column("<u8", protocol.OFF_SEQUENCE),
        column("<u8", protocol.OFF_TIMESTAMP),
        column("u1", protocol.OFF_SOURCE),
        0,
        0,
    )


def message_size(record: int | str | RecordLayout) -> int:
    """The length of a message of one such record: header, record head, value."""
    kind = layout(record)
    return protocol.HEADER_SIZE + (5 if kind.extended else 2) + kind.size


def encode(
    records: np.ndarray,
    *,
    domain: int,
    source: int = 0,
    version: int = protocol.VERSION,
    flags: int = 0,
    first_sequence: int = 0,
    timestamp_ns: int | np.ndarray | None = None,
    checksums: bool = False,
    record: int | str | RecordLayout | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """One message per element of ``records`` (a layout's structured array), back to back, in one compiled call.

    The record type is the one whose dtype ``records`` has, or ``record``.
    Message i gets sequence ``first_sequence + i`` and ``timestamp_ns`` (one
    value for all, an array of one per record, or now); its checksum is
    computed with ``checksums``. Writes into ``out`` when given (it must hold
    ``len(records) * message_size``) and returns the bytes written.
    """
    kind = layout_of(records, record)
    values = np.ascontiguousarray(records).view(np.uint8).reshape(-1)
    count = len(records)
    length = message_size(kind) * count
    if out is None:
        out = np.empty(length, dtype=np.uint8)
    elif len(kernels._bytes(out, "out", writable=True)) < length:
        raise ValueError(f"out holds {len(out)} bytes; {count} records need {length}")
    stamps, now = _stamps(timestamp_ns, count)
    head = _template(kind, domain, version, source, flags, now)
    written = _loops().record_scatter(
        values,
        count,
        kind.size,
        out,
        head,
        kernels._as_int64(first_sequence),
        stamps,
        checksums,
        kernels.CRC_TABLES,
    )
    return out[:written]


def _template(kind: RecordLayout, domain: int, version: int, source: int, flags: int, stamp: int) -> np.ndarray:
    """What every message of these records starts with: its header (sequence 0, checksum 0) and record head."""
    record = protocol.encode_record(kind.tlv_type, bytes(kind.size), extended=kind.extended)
    header = protocol.HEADER_STRUCT.pack(
        protocol.MAGIC, domain, version, source, flags, 0, stamp & _U64, len(record), 0
    )
    return np.frombuffer(header + record[: len(record) - kind.size], dtype=np.uint8)


_U64 = (1 << 64) - 1
_NO_STAMPS = np.empty(0, dtype=np.int64)


def _stamps(timestamp_ns: int | np.ndarray | None, count: int) -> tuple[np.ndarray, int]:
    if timestamp_ns is None:
        return _NO_STAMPS, time.time_ns()
    if isinstance(timestamp_ns, np.ndarray):
        if len(timestamp_ns) != count:
            raise ValueError(f"{len(timestamp_ns)} timestamps for {count} records")
        return np.ascontiguousarray(timestamp_ns).astype(np.int64, copy=False), 0
    return _NO_STAMPS, kernels._as_int64(int(timestamp_ns))


def layout_of(records: np.ndarray, record: int | str | RecordLayout | None = None) -> RecordLayout:
    """The layout ``records`` are elements of: ``record`` if given (and its dtype must match), else found by dtype."""
    if not isinstance(records, np.ndarray) or records.ndim != 1:
        raise TypeError("records must be a one-dimensional numpy array of a record layout's dtype")
    if record is not None:
        kind = layout(record)
        if records.dtype != kind.dtype:
            raise TypeError(f"records have dtype {records.dtype}, not the {kind.name} layout's")
        return kind
    matches = [kind for kind in LAYOUTS.values() if records.dtype == kind.dtype]
    if len(matches) == 1:
        return matches[0]
    names = " or ".join(kind.name for kind in matches)
    raise TypeError(
        f"records have dtype {records.dtype}, "
        + (f"which is {names}'s: pass record=" if matches else "which is no record layout's")
    )


def _loops() -> Any:
    """The loaded build's record loops: the compiled module's own, else numba's or plain Python's.

    ``record_loops`` (and with it numba) is imported only for those builds: a process running the
    ahead-of-time module never imports numba.
    """
    loaded = kernels._loaded()
    if hasattr(loaded, "record_gather"):
        return loaded
    from jitrelay.kernels import record_loops

    return SimpleNamespace(
        record_gather=record_loops.gather, record_uniform=record_loops.uniform, record_scatter=record_loops.scatter
    )
