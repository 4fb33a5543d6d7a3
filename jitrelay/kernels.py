"""Compiled kernels over uint8 buffers: framing, validation, runs, compaction, CRC-32.

The relay hands each read to ``scan_into`` once. The scan walks the 32-byte
headers of every complete message in ``buf[start:end]``, gives each a verdict
(``protocol.FORWARD`` or a reject reason), merges adjacent forwarded messages
into runs, and stops at the first partial message or at a stream-fatal fault.

Goals: no allocation inside the loops, no Python objects, and work
proportional to the bytes of complete messages: a partial message costs a
re-read of its header only, never of its payload. The scan is three tight
loops rather than one: framing and the TLV walk; CRC-32 over the messages
still accepted, only for domains that verify; then runs and tallies from the
verdicts. Keeping the CRC out of the framing loop more than doubles its speed
(the compiler keeps the walk's state in registers). CRC-32 is a slicing-by-8
loop for short ranges and zlib's own ``crc32``, called as C, for long ones.

Each public function validates and allocates; a private ``@njit`` function of
plain loops does the work. Run with ``NUMBA_DISABLE_JIT=1`` and the same code
runs as Python, which is how the tests measure its coverage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import NamedTuple

import llvmlite.binding as llvm
import numpy as np
from numba import config, njit, types

from . import protocol as p

_JIT = {"cache": True, "nogil": True}


def _c_function(library: str | None, name: str, symbol: str, argtypes: list, restype: object, signature: object):
    """A C function the kernels call directly, as an external symbol numba links by name.

    The symbol is registered with LLVM at import, so cached kernels link to
    this process's copy of the library; a ctypes function passed as an
    argument would work too, but numba types it on every call (about 2 us).
    Without the JIT (``NUMBA_DISABLE_JIT=1``) the kernels call the ctypes function.
    """
    fn = getattr(ctypes.CDLL(library), name)
    fn.argtypes = argtypes
    fn.restype = restype
    if config.DISABLE_JIT:
        return fn
    llvm.add_symbol(symbol, ctypes.cast(fn, ctypes.c_void_p).value)
    return types.ExternalFunction(symbol, signature)


def _zlib_library() -> str:
    name = ctypes.util.find_library("z")
    if name is None:
        raise ImportError("jitrelay needs the zlib shared library (libz.so.1) for CRC-32")
    return name


# zlib's crc32 (the library behind Python's zlib module) and the C library's
# memcpy: for long ranges both beat what numba generates for the same loops.
_ZLIB_CRC32 = _c_function(
    _zlib_library(),
    "crc32",
    "jitrelay_zlib_crc32",
    [ctypes.c_ulong, ctypes.c_size_t, ctypes.c_uint],
    ctypes.c_ulong,
    types.uint64(types.uint64, types.uintp, types.uint32),
)
_MEMCPY = _c_function(
    None,
    "memcpy",
    "jitrelay_memcpy",
    [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t],
    ctypes.c_size_t,
    types.uintp(types.uintp, types.uintp, types.uintp),
)


def _make_crc_tables() -> np.ndarray:
    tables = np.zeros((8, 256), dtype=np.int64)
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        tables[0, n] = c
    for n in range(256):
        c = tables[0, n]
        for k in range(1, 8):
            c = tables[0, c & 0xFF] ^ (c >> 8)
            tables[k, n] = c
    return tables


CRC_TABLES = _make_crc_tables()  # slicing-by-8
# Below this many bytes a table-driven loop beats a call into zlib (whose fast
# paths need setup); above it zlib's braided CRC is faster.
CRC_ZLIB_MIN = 256


class KernelTables(NamedTuple):
    """What the scan needs to know of a domain, as flat values and one array."""

    domain: int
    max_payload: int
    verify_checksum: bool
    type_allowed: np.ndarray  # uint8[256]; 1 where the domain carries the TLV type


class ScanResult(NamedTuple):
    count: int  # complete messages framed
    consumed: int  # offset just past the last complete message
    fault: int  # protocol.NO_FAULT, BAD_MAGIC or OVERSIZE
    runs: int  # runs of forwarded messages written to ``ScanBuffers.runs``
    forwarded_bytes: int
    controls: int = 0  # control messages among them (verdict ``protocol.CONTROL``)


class ScanBuffers:
    """Output arrays of a scan, allocated once per connection and reused.

    ``offsets[i]`` is where message ``i`` starts and ``offsets[count]`` is
    ``consumed``; ``verdicts[i]`` is its verdict; ``runs[2k]``/``runs[2k+1]``
    bound the k-th run of forwarded messages; ``counts[v]`` accumulates
    messages per verdict across calls.
    """

    def __init__(self, capacity: int):
        slots = capacity // p.HEADER_SIZE + 2
        self.capacity = capacity
        self.offsets = np.zeros(slots, dtype=np.int64)
        self.verdicts = np.zeros(slots, dtype=np.uint8)
        self.runs = np.zeros(2 * slots, dtype=np.int64)
        self.counts = np.zeros(len(p.VERDICT_NAMES), dtype=np.int64)


@njit(**_JIT)
def _u32(buf, pos):
    return (
        np.int64(buf[pos])
        | (np.int64(buf[pos + 1]) << 8)
        | (np.int64(buf[pos + 2]) << 16)
        | (np.int64(buf[pos + 3]) << 24)
    )


@njit(**_JIT)
def _crc32_table(buf, start, end, value, tables):
    c = value ^ 0xFFFFFFFF
    i = start
    while i + 8 <= end:
        one = c ^ _u32(buf, i)
        two = _u32(buf, i + 4)
        c = (
            tables[7, one & 0xFF]
            ^ tables[6, (one >> 8) & 0xFF]
            ^ tables[5, (one >> 16) & 0xFF]
            ^ tables[4, one >> 24]
            ^ tables[3, two & 0xFF]
            ^ tables[2, (two >> 8) & 0xFF]
            ^ tables[1, (two >> 16) & 0xFF]
            ^ tables[0, two >> 24]
        )
        i += 8
    while i < end:
        c = tables[0, (c ^ np.int64(buf[i])) & 0xFF] ^ (c >> 8)
        i += 1
    return c ^ 0xFFFFFFFF


@njit(**_JIT)
def _crc32_zlib(buf, start, end, value):
    return np.int64(_ZLIB_CRC32(np.uint64(value), np.uint64(buf.ctypes.data + start), np.uint32(end - start)))


@njit(**_JIT)
def _crc32(buf, start, end, value, crc_tables):
    if end - start < CRC_ZLIB_MIN:
        return _crc32_table(buf, start, end, value, crc_tables)
    return _crc32_zlib(buf, start, end, value)


@njit(**_JIT)
def _message_crc(buf, pos, length, crc_tables):
    head = _crc32_table(buf, pos, pos + p.CHECKSUM_COVERED, np.int64(0), crc_tables)
    if length < CRC_ZLIB_MIN:
        return _crc32_table(buf, pos + p.HEADER_SIZE, pos + length, head, crc_tables)
    return _crc32_zlib(buf, pos + p.HEADER_SIZE, pos + length, head)


@njit(**_JIT)
def _record_at(buf, i, end):
    """The record at ``i``: ``(type, value length, offset of the value)``, or type -1 if its header is cut or bad."""
    if buf[i] == p.EXTENDED_TLV:
        if i + 5 > end or buf[i + 1] != 0:
            return -1, 0, i
        return np.int64(buf[i + 2]), np.int64(buf[i + 3]) | (np.int64(buf[i + 4]) << 8), i + 5
    if i + 2 > end:
        return -1, 0, i
    return np.int64(buf[i]), np.int64(buf[i + 1]), i + 2


@njit(**_JIT)
def _control_verdict(buf, pos, length):
    """CONTROL when a system-domain message holds only well-formed subscription records, else MALFORMED_TLV."""
    i = pos + p.HEADER_SIZE
    end = pos + length
    if i == end:
        return p.MALFORMED_TLV
    while i < end:
        tlv_type, value_len, i = _record_at(buf, i, end)
        if tlv_type == p.SUBSCRIBE_TLV_TYPES or tlv_type == p.SUBSCRIBE_SOURCES:
            if value_len != p.BITMAP_SIZE:
                return p.MALFORMED_TLV
        elif tlv_type != p.UNSUBSCRIBE or value_len != 0:
            return p.MALFORMED_TLV
        i += value_len
        if i > end:
            return p.MALFORMED_TLV
    return p.CONTROL


@njit(**_JIT)
def _verdict(buf, pos, length, domain, type_allowed):
    """The verdict of a complete message, short of its checksum."""
    if buf[pos + p.OFF_VERSION] != p.VERSION:
        return p.BAD_VERSION
    if buf[pos + p.OFF_DOMAIN] != domain:
        return p.WRONG_DOMAIN  # system-domain messages are looked at again by ``_controls``
    i = pos + p.HEADER_SIZE
    end = pos + length
    out_of_range = False
    while i < end:
        tlv_type, value_len, i = _record_at(buf, i, end)
        if tlv_type <= 0:
            return p.MALFORMED_TLV
        i += value_len
        if i > end:
            return p.MALFORMED_TLV
        if type_allowed[tlv_type] == 0:
            out_of_range = True
    return p.TLV_OUT_OF_RANGE if out_of_range else p.FORWARD


@njit(**_JIT)
def _frame_and_judge(buf, start, end, domain, max_payload, type_allowed, offsets, verdicts):
    n = 0
    pos = start
    fault = p.NO_FAULT
    while True:
        avail = end - pos
        if avail < 4:
            break
        if _u32(buf, pos) != p.MAGIC:
            fault = p.BAD_MAGIC
            break
        if avail < p.HEADER_SIZE:
            break
        payload = _u32(buf, pos + p.OFF_PAYLOAD_SIZE)
        if payload > max_payload:
            fault = p.OVERSIZE
            break
        length = p.HEADER_SIZE + payload
        if avail < length:
            break
        offsets[n] = pos
        verdicts[n] = _verdict(buf, pos, length, domain, type_allowed)
        n += 1
        pos += length
    offsets[n] = pos
    return n, pos, fault


@njit(**_JIT)
def _verify_checksums(buf, offsets, verdicts, n, crc_tables):
    for k in range(n):
        if verdicts[k] == p.FORWARD:
            pos = offsets[k]
            if _message_crc(buf, pos, offsets[k + 1] - pos, crc_tables) != _u32(buf, pos + p.OFF_CHECKSUM):
                verdicts[k] = p.BAD_CHECKSUM


@njit(**_JIT)
def _runs_and_counts(offsets, verdicts, n, runs, counts):
    n_runs = 0
    forwarded = 0
    run_start = -1
    run_end = -1
    n_forward = 0
    for k in range(n):
        verdict = verdicts[k]
        if verdict == p.FORWARD:
            pos = offsets[k]
            if pos != run_end:
                if run_start >= 0:
                    runs[2 * n_runs] = run_start
                    runs[2 * n_runs + 1] = run_end
                    n_runs += 1
                run_start = pos
            run_end = offsets[k + 1]
            forwarded += run_end - pos
            n_forward += 1
        else:
            counts[verdict] += 1
    if run_start >= 0:
        runs[2 * n_runs] = run_start
        runs[2 * n_runs + 1] = run_end
        n_runs += 1
    counts[p.FORWARD] += n_forward
    return n_runs, forwarded


@njit(**_JIT)
def _controls(buf, offsets, verdicts, n, verify, crc_tables, counts):
    """Give the system-domain messages among the ``wrong_domain`` ones their control verdict; return how many.

    A pass of its own, run only for batches with a wrong-domain message, so
    control messages cost the framing loop nothing.
    """
    n_controls = 0
    for k in range(n):
        pos = offsets[k]
        if verdicts[k] != p.WRONG_DOMAIN or buf[pos + p.OFF_DOMAIN] != p.SYSTEM:
            continue
        length = offsets[k + 1] - pos
        verdict = _control_verdict(buf, pos, length)
        if (
            verdict == p.CONTROL
            and verify
            and _message_crc(buf, pos, length, crc_tables) != _u32(buf, pos + p.OFF_CHECKSUM)
        ):
            verdict = p.BAD_CHECKSUM
        verdicts[k] = verdict
        counts[p.WRONG_DOMAIN] -= 1
        counts[verdict] += 1
        if verdict == p.CONTROL:
            n_controls += 1
    return n_controls


@njit(**_JIT)
def _scan(buf, start, end, domain, max_payload, verify, type_allowed, offsets, verdicts, runs, counts, crc_tables):
    n, pos, fault = _frame_and_judge(buf, start, end, domain, max_payload, type_allowed, offsets, verdicts)
    if verify:
        _verify_checksums(buf, offsets, verdicts, n, crc_tables)
    wrong_domain = counts[p.WRONG_DOMAIN]
    n_runs, forwarded = _runs_and_counts(offsets, verdicts, n, runs, counts)
    n_controls = 0
    if counts[p.WRONG_DOMAIN] != wrong_domain:
        n_controls = _controls(buf, offsets, verdicts, n, verify, crc_tables, counts)
    return n, pos, fault, n_runs, forwarded, n_controls


def scan_into(
    buf: np.ndarray,
    start: int,
    end: int,
    tables: KernelTables,
    out: ScanBuffers,
    counts: np.ndarray | None = None,
) -> ScanResult:
    """Frame and judge every complete message in ``buf[start:end]``.

    Results go to ``out`` (see ``ScanBuffers``); verdicts are tallied into
    ``counts`` (default ``out.counts``), so one ``ScanBuffers`` can serve many
    connections that keep their own tallies. On a fault, ``consumed`` is the
    offset of the faulty header: messages before it were judged normally.
    """
    return ScanResult(*_scan(*_scan_args(buf, start, end, tables, out, counts)))


def _scan_args(
    buf: np.ndarray, start: int, end: int, tables: KernelTables, out: ScanBuffers, counts: np.ndarray | None
) -> tuple:
    """The arguments of ``_scan``, checked."""
    if end - start > out.capacity:
        raise ValueError(f"scan range of {end - start} bytes exceeds the buffers' capacity of {out.capacity}")
    if counts is not None and len(counts) < len(p.VERDICT_NAMES):
        raise ValueError(f"counts needs {len(p.VERDICT_NAMES)} slots, one per verdict")
    return (
        buf,
        start,
        end,
        tables.domain,
        tables.max_payload,
        tables.verify_checksum,
        tables.type_allowed,
        out.offsets,
        out.verdicts,
        out.runs,
        out.counts if counts is None else counts,
        CRC_TABLES,
    )


def scan(
    buf: np.ndarray, tables: KernelTables, start: int = 0, end: int | None = None
) -> tuple[ScanResult, ScanBuffers]:
    """``scan_into`` with freshly allocated buffers: for tools, tests and notebooks."""
    end = len(buf) if end is None else end
    out = ScanBuffers(end - start)
    return scan_into(buf, start, end, tables, out), out


@njit(**_JIT)
def _frame(buf, start, end):
    n = 0
    pos = start
    while end - pos >= 4:
        if _u32(buf, pos) != p.MAGIC:
            return n, pos, p.BAD_MAGIC
        if end - pos < p.HEADER_SIZE:
            break
        length = p.HEADER_SIZE + _u32(buf, pos + p.OFF_PAYLOAD_SIZE)
        if end - pos < length:
            break
        pos += length
        n += 1
    return n, pos, p.NO_FAULT


def frame(buf: np.ndarray, start: int = 0, end: int | None = None) -> tuple[int, int, int]:
    """Count the complete messages in ``buf[start:end]`` without judging them.

    Returns ``(count, consumed, fault)``; subscribers use it to cut a stream
    into whole messages.
    """
    return _frame(buf, start, len(buf) if end is None else end)


@njit(**_JIT)
def _next_message_end(buf, start, end):
    if end - start < p.HEADER_SIZE:
        return -1
    length = p.HEADER_SIZE + _u32(buf, start + p.OFF_PAYLOAD_SIZE)
    return start + length if end - start >= length else -1


@njit(**_JIT)
def _compact(buf, runs, n_runs, out):
    source = buf.ctypes.data
    target = out.ctypes.data
    o = 0
    for k in range(n_runs):
        a = runs[2 * k]
        b = runs[2 * k + 1]
        _MEMCPY(np.uint64(target + o), np.uint64(source + a), np.uint64(b - a))
        o += b - a
    return o


def compact(buf: np.ndarray, runs: np.ndarray, n_runs: int, out: np.ndarray | None = None) -> np.ndarray:
    """Copy the forwarded runs of a scan back to back into one array."""
    total = int((runs[1 : 2 * n_runs : 2] - runs[0 : 2 * n_runs : 2]).sum())
    if out is None:
        out = np.empty(total, dtype=np.uint8)
    elif len(out) < total:
        raise ValueError(f"output of {len(out)} bytes cannot hold {total}")
    if not (buf.flags.c_contiguous and out.flags.c_contiguous and buf.dtype == out.dtype == np.uint8):
        raise ValueError("compact needs contiguous uint8 arrays")
    if n_runs and (runs[0] < 0 or runs[2 * n_runs - 1] > len(buf)):
        raise ValueError("runs reach outside the buffer")
    _compact(buf, runs, n_runs, out)
    return out[:total]


_ONE = np.uint64(1)
_ZERO = np.uint64(0)


class GroupTables(NamedTuple):
    """The filters of the subscriber groups, as per-byte-value bitmasks of groups (64 groups a word).

    Bit ``g`` of ``type_groups[t]`` is set when group ``g`` wants TLV type
    ``t``; of ``untyped``, when group ``g`` has no type filter; of
    ``source_groups[s]``, when group ``g`` wants source ``s`` or has no source
    filter. A message goes to group ``g`` when bit ``g`` of
    ``(untyped | OR of type_groups[t] over its records) & source_groups[source]`` is set.
    """

    type_groups: np.ndarray  # uint64[256, words]
    source_groups: np.ndarray  # uint64[256, words]
    untyped: np.ndarray  # uint64[words]
    groups: int


def group_tables(filters: list[p.Filter]) -> GroupTables:
    """The tables for groups ``0..len(filters)-1`` with these ``(tlv_types, sources)`` filters."""
    words = max(1, (len(filters) + 63) // 64)
    type_groups = np.zeros((256, words), dtype=np.uint64)
    source_groups = np.zeros((256, words), dtype=np.uint64)
    untyped = np.zeros(words, dtype=np.uint64)
    for g, (tlv_types, sources) in enumerate(filters):
        word, bit = divmod(g, 64)
        flag = np.uint64(1 << bit)
        if tlv_types is None:
            untyped[word] |= flag
        else:
            type_groups[sorted(tlv_types), word] |= flag
        if sources is None:
            source_groups[:, word] |= flag
        else:
            source_groups[sorted(sources), word] |= flag
    return GroupTables(type_groups, source_groups, untyped, len(filters))


class RouteBuffers:
    """Outputs of ``route``, reused across calls and grown when a batch needs more.

    ``masks[i]`` holds the groups message ``i`` goes to; group ``g`` has
    ``counts[g]`` runs at ``runs[2 * first[g]:]`` (start, end pairs) totalling
    ``sizes[g]`` bytes.
    """

    def __init__(self, capacity: int, groups: int):
        slots = capacity // p.HEADER_SIZE + 2
        self.capacity = capacity
        self.masks = np.zeros((slots, max(1, (groups + 63) // 64)), dtype=np.uint64)
        self.first = np.zeros(max(1, groups), dtype=np.int64)
        self.counts = np.zeros(max(1, groups), dtype=np.int64)
        self.sizes = np.zeros(max(1, groups), dtype=np.int64)
        self.runs = np.zeros(2 * slots, dtype=np.int64)

    def group_runs(self, group: int) -> np.ndarray:
        """The (start, end) pairs of ``group``'s runs, flat."""
        first = self.first[group]
        return self.runs[2 * first : 2 * (first + self.counts[group])]


