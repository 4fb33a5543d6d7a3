"""The relay's read path in one compiled call: judge a read where it landed in the log, commit it, fan it out.

A read that a publisher's socket put straight into the log's ring (at the
head) is, in the ordinary case, a run of whole messages that are all
forwarded. For that case the whole path runs here without returning to
Python: the scan (``loops.scan``), the log's bookkeeping (what an append
evicts, the batch index, the ring's mirror), the iovecs of the batch's one or
two pieces of the ring, and the send loop (``send_loop.send_all``) to every
subscriber keeping up. Anything else (a rejected message, a control, a fault,
nothing whole yet) is left exactly as it was, the verdicts tallied only into
scratch counts, and the caller takes the usual way.

It does I/O (``sendmsg`` through the send loop, ``clock_gettime`` for the
relay's own figures), so it lives beside the send loop, out of the pure
``loops``; its tests run it on socket pairs in every build.

The log's scalars travel in ``state`` (``LOG_*`` slots), read and written
back here, so that the call passes arrays and a few integers only. While
local readers map the log, each commit also publishes the new extent in the
mapped header and wakes them (``_publish``): one ``futex`` call, as the
relay's Python side does after its own appends.
"""

from __future__ import annotations

import ctypes

import numpy as np
from numba import config, types
from numba.extending import intrinsic

from jitrelay.core import protocol as p
from jitrelay.core.shared_log import W_HEAD, W_HEAD_MESSAGE, W_SEQUENCE, W_TAIL, W_TAIL_MESSAGE, W_WAKE
from jitrelay.kernels.constants import (
    CURSOR_BEHIND,
    LOG_BATCH_CAPACITY,
    LOG_HEAD,
    LOG_HI,
    LOG_KEEP,
    LOG_LO,
    LOG_MESSAGES,
    LOG_MIRROR,
    LOG_RESERVE,
    LOG_SIZE,
    LOG_TAIL,
    READ_FORWARDED,
    READ_JUDGED,
    READ_NOT_TAKEN,
    STAGE_JUDGE,
    STAGE_SEND,
)
from jitrelay.kernels.futex import EVERYONE, FUTEX_WAKE, SYS_FUTEX
from jitrelay.kernels.loops import _MEMCPY, _c_function, group_iovecs, group_masks, group_runs, kernel, scan
from jitrelay.kernels.send_loop import send_all

CLOCK_MONOTONIC = 1

_CLOCK_GETTIME = _c_function(None, "clock_gettime", [ctypes.c_int, ctypes.c_size_t], ctypes.c_int)
_SYSCALL = _c_function(
    None, "syscall",
    [ctypes.c_long, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int],
    ctypes.c_long,
)  # fmt: skip

if config.DISABLE_JIT:  # type: ignore[attr-defined]  # numba sets its config attributes at import

    def _stores_in_order() -> None:
        """Plain Python makes its stores in program order."""

else:

    @intrinsic
    def _stores_in_order(typingctx):
        """A release fence: the stores before it are made before the ones after it, by the compiler and the CPU.

        A seqlock's writer needs it twice: else the compiler may drop the
        first, odd, bump of the sequence (the second overwrites it) or move
        the words it guards past it.
        """

        def codegen(context, builder, signature, args):
            builder.fence("release")
            return context.get_dummy_value()

        return types.none(), codegen


@kernel
def _now(timespec):
    """CLOCK_MONOTONIC in nanoseconds: ``time.perf_counter_ns``'s clock on Linux."""
    _CLOCK_GETTIME(np.int32(CLOCK_MONOTONIC), np.uint64(timespec.ctypes.data))
    return timespec[0] * 1_000_000_000 + timespec[1]


