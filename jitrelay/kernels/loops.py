"""The kernels' loops: plain ``@njit`` functions over uint8 buffers and integer arrays.

This is the code that runs on every batch; ``kernels`` is its public face
(validation, allocation, result types). The loops take and return arrays
and integers only, never allocate, and never see a Python object, so the
same functions serve three ways: compiled ahead of time into a small
extension module by ``aot`` (what the relay runs: no numba in the process),
compiled just in time by numba (``JITRELAY_KERNELS=jit``, or when no C
compiler is at hand), and as plain Python under ``NUMBA_DISABLE_JIT=1``,
which is how the tests measure their coverage.

The scan is one tight loop and, for domains that verify, a second: framing,
the TLV walk, runs and tallies in one pass; then CRC-32 over the messages
still accepted, after which the runs are made again from the verdicts only if
a checksum failed. Keeping the CRC out of the framing loop more than doubles
its speed (the compiler keeps the walk's state in registers). The loops index
the buffer by unsigned integers (``buf[np.uint64(i)]``): numba wraps a
negative signed index with a compare and a select on every access, which also
keeps LLVM from merging a header field's byte loads into one load. CRC-32 is a
slicing-by-8 loop for short ranges and zlib's own ``crc32``, called as C, for
long ones.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

import llvmlite.binding as llvm
import numpy as np
from numba import config, njit, types
from numba.core.typing.ctypes_utils import from_ctypes

from jitrelay.core import protocol as p

# How every loop is compiled: cached on disk under the JIT, and without the GIL so the metrics thread runs.
kernel = njit(cache=True, nogil=True)


def _c_function(library: str | None, name: str, argtypes: list, restype: Any) -> Any:
    """A C function the loops call directly, as an external symbol linked by its own name.

    Its numba signature is the one its C types map to (``size_t`` to ``uintp``, ``int`` to ``int32``, ...).

    Compiled ahead of time, the extension module links the library itself.
    Under the JIT the symbol is registered with LLVM at import, so cached
    kernels link to this process's copy; a ctypes function passed as an
    argument would work too, but numba types it on every call (about 2 us).
    Without the JIT (``NUMBA_DISABLE_JIT=1``) the loops call the ctypes function.
    """
    fn = getattr(ctypes.CDLL(library), name)
    fn.argtypes = argtypes
    fn.restype = restype
    if config.DISABLE_JIT:  # type: ignore[attr-defined]  # numba sets its config attributes at import
        return fn
    llvm.add_symbol(name, ctypes.cast(fn, ctypes.c_void_p).value)
    return types.ExternalFunction(name, from_ctypes(restype)(*map(from_ctypes, argtypes)))


def zlib_library() -> str:
    """The zlib shared library's name, for ``ctypes`` here and for the linker in ``aot``."""
    name = ctypes.util.find_library("z")
    if name is None:
        raise ImportError("jitrelay needs the zlib shared library (libz.so.1) for CRC-32")
    return name


# zlib's crc32 (the library behind Python's zlib module) and the C library's
# memcpy: for long ranges both beat what numba generates for the same loops.
_ZLIB_CRC32 = _c_function(zlib_library(), "crc32", [ctypes.c_ulong, ctypes.c_size_t, ctypes.c_uint], ctypes.c_ulong)
_MEMCPY = _c_function(None, "memcpy", [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t], ctypes.c_size_t)


# Below this many bytes a table-driven loop beats a call into zlib (whose fast
# paths need setup); above it zlib's braided CRC is faster.
CRC_ZLIB_MIN = 256


@kernel
def _u32(buf, pos):
    """The little-endian uint32 at ``buf[pos:pos + 4]``, as an int64.

    Indexed by unsigned integers: numba wraps a negative signed index (a
    compare and a select per byte), which keeps LLVM from merging the four
    byte loads; with unsigned indices they compile to one 32-bit load.
    """
    return (
        np.int64(buf[np.uint64(pos)])
        | (np.int64(buf[np.uint64(pos + 1)]) << 8)
        | (np.int64(buf[np.uint64(pos + 2)]) << 16)
        | (np.int64(buf[np.uint64(pos + 3)]) << 24)
    )


@kernel
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


@kernel
def _crc32_zlib(buf, start, end, value):
    return np.int64(_ZLIB_CRC32(np.uint64(value), np.uint64(buf.ctypes.data + start), np.uint32(end - start)))


