"""The poll loop's face: the relay's own epoll set, its connections as slots, and one call per wake-up.

``poll_loop.read_ready`` reads every ready publisher into the log and
forwards it in one compiled call; this class owns what it works on that is
not the log's: the epoll descriptor, the slots' arrays, the scratch for
``epoll_wait`` and the report rows. Registering a socket (``add``) and
forgetting it (``remove``) are ``epoll_ctl`` calls with the slot as the
entry's data, which Python's ``select.epoll`` cannot set.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
from typing import Any

import numpy as np

from jitrelay.core import protocol as p
from jitrelay.kernels import FanOut, GroupRoute, _bytes, _io_loop
from jitrelay.kernels.constants import (
    EPOLL_DATA_AT,
    EPOLL_EVENT_BYTES,
    LOG_RESERVE,
    POLL_WORDS,
    STAGE_SEND,
)
from jitrelay.kernels.read_path import ReadPath

_EPOLL_EVENT = struct.Struct(f"=I{EPOLL_DATA_AT - 4}xQ")  # events, padding where the ABI has it, data
_EPOLL_CTL_ADD, _EPOLL_CTL_DEL = 1, 2
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.epoll_ctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_char_p]
_LIBC.epoll_ctl.restype = ctypes.c_int


class PollLoop:
    """One relay's epoll set over ``slots`` connection slots, and ``read_ready`` over its log.

    A slot's ``carry`` buffer (its connection's own, at least the log's
    reserve long) holds the unfinished message its last read left, ``filled``
    bytes of it; ``counts`` is its row of verdict tallies.
    """

    def __init__(self, slots: int, path: ReadPath, reads_per_call: int = 16) -> None:
        """Over the log, tables and scan buffers ``path`` (the relay's read loop) was made for, which it shares."""
        self.path = path
        self._reserve = int(path._log[0][LOG_RESERVE])  # a read is at most that long
        if path.capacity < self._reserve:
            raise ValueError("the scan buffers are shorter than a read")
        self.epoll = select.epoll()
        self.fd = np.full(slots, -1, dtype=np.int64)
        self.origin = np.zeros(slots, dtype=np.int64)
        self.filled = np.zeros(slots, dtype=np.int64)
        self.carry = np.zeros(slots, dtype=np.int64)
        self.counts = np.zeros((slots, len(p.VERDICT_NAMES)), dtype=np.int64)
        self.reports = np.zeros((reads_per_call, POLL_WORDS), dtype=np.int64)
        self._ready = np.zeros(EPOLL_EVENT_BYTES * max(slots, 1), dtype=np.uint8)
        self._carriers: list[Any] = [None] * slots  # keeps each slot's carry buffer alive while it is registered
        self._tally = np.zeros(len(p.VERDICT_NAMES), dtype=np.int64)  # one read's verdicts, before the slot's row

    def fileno(self) -> int:
        return self.epoll.fileno()

    def add(self, slot: int, fd: int, origin: int, carry: np.ndarray, filled: int, counts: np.ndarray) -> None:
        """Watch ``fd`` as ``slot``: its carry and tallies move into the slot's arrays (``remove`` gives them back)."""
        if not 0 <= slot < len(self.fd) or self.fd[slot] >= 0:
            raise ValueError(f"slot {slot} is taken or out of range")
        if len(_bytes(carry, "carry", writable=True)) < self._reserve or not 0 <= filled <= len(carry):
            raise ValueError("a carry buffer must hold a whole read")
        event = _EPOLL_EVENT.pack(select.EPOLLIN, slot)
        if _LIBC.epoll_ctl(self.fileno(), _EPOLL_CTL_ADD, fd, event) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"epoll_ctl ADD {fd}: {os.strerror(code)}")
        self.fd[slot] = fd
        self.origin[slot] = origin
        self.filled[slot] = filled
        self.carry[slot] = carry.ctypes.data
        self._carriers[slot] = carry
        self.counts[slot] = counts

    def remove(self, slot: int) -> int:
        """Stop watching ``slot``; the bytes of its carry (the tallies are the caller's to take first)."""
        fd = int(self.fd[slot])
        if fd < 0:
            raise ValueError(f"slot {slot} is not watched")
        if _LIBC.epoll_ctl(self.fileno(), _EPOLL_CTL_DEL, fd, None) != 0 and ctypes.get_errno() != errno.EBADF:
            code = ctypes.get_errno()
            raise OSError(code, f"epoll_ctl DEL {fd}: {os.strerror(code)}")
        self.fd[slot] = -1
        self._carriers[slot] = None
        filled = int(self.filled[slot])
        self.filled[slot] = 0
        return filled

    def read_ready(
        self,
        fan: FanOut,
        targets: int,
        carry_limit: int,
        judge_only: bool = False,
        route: GroupRoute | None = None,
        reads: int = 0,
    ) -> int:
        """Read and forward what is ready (``poll_loop.read_ready``); how many rows of ``reports`` it wrote.

        ``judge_only``: a read of whole forwarded messages is judged, not sent, and ends the call; the caller
        journals it and hands it to ``send_judged``. ``route``: what filtered targets get (``ReadPath.forward``).
        ``reads``: at most this many reads (0: as many as ``reports`` has rows).
        """
        if not 0 <= targets <= len(fan.fds) or len(fan.iovecs) < 4:
            raise ValueError(f"{targets} targets, room for {len(fan.fds)}, or fewer than two iovecs")
        if not 0 <= reads <= len(self.reports):
            raise ValueError(f"{reads} reads in one call, room for {len(self.reports)}")
        reports = self.reports[:reads] if reads else self.reports
        fds, first, count, sent, totals = fan.target_views(targets)
        fan._uniform = None  # every target's slice is the loop's from here
        path = self.path
        return int(
            _io_loop("read_ready")(
                self.fileno(), self._ready, self.fd, self.origin, self.filled, self.carry, self.counts, carry_limit,
                reports, path.ring, *path._scan, *path._log, fds, first, count, fan.iovecs, fan.msghdr, sent,
                totals, path._timespec, self._tally, int(judge_only), *path.route_args(route, targets), path.shared,
                *path.cursors,
            )
        )  # fmt: skip

    def send_judged(
        self,
        fan: FanOut,
        targets: int,
        slot: int,
        read: tuple[int, int],
        judged: tuple[int, int],
        route: GroupRoute | None = None,
    ) -> tuple:
        """Commit and send the read ``read_ready`` judged last (``ring[at:end]`` for ``read``, of ``slot``):
        ``ReadPath.forward``'s ``STAGE_SEND``, the verdicts its judging left in the shared scratch tallied into the
        slot's row."""
        at, end = read
        return self.path.forward(
            at, end, self.counts[slot], int(self.origin[slot]), fan, targets, int(self.fd[slot]), STAGE_SEND, judged,
            route,
        )  # fmt: skip

    def close(self) -> None:
        self.epoll.close()
