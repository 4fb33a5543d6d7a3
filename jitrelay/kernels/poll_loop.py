"""The relay's reads in one compiled call per wake-up: ``epoll_wait``, ``recv`` into the log, the read loop.

The relay keeps an epoll set of its own with the publishers that send
ordinary data (``server/polled_reads.py``); the event loop watches that one
descriptor. When it is ready, ``read_ready`` asks it which sockets have
something (``epoll_wait`` with no timeout), reads each straight into the
log's ring at the head, after the unfinished message its last read left
(the slot's carry), and runs the read loop (``read_loop.forward_read``) on
the read where it landed: scan, commit, fan-out; the unfinished message after
the last whole one becomes the slot's carry. It goes on until nothing is
ready or ``len(reports)`` reads were made, and stops at the first read that
needs Python: anything but whole forwarded messages (and the start of one
more), a close, a failure, a target left short, no room even for the
carry, a carry over the limit. Near the ring's end a read is cut to what is
left before the mirror's end. Each read it made is one row of
``reports``, which the relay's figures and bookkeeping read afterwards.

Connections are slots: ``slot_fd``, ``slot_origin`` (the connection id the
log's batch index records), ``slot_filled`` and ``slot_carry`` (the carry's
length, and the address of a buffer holding it) and ``slot_counts`` (the
verdict tallies, one row per slot). The epoll set's entries carry their
slot number as their data.

It does I/O (``epoll_wait``, ``recv``, and ``sendmsg`` through the send
loop), so it lives beside the send and read loops; its tests run it on
socket pairs in every build.
"""

from __future__ import annotations

import ctypes

import numpy as np

from jitrelay.core import protocol as p
from jitrelay.kernels.constants import (
    EPOLL_DATA_AT,
    EPOLL_EVENT_BYTES,
    LOG_HEAD,
    LOG_MIRROR,
    LOG_RESERVE,
    LOG_SIZE,
    POLL_ARRIVED,
    POLL_AT,
    POLL_BEGAN,
    POLL_BYTES,
    POLL_ENDED,
    POLL_FORWARDED,
    POLL_GOT,
    POLL_KIND,
    POLL_MESSAGES,
    POLL_SHORT,
    POLL_SLOT,
    POLL_START,
    POLL_WORDS,
    POLLED_CARRY,
    POLLED_CLOSED,
    POLLED_FAILED,
    POLLED_FORWARDED,
    POLLED_JUDGED,
    POLLED_NO_ROOM,
    POLLED_NOT_TAKEN,
    POLLED_UNFINISHED,
    READ_FORWARDED,
    READ_JUDGED,
    STAGE_ALL,
    STAGE_JUDGE,
)
from jitrelay.kernels.loops import _MEMCPY, _c_function, _u32, kernel
from jitrelay.kernels.read_loop import _now, forward_read

MSG_DONTWAIT = 0x40

_EPOLL_WAIT = _c_function(None, "epoll_wait", [ctypes.c_int, ctypes.c_size_t, ctypes.c_int, ctypes.c_int], ctypes.c_int)
_RECV = _c_function(None, "recv", [ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int], ctypes.c_ssize_t)


@kernel
def _unfinished(ring, at, end, max_payload):
    """Whether ``ring[at:end]``, holding no whole message, is the start of one: the scan found no fault in it."""
    if end - at >= 4 and _u32(ring, at) != p.MAGIC:
        return False
    return end - at < p.HEADER_SIZE or _u32(ring, at + p.OFF_PAYLOAD_SIZE) <= max_payload


@kernel
def _keep_rest(slot_carry, slot_filled, slot, address, from_, rest):
    """What follows the last whole message (``rest`` bytes at ring offset ``from_``) becomes the slot's carry."""
    if rest:
        _MEMCPY(np.uint64(slot_carry[slot]), address + np.uint64(from_), np.uint64(rest))
    slot_filled[slot] = rest