@kernel
def crc32(buf, start, end, value, crc_tables):
    """CRC-32 of ``buf[start:end]`` continuing from ``value`` (as ``zlib.crc32``); returns the new value.

    Short spans use the slicing-by-8 ``crc_tables``; longer ones call zlib's own ``crc32``.
    """
    if end - start < CRC_ZLIB_MIN:
        return _crc32_table(buf, start, end, value, crc_tables)
    return _crc32_zlib(buf, start, end, value)


@kernel
def message_crc(buf, pos, length, crc_tables):
    """The checksum of the ``length``-byte message at ``pos``: header bytes 0..27, then the payload."""
    head = _crc32_table(buf, pos, pos + p.CHECKSUM_COVERED, np.int64(0), crc_tables)
    if length < CRC_ZLIB_MIN:
        return _crc32_table(buf, pos + p.HEADER_SIZE, pos + length, head, crc_tables)
    return _crc32_zlib(buf, pos + p.HEADER_SIZE, pos + length, head)


@kernel
def _record_at(buf, i, end):
    """The record at ``i``: ``(type, value length, offset of the value)``, or type -1 if its header is cut or bad."""
    if buf[np.uint64(i)] == p.EXTENDED_TLV:
        if i + 5 > end or buf[np.uint64(i + 1)] != 0:
            return -1, 0, i
        return (
            np.int64(buf[np.uint64(i + 2)]),
            np.int64(buf[np.uint64(i + 3)]) | (np.int64(buf[np.uint64(i + 4)]) << 8),
            i + 5,
        )
    if i + 2 > end:
        return -1, 0, i
    return np.int64(buf[np.uint64(i)]), np.int64(buf[np.uint64(i + 1)]), i + 2


@kernel
def _control_verdict(buf, pos, length):
    """CONTROL when a control-domain message holds only well-formed control records, else MALFORMED_TLV."""
    i = pos + p.HEADER_SIZE
    end = pos + length
    if i == end:
        return p.MALFORMED_TLV
    while i < end:
        tlv_type, value_len, i = _record_at(buf, i, end)
        if tlv_type == p.SUBSCRIBE_TLV_TYPES or tlv_type == p.SUBSCRIBE_SOURCES:
            if value_len != p.BITMAP_SIZE:
                return p.MALFORMED_TLV
        elif tlv_type == p.POSITIONS:
            if value_len != 0 and value_len != p.POSITION_SIZE:
                return p.MALFORMED_TLV
        elif tlv_type == p.LAPPED:
            if value_len != p.LAPPED_SIZE:
                return p.MALFORMED_TLV
        elif (
            tlv_type != p.UNSUBSCRIBE and tlv_type != p.PUBLISH_ONLY and tlv_type != p.SHARED_MEMORY
        ) or value_len != 0:
            return p.MALFORMED_TLV
        i += value_len
        if i > end:
            return p.MALFORMED_TLV
    return p.CONTROL


@kernel
def _verdict(buf, pos, length, domain, type_allowed, version_allowed):
    """The verdict of a complete message, short of its checksum.

    A payload that is exactly one standard record filling it (the common
    market-data message) is judged without the TLV walk, to the walk's
    verdict; a first byte of 0 or ``EXTENDED_TLV``, or a record length that
    does not fill the payload, takes the walk.
    """
    if version_allowed[buf[np.uint64(pos + p.OFF_VERSION)]] == 0:
        return p.BAD_VERSION  # control-domain messages are looked at again by ``_controls``
    if buf[np.uint64(pos + p.OFF_DOMAIN)] != domain:
        return p.WRONG_DOMAIN  # and so are these
    i = pos + p.HEADER_SIZE
    end = pos + length
    if length >= p.HEADER_SIZE + 2:
        first = buf[np.uint64(i)]
        if first != 0 and first != p.EXTENDED_TLV and np.int64(buf[np.uint64(i + 1)]) == length - (p.HEADER_SIZE + 2):
            return p.FORWARD if type_allowed[first] != 0 else p.TLV_OUT_OF_RANGE
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


