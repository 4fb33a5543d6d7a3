"""The relay's fan-out: one compiled call hands a batch to every subscriber that is keeping up.

This is the one place where compiled code does I/O (docs/architecture.md,
"The send loop"). Everything else in ``kernels`` is pure; this module loops
over socket descriptors and calls ``sendmsg(MSG_DONTWAIT | MSG_NOSIGNAL)`` on
each, so that reaching N subscribers costs one call from Python instead of N.
It never blocks, never retries and never decides anything: it reports what
each socket took, and the engine deals with the ones that took less.

Each target names a slice of one shared array of ``struct iovec`` (pairs of
address and length, ``uint64``): the unfiltered subscribers share one slice,
each filtered group has its own. More iovecs than ``IOV_PER_CALL`` are sent in
several calls, as long as each is taken whole. The addresses point into the
relay's log, which the caller keeps alive and unchanged for the call.
"""

from __future__ import annotations

import ctypes

import numpy as np

from jitrelay.kernels.constants import SEND_FAILED, SEND_SKIPPED
from jitrelay.kernels.loops import _c_function, kernel

MSG_DONTWAIT = 0x40
MSG_NOSIGNAL = 0x4000
_FLAGS = MSG_DONTWAIT | MSG_NOSIGNAL
IOV_PER_CALL = 1024  # Linux's UIO_MAXIOV
MSGHDR_WORDS = 7  # struct msghdr on 64-bit Linux: name, namelen, iov, iovlen, control, controllen, flags
SKIPPED = SEND_SKIPPED
FAILED = SEND_FAILED

_SENDMSG = _c_function(None, "sendmsg", [ctypes.c_int, ctypes.c_size_t, ctypes.c_int], ctypes.c_ssize_t)


@kernel
def send_all(fds, skip, iov_first, iov_count, iovecs, msghdr, sent, totals):
    """Send each target ``t`` its iovecs ``iovecs[2 * iov_first[t] :]`` (``iov_count[t]`` of them) on ``fds[t]``.

    ``msghdr`` is a zeroed scratch ``struct msghdr`` (``MSGHDR_WORDS`` words).
    Writes ``sent[t]``: the bytes the socket took, ``FAILED`` when its first
    call failed, ``SKIPPED`` for the descriptor ``skip``; adds what it took to
    ``totals[t]``. Returns how many targets took less than all they were given.
    """
    header = np.uint64(msghdr.ctypes.data)
    base = np.uint64(iovecs.ctypes.data)
    short = 0
    for t in range(len(fds)):
        fd = fds[t]
        if fd == skip:
            sent[t] = SKIPPED
            continue
        total = np.int64(0)
        k = iov_first[t]
        end = k + iov_count[t]
        while k < end:
            n = min(end - k, IOV_PER_CALL)
            wanted = np.int64(0)
            for j in range(k, k + n):
                wanted += np.int64(iovecs[2 * j + 1])
            msghdr[2] = base + np.uint64(16 * k)
            msghdr[3] = np.uint64(n)
            taken = np.int64(_SENDMSG(np.int32(fd), header, np.int32(_FLAGS)))
            if taken < 0:
                short += 1
                if total == 0:
                    total = np.int64(FAILED)
                break
            total += taken
            if taken < wanted:
                short += 1
                break
            k += n
        sent[t] = total
        if total > 0:
            totals[t] += total
    return short