# fmt: off
@kernel
def _read_slot(
    slot, reports, r, slot_fd, slot_origin, slot_filled, slot_carry, slot_counts, carry_limit, ring, domain,
    max_payload, checksum_policy, type_allowed, version_allowed, offsets, verdicts, runs, scratch, crc_tables, state,
    starts, origins, first_message, fds, iov_first, iov_count, iovecs, msghdr, sent, totals, timespec, tally,
    judge_only, groups, type_groups, source_groups, untyped, masks, group_first, group_counts, group_sizes,
    group_bounds, target_group, placed, shared, cursor_mode, cursor_position, cursor_group,
    cursor_counts,
):
    """One read of ``slot`` into the log at the head, forwarded if it may be; its report in ``reports[r]``.

    True: stop here. (Rows and the slot's tallies are indexed, never sliced: a
    view would need numba's runtime, which the ahead-of-time module leaves out.)
    """
    address = np.uint64(ring.ctypes.data)
    size = state[LOG_SIZE]
    reserve = state[LOG_RESERVE]
    at = state[LOG_HEAD] % size
    reports[r, POLL_AT] = at
    # Near the ring's end a read is cut to what is left before the mirror's end (which the log keeps free then).
    room = min(reserve, size + state[LOG_MIRROR] - at)
    filled = slot_filled[slot]
    if room <= filled:
        reports[r, POLL_KIND] = POLLED_NO_ROOM
        return True
    if filled:
        _MEMCPY(address + np.uint64(at), np.uint64(slot_carry[slot]), np.uint64(filled))
    fd = slot_fd[slot]
    into = address + np.uint64(at + filled)
    got = np.int64(_RECV(np.int32(fd), into, np.uint64(room - filled), np.int32(MSG_DONTWAIT)))
    reports[r, POLL_ARRIVED] = _now(timespec)
    reports[r, POLL_GOT] = got
    if got <= 0:
        reports[r, POLL_KIND] = POLLED_CLOSED if got == 0 else POLLED_FAILED
        return True
    n = filled + got
    reports[r, POLL_BYTES] = n
    stage = STAGE_JUDGE if judge_only else STAGE_ALL
    status, messages, forwarded, start, short, began, ended = forward_read(
        ring, at, at + n, domain, max_payload, checksum_policy, type_allowed, version_allowed, offsets, verdicts,
        runs, scratch, crc_tables, tally, state, starts, origins, first_message, slot_origin[slot], fds, fd,
        iov_first, iov_count, iovecs, msghdr, sent, totals, np.int64(address), timespec, stage, 0, 0, groups,
        type_groups, source_groups, untyped, masks, group_first, group_counts, group_sizes, group_bounds, target_group,
        placed, shared, cursor_mode, cursor_position, cursor_group, cursor_counts,
    )
    if status == READ_JUDGED:  # for the journal first: Python sends it on (``PollLoop.send_judged``)
        reports[r, POLL_MESSAGES] = messages
        reports[r, POLL_FORWARDED] = forwarded
        slot_filled[slot] = n
        reports[r, POLL_KIND] = POLLED_JUDGED
        return True
    if status == READ_FORWARDED:
        for v in range(len(tally)):
            slot_counts[slot, v] += tally[v]
            tally[v] = 0
        reports[r, POLL_MESSAGES] = messages
        reports[r, POLL_FORWARDED] = forwarded
        reports[r, POLL_START] = start
        reports[r, POLL_SHORT] = short
        reports[r, POLL_BEGAN] = began
        reports[r, POLL_ENDED] = ended
        _keep_rest(slot_carry, slot_filled, slot, address, at + forwarded, n - forwarded)
        reports[r, POLL_KIND] = POLLED_FORWARDED
    elif messages == 0 and _unfinished(ring, at, at + n, max_payload):
        _keep_rest(slot_carry, slot_filled, slot, address, at, n)
        reports[r, POLL_KIND] = POLLED_UNFINISHED
    else:
        slot_filled[slot] = n  # the read and its carry, where they landed: Python takes them from there
        reports[r, POLL_KIND] = POLLED_NOT_TAKEN
        return True
    if slot_filled[slot] > carry_limit:
        reports[r, POLL_KIND] = POLLED_CARRY
        return True
    return short > 0


@kernel
def read_ready(
    epfd, ready, slot_fd, slot_origin, slot_filled, slot_carry, slot_counts, carry_limit, reports, ring, domain,
    max_payload, checksum_policy, type_allowed, version_allowed, offsets, verdicts, runs, scratch, crc_tables, state,
    starts, origins, first_message, fds, iov_first, iov_count, iovecs, msghdr, sent, totals, timespec, tally,
    judge_only, groups, type_groups, source_groups, untyped, masks, group_first, group_counts, group_sizes,
    group_bounds, target_group, placed, shared, cursor_mode, cursor_position, cursor_group,
    cursor_counts,
):
    """Read every ready slot of ``epfd`` into the log and forward it, until nothing is ready or Python is needed.

    ``ready`` is scratch for ``epoll_wait`` (``EPOLL_EVENT_BYTES`` per
    event). Returns how many rows of ``reports`` (``POLL_WORDS`` int64 each,
    ``POLL_*`` columns) it wrote; only the last can be other than
    ``POLLED_FORWARDED`` or ``POLLED_UNFINISHED``, or have targets left short.
    ``tally`` is zeroed scratch for one read's verdicts, left zeroed. With
    ``judge_only`` (a relay that journals before it forwards) a read of whole
    forwarded messages is judged only and stops the call (``POLLED_JUDGED``).
    The group arguments are ``read_loop.forward_read``'s (what filtered
    targets get), and so are ``shared`` and the cursor table's arrays.
    """
    most = len(ready) // EPOLL_EVENT_BYTES
    made = 0
    while made < len(reports):
        n_ready = _EPOLL_WAIT(np.int32(epfd), np.uint64(ready.ctypes.data), np.int32(most), np.int32(0))
        if n_ready <= 0:
            return made
        for e in range(n_ready):
            slot = _u32(ready, EPOLL_EVENT_BYTES * e + EPOLL_DATA_AT)
            for k in range(POLL_WORDS):
                reports[made, k] = 0
            reports[made, POLL_SLOT] = slot
            made += 1
            if _read_slot(
                slot, reports, made - 1, slot_fd, slot_origin, slot_filled, slot_carry, slot_counts, carry_limit, ring,
                domain, max_payload, checksum_policy, type_allowed, version_allowed, offsets, verdicts, runs, scratch,
                crc_tables, state, starts, origins, first_message, fds, iov_first, iov_count, iovecs, msghdr, sent,
                totals, timespec, tally, judge_only, groups, type_groups, source_groups, untyped, masks, group_first,
                group_counts, group_sizes, group_bounds, target_group, placed, shared, cursor_mode, cursor_position,
                cursor_group, cursor_counts,
            ) or made == len(reports):
                return made
    return made
# fmt: on