@kernel
def _frame_and_judge(
    buf, start, end, domain, max_payload, type_allowed, version_allowed, offsets, verdicts, runs, counts
):
    """Frame every complete message, judge it short of its checksum, and merge the forwarded ones into runs.

    One pass: writes ``offsets`` and ``verdicts``, the runs of adjacent
    forwarded messages into ``runs``, and tallies each verdict into
    ``counts``. Returns ``(messages, consumed up to, fault, runs, forwarded bytes)``.
    """
    n = 0
    pos = start
    fault = p.NO_FAULT
    n_runs = 0
    n_forward = 0
    forwarded = 0
    run_start = -1
    run_end = -1  # the end of the last forwarded message: the next one continues its run when it starts there
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
        verdict = _verdict(buf, pos, length, domain, type_allowed, version_allowed)
        offsets[np.uint64(n)] = pos
        verdicts[np.uint64(n)] = verdict
        n += 1
        if verdict == p.FORWARD:
            if pos != run_end:
                if run_start >= 0:
                    runs[np.uint64(2 * n_runs)] = run_start
                    runs[np.uint64(2 * n_runs + 1)] = run_end
                    n_runs += 1
                    forwarded += run_end - run_start
                run_start = pos
            run_end = pos + length
            n_forward += 1
        else:
            counts[verdict] += 1
        pos += length
    offsets[np.uint64(n)] = pos
    if run_start >= 0:
        runs[np.uint64(2 * n_runs)] = run_start
        runs[np.uint64(2 * n_runs + 1)] = run_end
        n_runs += 1
        forwarded += run_end - run_start
    counts[p.FORWARD] += n_forward
    return n, pos, fault, n_runs, forwarded


@kernel
def _verify_checksums(buf, offsets, verdicts, n, policy, crc_tables, counts):
    """Judge the checksums of the forwarded messages under ``policy`` (never ``CHECKSUM_OFF``: not called then).

    Under ``CHECKSUM_IF_SET`` a zero checksum means "not computed" and passes.
    A failure moves its message's tally from ``FORWARD`` to ``BAD_CHECKSUM``;
    returns how many failed.
    """
    skip_zero = policy == p.CHECKSUM_IF_SET
    failed = 0
    for k in range(n):
        if verdicts[k] == p.FORWARD:
            pos = offsets[k]
            stored = _u32(buf, pos + p.OFF_CHECKSUM)
            if stored == 0 and skip_zero:
                continue
            if message_crc(buf, pos, offsets[k + 1] - pos, crc_tables) != stored:
                verdicts[k] = p.BAD_CHECKSUM
                failed += 1
    if failed:
        counts[p.FORWARD] -= failed
        counts[p.BAD_CHECKSUM] += failed
    return failed


@kernel
def _runs(offsets, verdicts, n, runs):
    """The runs of adjacent forwarded messages again, from the verdicts: ``(runs, forwarded bytes)``.

    For a batch in which checksums rejected messages the framing loop had forwarded.
    """
    n_runs = 0
    forwarded = 0
    run_start = -1
    run_end = -1
    for k in range(n):
        if verdicts[k] == p.FORWARD:
            pos = offsets[k]
            if pos != run_end:
                if run_start >= 0:
                    runs[2 * n_runs] = run_start
                    runs[2 * n_runs + 1] = run_end
                    n_runs += 1
                    forwarded += run_end - run_start
                run_start = pos
            run_end = offsets[k + 1]
    if run_start >= 0:
        runs[2 * n_runs] = run_start
        runs[2 * n_runs + 1] = run_end
        n_runs += 1
        forwarded += run_end - run_start
    return n_runs, forwarded


@kernel
def _controls(buf, offsets, verdicts, n, policy, crc_tables, counts):
    """Give the control-domain messages among the ``bad_version`` and ``wrong_domain`` ones their verdict.

    A control message carries jitrelay's own ``VERSION`` whatever data
    versions the relay accepts. A pass of its own, run only for batches with
    such a reject, so control messages cost the framing loop nothing. Returns
    how many control messages it found.
    """
    n_controls = 0
    for k in range(n):
        pos = offsets[k]
        before = verdicts[k]
        if (
            (before != p.WRONG_DOMAIN and before != p.BAD_VERSION)
            or buf[pos + p.OFF_DOMAIN] != p.CONTROL_DOMAIN
            or buf[pos + p.OFF_VERSION] != p.VERSION
        ):
            continue
        length = offsets[k + 1] - pos
        verdict = _control_verdict(buf, pos, length)
        stored = _u32(buf, pos + p.OFF_CHECKSUM)
        if (
            verdict == p.CONTROL
            and policy != p.CHECKSUM_OFF
            and (stored != 0 or policy == p.CHECKSUM_REQUIRED)
            and message_crc(buf, pos, length, crc_tables) != stored
        ):
            verdict = p.BAD_CHECKSUM
        verdicts[k] = verdict
        counts[before] -= 1
        counts[verdict] += 1
        if verdict == p.CONTROL:
            n_controls += 1
    return n_controls