@njit(**_JIT)
def _group_masks_one_word(buf, offsets, verdicts, n, type_groups, source_groups, untyped, masks):
    """``_group_masks`` for up to 64 groups: the mask stays in a register."""
    base = untyped[0]
    for k in range(n):
        if verdicts[k] != p.FORWARD:
            masks[k, 0] = _ZERO
            continue
        mask = base
        pos = offsets[k]
        end = offsets[k + 1]
        i = pos + p.HEADER_SIZE
        while i < end:
            tlv_type = np.int64(buf[i])
            if tlv_type == p.EXTENDED_TLV:
                tlv_type = np.int64(buf[i + 2])
                i += 5 + (np.int64(buf[i + 3]) | (np.int64(buf[i + 4]) << 8))
            else:
                i += 2 + np.int64(buf[i + 1])
            mask |= type_groups[tlv_type, 0]
        masks[k, 0] = mask & source_groups[np.int64(buf[pos + p.OFF_SOURCE]), 0]


@njit(**_JIT)
def _group_masks(buf, offsets, verdicts, n, type_groups, source_groups, untyped, masks):
    words = masks.shape[1]
    if words == 1:
        _group_masks_one_word(buf, offsets, verdicts, n, type_groups, source_groups, untyped, masks)
        return
    for k in range(n):
        if verdicts[k] != p.FORWARD:
            for w in range(words):
                masks[k, w] = _ZERO
            continue
        for w in range(words):
            masks[k, w] = untyped[w]
        pos = offsets[k]
        end = offsets[k + 1]
        i = pos + p.HEADER_SIZE
        while i < end:  # the scan has already checked these records are well formed
            tlv_type = np.int64(buf[i])
            if tlv_type == p.EXTENDED_TLV:
                tlv_type = np.int64(buf[i + 2])
                i += 5 + (np.int64(buf[i + 3]) | (np.int64(buf[i + 4]) << 8))
            else:
                i += 2 + np.int64(buf[i + 1])
            for w in range(words):
                masks[k, w] |= type_groups[tlv_type, w]
        source = np.int64(buf[pos + p.OFF_SOURCE])
        for w in range(words):
            masks[k, w] &= source_groups[source, w]