@kernel
def _first_at_or_after(starts, lo, hi, value):
    """``lo + searchsorted(starts[lo:hi], value, "left")``: the first batch starting at or after ``value``."""
    while lo < hi:
        mid = (lo + hi) // 2
        if starts[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@kernel
def _tail_after(forwarded, state, starts):
    """``RelayLog.tail_after``: the tail an append of ``forwarded`` bytes leaves; whole batches go until it fits."""
    head = state[LOG_HEAD]
    lo = state[LOG_LO]
    hi = state[LOG_HI]
    needed = head + forwarded + state[LOG_RESERVE] - state[LOG_SIZE]
    keep = lo
    if needed > state[LOG_TAIL]:
        keep = _first_at_or_after(starts, lo, hi, needed)
    keep = max(keep, hi - state[LOG_BATCH_CAPACITY] + 1)
    return starts[keep] if keep < hi else head


@kernel
def _evicts_needed(forwarded, state, starts, cursor_mode, cursor_position, cursor_group, cursor_counts):
    """Whether committing ``forwarded`` bytes would evict what someone still needs.

    That is, past ``LOG_KEEP`` (what Python keeps for filtered cursors behind
    and readers of the mapped log) or past the position of an unfiltered
    cursor behind in the cursor table. The table's slots are read only when
    the commit evicts anything and its ``cursor_counts`` (cursors per mode)
    say that some cursor is behind.
    """
    tail = _tail_after(forwarded, state, starts)
    if tail <= state[LOG_TAIL]:
        return False
    if tail > state[LOG_KEEP]:
        return True
    if len(cursor_counts) <= CURSOR_BEHIND or cursor_counts[CURSOR_BEHIND] == 0:
        return False
    for s in range(len(cursor_mode)):
        if cursor_mode[s] == CURSOR_BEHIND and cursor_group[s] < 0 and cursor_position[s] < tail:
            return True
    return False


@kernel
def _commit(ring, at, forwarded, n, origin, state, starts, origins, first_message):
    """``RelayLog.commit`` of ``forwarded`` bytes read in at ``at`` (``n`` messages), checked by the caller."""
    size = state[LOG_SIZE]
    mirror = state[LOG_MIRROR]
    head = state[LOG_HEAD]
    tail = state[LOG_TAIL]
    lo = state[LOG_LO]
    hi = state[LOG_HI]
    new_tail = _tail_after(forwarded, state, starts)
    if new_tail != tail:
        lo = _first_at_or_after(starts, lo, hi, new_tail)
        tail = new_tail
    # The bytes are in: a read that ran into the mirror belongs at the ring's start, and the start's mirror repeats it.
    stop = at + forwarded
    base = np.uint64(ring.ctypes.data)
    if stop > size:
        _MEMCPY(base, base + np.uint64(size), np.uint64(stop - size))
    if at < mirror:
        _MEMCPY(base + np.uint64(size + at), base + np.uint64(at), np.uint64(min(mirror, stop) - at))
    starts[hi] = head
    origins[hi] = origin
    first_message[hi] = state[LOG_MESSAGES]
    state[LOG_HI] = hi + 1
    state[LOG_LO] = lo
    state[LOG_TAIL] = tail
    state[LOG_HEAD] = head + forwarded
    state[LOG_MESSAGES] += n


@kernel
def _publish(shared, state, first_message):
    """Readers of the mapped log see the new extent, then wake (``shared_log.publish``, ``SharedLogMemory.wake``).

    ``shared`` is the mapped log's header, or empty while no reader maps it.
    """
    if len(shared) <= W_WAKE:
        return
    messages = state[LOG_MESSAGES]
    lo = state[LOG_LO]
    oldest = messages
    if lo < state[LOG_HI]:
        oldest = first_message[lo]
    shared[W_SEQUENCE] += 1
    _stores_in_order()
    shared[W_HEAD] = state[LOG_HEAD]
    shared[W_HEAD_MESSAGE] = messages
    shared[W_TAIL] = state[LOG_TAIL]
    shared[W_TAIL_MESSAGE] = oldest
    _stores_in_order()
    shared[W_SEQUENCE] += 1
    shared[W_WAKE] = (shared[W_WAKE] + 1) & 0xFFFFFFFF
    word = np.uint64(shared.ctypes.data) + np.uint64(8 * W_WAKE)
    _SYSCALL(SYS_FUTEX, word, np.int32(FUTEX_WAKE), np.int32(EVERYONE), np.uint64(0), np.uint64(0), np.int32(0))


@kernel
def _aim_everyone(at, forwarded, size, address, targets, iov_first, iov_count, iovecs):
    """Every target's iovecs: the batch's one or two pieces of the ring."""
    first = min(forwarded, size - at)
    iovecs[0] = address + at
    iovecs[1] = first
    pieces = 1
    if first < forwarded:
        iovecs[2] = address
        iovecs[3] = forwarded - first
        pieces = 2
    for t in range(targets):
        iov_first[t] = 0
        iov_count[t] = pieces
    return pieces


@kernel
def _route(ring, offsets, verdicts, n, groups, type_groups, source_groups, untyped, masks, first, counts, sizes, bounds,
           iovecs):  # fmt: skip
    """Each filtered group's runs of a read of ``n`` forwarded messages; False when they would not fit the arrays."""
    if n + 1 > masks.shape[0]:
        return False
    group_masks(ring, offsets, verdicts, n, type_groups, source_groups, untyped, masks)
    needed = group_runs(offsets, masks, n, groups, first, counts, sizes, bounds)
    # Every group's runs, each cut at most once more where the ring wraps, after the batch's own two pieces.
    return 2 * needed <= len(bounds) and 2 * (2 + needed + groups) <= len(iovecs)


@kernel
def _aim_groups(runs, head, pieces, size, address, groups, first, counts, bounds, iovecs, target_group, iov_first,
                iov_count, placed):  # fmt: skip
    """Filtered targets' iovecs: their group's runs where the batch landed in the ring, after the batch's pieces."""
    group_iovecs(runs, 1, head, first, counts, bounds, groups, address, size, iovecs, pieces, placed)
    for t in range(len(iov_first)):
        g = target_group[t]
        if g >= 0:
            iov_first[t] = placed[g]
            iov_count[t] = placed[groups + g]


# fmt: off
@kernel
def forward_read(
    ring, at, end, domain, max_payload, checksum_policy, type_allowed, version_allowed, offsets, verdicts, runs,
    scratch, crc_tables, counts, state, starts, origins, first_message, origin, fds, skip, iov_first, iov_count,
    iovecs, msghdr, sent, totals, address, timespec, stage, judged_messages, judged_bytes, groups, type_groups,
    source_groups, untyped, masks, group_first, group_counts, group_sizes, group_bounds, target_group, placed, shared,
    cursor_mode, cursor_position, cursor_group, cursor_counts,
):
    """Scan ``ring[at:end]``; if it starts with whole forwarded messages only, commit and send them.

    Returns ``(status, messages, forwarded bytes, stream start, targets left
    short, send began, send ended)``: ``READ_FORWARDED`` when the batch went
    to the log and out (``counts`` tallied, ``state`` and the batch index
    moved, ``sent``/``totals`` as the send loop leaves them; a partial
    message after it stays where it is), else ``READ_NOT_TAKEN`` with
    nothing changed but ``scratch`` and the scan buffers. Nor is a read
    whose commit would evict what a cursor behind still needs
    (``_evicts_needed``, over the ``cursor_*`` arrays of the cursor table).

    ``stage`` splits the call for a relay that journals before forwarding:
    ``STAGE_JUDGE`` stops after the scan (``READ_JUDGED`` when it would have
    gone on), and ``STAGE_SEND`` goes on from there for the same read, the
    scan's figures given back as ``judged_messages`` and ``judged_bytes``.

    With ``groups`` filtered groups (``group_masks``' tables, then
    ``group_runs``' and ``group_iovecs``' outputs), each target whose
    ``target_group`` is one gets that group's runs of the batch, the others
    all of it: ``placed`` holds each group's first iovec, iovec count and
    bytes afterwards. A read whose groups' runs do not fit the arrays is not
    taken. The judge stage routes; the send stage uses what it left.

    ``shared``: the mapped log's header (else empty); a commit is published
    there and its readers woken before the sockets are sent it.
    """
    if stage == STAGE_SEND:
        n, forwarded, clean = judged_messages, judged_bytes, True
    else:
        for v in range(len(scratch)):
            scratch[v] = 0
        n, consumed, fault, n_runs, forwarded, controls = scan(
            ring, at, end, domain, max_payload, checksum_policy, type_allowed, version_allowed,
            offsets, verdicts, runs, scratch, crc_tables,
        )  # fmt: skip
        clean = forwarded > 0 and forwarded == consumed - at and controls == 0 and fault == p.NO_FAULT
    size = state[LOG_SIZE]
    head = state[LOG_HEAD]
    if (
        not clean
        or at != head % size
        or forwarded > size - state[LOG_RESERVE]
        or at + forwarded > size + state[LOG_MIRROR]
        or state[LOG_HI] >= len(starts)
        or _evicts_needed(forwarded, state, starts, cursor_mode, cursor_position, cursor_group, cursor_counts)
    ):
        return READ_NOT_TAKEN, n, forwarded, head, 0, 0, 0
    if (
        groups > 0
        and stage != STAGE_SEND
        and not _route(
            ring, offsets, verdicts, n, groups, type_groups, source_groups, untyped, masks, group_first, group_counts,
            group_sizes, group_bounds, iovecs,
        )
    ):  # fmt: skip
        return READ_NOT_TAKEN, n, forwarded, head, 0, 0, 0
    if stage == STAGE_JUDGE:
        return READ_JUDGED, n, forwarded, head, 0, 0, 0
    _commit(ring, at, forwarded, n, origin, state, starts, origins, first_message)
    for v in range(len(scratch)):
        counts[v] += scratch[v]
    _publish(shared, state, first_message)
    pieces = _aim_everyone(at, forwarded, size, address, len(fds), iov_first, iov_count, iovecs)
    if groups > 0:
        _aim_groups(
            runs, head, pieces, size, address, groups, group_first, group_counts, group_bounds, iovecs, target_group,
            iov_first, iov_count, placed,
        )  # fmt: skip
    began = _now(timespec)
    short = send_all(fds, skip, iov_first, iov_count, iovecs, msghdr, sent, totals)
    return READ_FORWARDED, n, forwarded, head, short, began, _now(timespec)
# fmt: on