@kernel
def scan(
    buf,
    start,
    end,
    domain,
    max_payload,
    checksum_policy,
    type_allowed,
    version_allowed,
    offsets,
    verdicts,
    runs,
    counts,
    crc_tables,
):
    """Frame and judge every complete message in ``buf[start:end]`` and merge the forwarded ones into runs.

    Fills ``offsets[k]`` (start of message k; ``offsets[n]`` is where framing
    stopped), ``verdicts[k]`` (``protocol`` verdict codes), ``runs`` (pairs of
    ``[begin, end)`` byte offsets of adjacent forwarded messages) and adds each
    verdict's count into ``counts``. ``type_allowed`` and ``version_allowed``
    are 256-entry tables, non-zero for what the domain takes;
    ``checksum_policy`` (``protocol.CHECKSUM_*``) says how CRCs are checked,
    with ``crc_tables``.
    Returns ``(messages, consumed up to, fault code, runs, forwarded bytes,
    control messages)``; framing stops at the first stream fault.
    """
    rejected_early = counts[p.WRONG_DOMAIN] + counts[p.BAD_VERSION]
    n, pos, fault, n_runs, forwarded = _frame_and_judge(
        buf, start, end, domain, max_payload, type_allowed, version_allowed, offsets, verdicts, runs, counts
    )
    if checksum_policy != p.CHECKSUM_OFF and _verify_checksums(
        buf, offsets, verdicts, n, checksum_policy, crc_tables, counts
    ):
        n_runs, forwarded = _runs(offsets, verdicts, n, runs)
    n_controls = 0
    if counts[p.WRONG_DOMAIN] + counts[p.BAD_VERSION] != rejected_early:
        n_controls = _controls(buf, offsets, verdicts, n, checksum_policy, crc_tables, counts)
    return n, pos, fault, n_runs, forwarded, n_controls


@kernel
def frame(buf, start, end):
    """Walk the headers of ``buf[start:end]`` without judging anything.

    Returns ``(complete messages, offset after the last one, fault)``; the fault
    is ``BAD_MAGIC`` when a header's magic is wrong, else ``NO_FAULT``.
    """
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


@kernel
def next_message_end(buf, start, end):
    """The end offset of the message starting at ``start``, or -1 while it is not complete in ``buf[:end]``."""
    if end - start < p.HEADER_SIZE:
        return -1
    length = p.HEADER_SIZE + _u32(buf, start + p.OFF_PAYLOAD_SIZE)
    return start + length if end - start >= length else -1


@kernel
def compact(buf, runs, n_runs, out):
    """Copy the first ``n_runs`` ``[begin, end)`` pairs of ``runs`` back to back into ``out`` (libc ``memcpy``).

    Returns the bytes written; ``out`` must hold them all.
    """
    source = buf.ctypes.data
    target = out.ctypes.data
    o = 0
    for k in range(n_runs):
        a = runs[2 * k]
        b = runs[2 * k + 1]
        _MEMCPY(np.uint64(target + o), np.uint64(source + a), np.uint64(b - a))
        o += b - a
    return o


@kernel
def log_append(buf, runs, n_runs, ring, size, mirror, at):
    """Copy the first ``n_runs`` ``[begin, end)`` runs of ``buf`` back to back into a ring, from offset ``at``.

    The ring holds ``size`` bytes plus ``mirror`` more after them: whatever is
    written into its first ``mirror`` bytes is written there too, so a message
    that starts before the end can be read whole without minding the wrap.
    Returns the bytes appended, or -1 (nothing copied) when a run reaches
    outside ``buf`` or the runs hold more than the ring.
    """
    total = 0
    for k in range(n_runs):  # checked first, so that bad runs copy nothing: -1
        a = runs[2 * k]
        b = runs[2 * k + 1]
        if a < 0 or b < a or b > len(buf):
            return -1
        total += b - a
    if total > size:
        return -1
    source = np.uint64(buf.ctypes.data)
    target = np.uint64(ring.ctypes.data)
    o = at
    total = 0
    for k in range(n_runs):
        a = runs[2 * k]
        b = runs[2 * k + 1]
        while a < b:
            n = min(b - a, size - o)
            _MEMCPY(target + np.uint64(o), source + np.uint64(a), np.uint64(n))
            if o < mirror:
                _MEMCPY(target + np.uint64(size + o), source + np.uint64(a), np.uint64(min(n, mirror - o)))
            a += n
            o += n
            total += n
            if o == size:
                o = 0
    return total