@njit(**_JIT)
def _group_runs(offsets, masks, n, groups, first, counts, sizes, runs):
    """Runs of each group from the per-message masks; returns the runs needed, filling only if they fit.

    A run starts where a group's bit turns on and ends where it turns off, so
    the work is proportional to messages plus runs, not messages times groups.
    """
    words = masks.shape[1]
    for g in range(groups):
        counts[g] = 0
    total = 0
    for w in range(words):
        prev = _ZERO
        for k in range(n):
            cur = masks[k, w]
            starts = cur & ~prev
            g = w * 64
            while starts != _ZERO:
                if starts & _ONE:
                    counts[g] += 1
                    total += 1
                starts >>= _ONE
                g += 1
            prev = cur
    if 2 * total > len(runs):
        return total
    acc = 0
    for g in range(groups):
        first[g] = acc
        acc += counts[g]
        counts[g] = 0
        sizes[g] = 0
    for w in range(words):
        prev = _ZERO
        for k in range(n + 1):
            cur = masks[k, w] if k < n else _ZERO
            changed = cur ^ prev
            on = cur
            g = w * 64
            pos = offsets[k]
            while changed != _ZERO:
                if changed & _ONE:
                    slot = first[g] + counts[g]
                    if on & _ONE:
                        runs[2 * slot] = pos
                    else:
                        runs[2 * slot + 1] = pos
                        sizes[g] += pos - runs[2 * slot]
                        counts[g] += 1
                changed >>= _ONE
                on >>= _ONE
                g += 1
            prev = cur
    return total


