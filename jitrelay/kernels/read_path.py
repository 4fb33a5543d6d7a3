"""The compiled read path's face: ``read_loop.forward_read`` with what stays the same from read to read bound once.

The relay makes one ``ReadPath`` over its log (ring, state, batch index) and
its scan buffers; the poll loop (``polling.PollLoop``) shares it. Checks of
shapes and types happen here, once, so that the loops see only arrays they
can trust.
"""

from __future__ import annotations

import numpy as np

from jitrelay.core import protocol as p
from jitrelay.core.shared_log import W_WAKE
from jitrelay.kernels import (
    _I64,
    CRC_TABLES,
    NO_ROUTE,
    FanOut,
    GroupRoute,
    KernelTables,
    ScanBuffers,
    _array,
    _bytes,
    _check_tables,
    _io_loop,
)
from jitrelay.kernels.constants import CURSOR_BEHIND, LOG_MIRROR, LOG_SIZE, LOG_STATE_SLOTS, STAGE_ALL

_NOT_SHARED = np.zeros(0, dtype=np.int64)  # no reader maps the log: nothing to publish
_NO_CURSORS = (np.zeros(0, dtype=np.int8), *(np.zeros(0, dtype=np.int64) for _ in range(3)))


class ReadPath:
    """The compiled read path (``read_loop.forward_read``) with what stays the same from read to read bound once.

    The relay makes one, over its log's ring, state and batch index and its
    scan buffers; each read then passes where it landed, the sender's tallies
    and the send loop's targets.
    """

    def __init__(
        self, ring: np.ndarray, tables: KernelTables, out: ScanBuffers, state: np.ndarray, index: tuple[np.ndarray, ...]
    ) -> None:
        _bytes(ring, "ring", writable=True)
        _check_tables(tables)
        if len(_array(state, _I64, 1, "state")) < LOG_STATE_SLOTS:
            raise ValueError(f"the log's state needs {LOG_STATE_SLOTS} slots")
        starts, origins, first_message = (_array(a, _I64, 1, "the batch index") for a in index)
        if not len(starts) == len(origins) == len(first_message):
            raise ValueError("the batch index's columns differ in length")
        if int(state[LOG_SIZE]) + int(state[LOG_MIRROR]) != len(ring):
            raise ValueError("the ring is not the log's size and mirror")
        self.ring = ring
        self.capacity = out.capacity
        self._scan = (
            tables.domain, tables.max_payload, tables.checksum_policy, tables.type_allowed, tables.version_allowed,
            out.offsets, out.verdicts, out.runs, np.zeros(len(p.VERDICT_NAMES), dtype=np.int64), CRC_TABLES,
        )  # fmt: skip
        self._log = (state, starts, origins, first_message)
        self._address = ring.ctypes.data
        self._timespec = np.zeros(2, dtype=np.int64)
        self.shared = _NOT_SHARED
        self.cursors = _NO_CURSORS

    def watch_cursors(self, mode: np.ndarray, position: np.ndarray, group: np.ndarray, counts: np.ndarray) -> None:
        """Read the relay's cursor table (``server.cursors``): no read is taken that would evict what an unfiltered
        cursor behind (``CURSOR_BEHIND``, group -1) has not read. Its arrays, one slot each, and its cursors per
        mode (``counts``), bound for good."""
        _array(mode, np.dtype(np.int8), 1, "the cursors' modes")
        if not len(mode) == len(_array(position, _I64, 1, "positions")) == len(_array(group, _I64, 1, "groups")):
            raise ValueError("the cursor table's arrays differ in length")
        if len(_array(counts, _I64, 1, "the cursors per mode")) <= CURSOR_BEHIND:
            raise ValueError("the cursors per mode must count every mode")
        self.cursors = (mode, position, group, counts)

    def publish_to(self, header: np.ndarray | None) -> None:
        """Publish each committed batch in the header of the mapped log, and wake its readers; None: no one maps it."""
        if header is self.shared:
            return
        if header is None:
            self.shared = _NOT_SHARED
            return
        if len(_array(header, _I64, 1, "the mapped log's header")) <= W_WAKE or not header.flags.writeable:
            raise ValueError("the mapped log's header is too short or read-only")
        self.shared = header

    def forward(
        self,
        at: int,
        end: int,
        counts: np.ndarray,
        origin: int,
        fan: FanOut,
        targets: int,
        skip: int,
        stage: int = STAGE_ALL,
        judged: tuple[int, int] = (0, 0),
        route: GroupRoute | None = None,
    ) -> tuple[int, int, int, int, int, int, int]:
        """Judge ``ring[at:end]`` and, if it is all whole forwarded messages, commit it and send it to the targets.

        Returns ``(status, messages, forwarded bytes, stream start, targets
        left short, send began, send ended)`` (``read_loop.forward_read``);
        ``READ_NOT_TAKEN`` changed nothing but the scan buffers. With
        ``stage=STAGE_JUDGE`` it stops after judging (``READ_JUDGED``); then
        ``stage=STAGE_SEND`` with that result's ``(messages, bytes)`` as
        ``judged`` commits and sends the same read, nothing in between having
        touched the log. With ``route``, the targets in a filtered group get
        their group's runs of the batch (the read is not taken when they do not
        fit the arrays); the send stage needs the route the judge stage had.
        """
        if not (0 <= at <= end <= len(self.ring) and end - at <= self.capacity):
            raise ValueError(f"[{at}, {end}) is not a range of the ring the scan buffers can take")
        if len(counts) < len(p.VERDICT_NAMES) or counts.dtype is not _I64:
            raise TypeError(f"counts must be int64 with {len(p.VERDICT_NAMES)} slots")
        if not 0 <= targets <= len(fan.fds) or len(fan.iovecs) < 4:
            raise ValueError(f"{targets} targets, room for {len(fan.fds)}, or fewer than two iovecs")
        fds, first, count, sent, totals = fan.target_views(targets)
        fan._uniform = None  # every target's slice is the loop's from here
        return _io_loop("forward_read")(
            self.ring, at, end, *self._scan, counts, *self._log, origin, fds, skip, first, count, fan.iovecs,
            fan.msghdr, sent, totals, self._address, self._timespec, stage, *judged, *self.route_args(route, targets),
            self.shared, *self.cursors,
        )  # fmt: skip

    def route_args(self, route: GroupRoute | None, targets: int) -> tuple:
        """``route``'s arguments for the loops, checked against the scan buffers and the targets."""
        if route is None:
            return NO_ROUTE.args
        if len(route.target_group) < targets or route.routed.capacity < self.capacity:
            raise ValueError(f"the route is for fewer than {targets} targets, or for smaller scans")
        return route.args