_ONE = np.uint64(1)
_ZERO = np.uint64(0)


@kernel
def _group_masks_one_word(buf, offsets, verdicts, n, type_groups, source_groups, untyped, masks):
    """``group_masks`` for up to 64 groups: the mask stays in a register."""
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


@kernel
def group_masks(buf, offsets, verdicts, n, type_groups, source_groups, untyped, masks):
    """For each of the ``n`` scanned messages, the bitmask of subscriber groups that want it.

    ``type_groups[t]`` and ``source_groups[s]`` are the groups (one bit each,
    64 per word) that take TLV type ``t`` or source ``s``; ``untyped`` the groups
    with no type filter. Writes ``masks[k]`` (zero for messages not forwarded);
    returns nothing.
    """
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


@kernel
def group_runs(offsets, masks, n, groups, first, counts, sizes, runs):
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


@kernel
def group_iovecs(scan_runs, n_scan, stream_start, first, counts, runs, groups, address, size, iovecs, at, out):
    """Each group's runs as iovecs into the log's ring, from ``iovecs[2 * at]`` on; returns the iovec after the last.

    ``scan_runs`` are the batch's forwarded runs in the buffer it was scanned
    in, appended back to back to the log from stream offset ``stream_start``;
    ``runs`` are the groups' runs in the same buffer (``route``). A run is
    placed where its bytes landed in the ring of ``size`` bytes at
    ``address``, cut in two where the ring wraps. ``out[g]`` gets group
    ``g``'s first iovec, ``out[groups + g]`` its iovec count and
    ``out[2 * groups + g]`` its bytes.
    """
    k = at
    for g in range(groups):
        out[g] = k
        nbytes = 0
        r = 0
        landed = stream_start  # where scan run ``r`` begins in the stream
        for j in range(first[g], first[g] + counts[g]):
            a = runs[2 * j]
            b = runs[2 * j + 1]
            nbytes += b - a
            while a < b:
                while r < n_scan - 1 and a >= scan_runs[2 * r + 1]:
                    landed += scan_runs[2 * r + 1] - scan_runs[2 * r]
                    r += 1
                piece = min(b, scan_runs[2 * r + 1]) - a
                phys = (landed + a - scan_runs[2 * r]) % size
                if phys + piece > size:
                    piece = size - phys
                iovecs[2 * k] = address + phys
                iovecs[2 * k + 1] = piece
                k += 1
                a += piece
        out[groups + g] = k - out[g]
        out[2 * groups + g] = nbytes
    return k


@kernel
def scan_route(
    buf,
    start,
    end,
    domain,
    max_payload,
    checksum_policy,
    type_allowed,
    version_allowed,
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
    group_run_bounds,
):
    """``scan``, then ``group_masks`` and ``group_runs`` over what it framed: one call for a filtered relay.

    Takes ``scan``'s arguments followed by ``group_masks``' tables and
    ``group_runs``' outputs; returns ``scan``'s six values and the group runs
    needed (when they outnumber what ``group_run_bounds`` holds, ``group_runs`` runs again with room).
    """
    n, pos, fault, n_runs, forwarded, n_controls = scan(
        buf,
        start,
        end,
        domain,
        max_payload,
        checksum_policy,
        type_allowed,
        version_allowed,
        offsets,
        verdicts,
        runs,
        counts,
        crc_tables,
    )
    group_masks(buf, offsets, verdicts, n, type_groups, source_groups, untyped, masks)
    needed = group_runs(offsets, masks, n, groups, first, group_counts, sizes, group_run_bounds)
    return n, pos, fault, n_runs, forwarded, n_controls, needed


@kernel
def stamp_batch(buf, size, count, first_sequence, timestamp_ns, checksums, crc_tables):
    """Renumber ``count`` messages of ``size`` bytes each, back to back in ``buf``, for a synthetic publisher.

    Message i gets sequence ``first_sequence + i`` and ``timestamp_ns``; with
    ``checksums`` its CRC is written too. Returns nothing.
    """
    for i in range(count):
        pos = i * size
        seq = first_sequence + i
        for k in range(8):
            buf[pos + p.OFF_SEQUENCE + k] = (seq >> (8 * k)) & 0xFF
            buf[pos + p.OFF_TIMESTAMP + k] = (timestamp_ns >> (8 * k)) & 0xFF
        if checksums:
            checksum = message_crc(buf, pos, size, crc_tables)
            for k in range(4):
                buf[pos + p.OFF_CHECKSUM + k] = (checksum >> (8 * k)) & 0xFF