def route(buf: np.ndarray, scanned: ScanBuffers, count: int, tables: GroupTables, out: RouteBuffers) -> RouteBuffers:
    """Split the forwarded messages of the last scan of ``buf`` into runs per subscriber group.

    ``scanned`` and ``count`` are that scan's buffers and message count. One
    pass gives every message a mask of the groups that want it, a second cuts
    the runs; ``out`` is returned, grown if this batch needed more room.
    """
    out = _fitted(out, tables, scanned)
    _group_masks(
        buf,
        scanned.offsets,
        scanned.verdicts,
        count,
        tables.type_groups,
        tables.source_groups,
        tables.untyped,
        out.masks,
    )
    needed = _group_runs(scanned.offsets, out.masks, count, tables.groups, out.first, out.counts, out.sizes, out.runs)
    return _runs_fitted(out, tables, scanned, count, needed)


def _fitted(out: RouteBuffers, tables: GroupTables, scanned: ScanBuffers) -> RouteBuffers:
    """``out``, or new buffers when it is too small for these groups or this scan."""
    words = tables.type_groups.shape[1]
    if out.masks.shape[1] != words or len(out.counts) < tables.groups or out.capacity < scanned.capacity:
        return RouteBuffers(max(out.capacity, scanned.capacity), tables.groups)
    return out


def _runs_fitted(out: RouteBuffers, tables: GroupTables, scanned: ScanBuffers, count: int, needed: int) -> RouteBuffers:
    """Cut the runs again into a larger array when the batch had more runs than ``out.runs`` holds."""
    if 2 * needed > len(out.runs):
        out.runs = np.zeros(2 * needed, dtype=np.int64)
        _group_runs(scanned.offsets, out.masks, count, tables.groups, out.first, out.counts, out.sizes, out.runs)
    return out


@njit(**_JIT)
def _scan_route(
    buf,
    start,
    end,
    domain,
    max_payload,
    verify,
    type_allowed,
    offsets,
    verdicts,
    runs,
    counts,
    crc_tables,
    type_groups,
    source_groups,
    untyped,
    groups,
    masks,
    first,
    group_counts,
    sizes,
    group_runs,
):
    n, pos, fault, n_runs, forwarded, n_controls = _scan(
        buf, start, end, domain, max_payload, verify, type_allowed, offsets, verdicts, runs, counts, crc_tables
    )
    _group_masks(buf, offsets, verdicts, n, type_groups, source_groups, untyped, masks)
    needed = _group_runs(offsets, masks, n, groups, first, group_counts, sizes, group_runs)
    return n, pos, fault, n_runs, forwarded, n_controls, needed


def scan_and_route(
    buf: np.ndarray,
    start: int,
    end: int,
    tables: KernelTables,
    out: ScanBuffers,
    groups: GroupTables,
    routed: RouteBuffers,
    counts: np.ndarray | None = None,
) -> tuple[ScanResult, RouteBuffers]:
    """``scan_into`` and ``route`` in one compiled call: what the relay runs while any subscriber has a filter.

    Returns the scan's result and the route buffers (``routed``, or larger
    ones if this batch needed them).
    """
    scan_args = _scan_args(buf, start, end, tables, out, counts)
    routed = _fitted(routed, groups, out)
    *scanned, needed = _scan_route(
        *scan_args,
        groups.type_groups,
        groups.source_groups,
        groups.untyped,
        groups.groups,
        routed.masks,
        routed.first,
        routed.counts,
        routed.sizes,
        routed.runs,
    )
    result = ScanResult(*scanned)
    return result, _runs_fitted(routed, groups, out, result.count, needed)


def crc32(data: np.ndarray, value: int = 0) -> int:
    """CRC-32 of a uint8 array, the same as ``zlib.crc32(data, value)``."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    return int(_crc32(data, 0, len(data), value & 0xFFFFFFFF, CRC_TABLES))


def message_crc(buf: np.ndarray, pos: int = 0) -> int:
    """The checksum a message at ``pos`` should carry."""
    end = _next_message_end(buf, pos, len(buf))
    if end < 0:
        raise ValueError("no complete message at that offset")
    return int(_message_crc(buf, pos, end - pos, CRC_TABLES))


@njit(**_JIT)
def _stamp_batch(buf, size, count, first_sequence, timestamp_ns, checksums, crc_tables):
    for i in range(count):
        pos = i * size
        seq = first_sequence + i
        for k in range(8):
            buf[pos + p.OFF_SEQUENCE + k] = (seq >> (8 * k)) & 0xFF
            buf[pos + p.OFF_TIMESTAMP + k] = (timestamp_ns >> (8 * k)) & 0xFF
        if checksums:
            checksum = _message_crc(buf, pos, size, crc_tables)
            for k in range(4):
                buf[pos + p.OFF_CHECKSUM + k] = (checksum >> (8 * k)) & 0xFF


def stamp_batch(
    batch: np.ndarray, message_size: int, first_sequence: int, timestamp_ns: int, checksums: bool = True
) -> None:
    """Renumber a batch of equal-size messages in place and refresh their checksums.

    Lets a publisher reuse one buffer built by ``protocol.build_batch``.
    """
    if message_size < p.HEADER_SIZE or len(batch) % message_size:
        raise ValueError("batch is not a whole number of messages of that size")
    count = len(batch) // message_size
    _stamp_batch(batch, message_size, count, _as_int64(first_sequence), _as_int64(timestamp_ns), checksums, CRC_TABLES)


def _as_int64(value: int) -> int:
    """The int64 with the same 64 bits as ``value``: the kernel writes the bytes, not the sign."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value
