"""Reads the relay makes itself: publishers in an epoll set of its own, read and forwarded in compiled code.

A publisher that sends ordinary data moves from the event loop's read
callbacks to the relay's epoll set (``kernels.polling.PollLoop``) after a
read of its that the event loop made: its transport stops reading, and the
event loop watches the one epoll descriptor instead. When that is ready, one
compiled call reads every ready publisher into the log, judges, commits and
sends each read, and goes on until nothing is ready; Python only reads its
report rows for the figures. A read that needs more than that (a control, a
rejected message, a close, a target left short, an unfinished message too
long to carry) stops the call: its publisher goes back
to the event loop's callbacks, and its bytes take the usual way, exactly as
if the event loop had read them.

The compiled loop reads while the relay reads and its journal writes
(``_polling_allowed``); when that stops being so, the next wake-up hands
every publisher back to the event loop. Whoever else wants a batch is served
around it: filtered subscribers keeping up are targets like the others (the
loop routes each read and sends each its group's runs); readers of the mapped
log get each commit published and a wake from the loop itself; and no read is
taken that would evict what a cursor behind, or under ``block`` a reader of
the mapped log, has not read (``Relay._prepare_compiled``): that read goes
the usual way, whose slow-reader policy decides. Two things need Python
after every read, so the loop then makes one read per call: a relay with a
journal gets each read back judged only (Python appends it to the journal
where it lies in the ring, then one more compiled call commits and sends
it), and while a filtered cursor is behind, each batch's group ranges are
added to what it owes (``Relay._owing``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.domains import READ_COMPILED, RelayLogic
from jitrelay.kernels import constants as c
from jitrelay.kernels.polling import PollLoop
from jitrelay.kernels.read_path import ReadPath
from jitrelay.server.connection import Connection
from jitrelay.server.cursors import CursorTable
from jitrelay.server.journal import Journal
from jitrelay.server.log import RelayLog

log = logging.getLogger("jitrelay.relay")

_READ_ON = (c.POLLED_JUDGED, c.POLLED_FORWARDED, c.POLLED_UNFINISHED)  # the poll loop may read again after these
POLLED_READS_PER_CALL = 16  # at most this many reads per wake-up, so that timers and other callbacks get their turn
DIRECT_CARRY_LIMIT = 64 * 1024  # the most of an unfinished message copied into the ring to read the rest there


class PolledReads:
    """The Relay's own epoll set and the compiled reads from it.

    State lives on the Relay (``server/engine.py``); the names below are declared for the type checker only.
    """

    logic: RelayLogic
    log: RelayLog
    connections: dict[int, Connection]
    journal: Journal | None
    _read_path: ReadPath
    _fan: kernels.FanOut
    _targets: list[Connection]
    _targets_dirty: bool
    cursors: CursorTable[Connection]
    _route: kernels.GroupRoute | None
    _read_route: Callable[[], kernels.GroupRoute | None]
    _journal_retry: object
    _reading: bool
    _prepare_compiled: Callable[[], None]
    _owing: Callable[[], bool]
    _forwarded: Callable[[Connection, int, int, int, int, tuple], None]
    _journal: Callable[[list, tuple[int, int, int]], bool]
    ring_bytes: memoryview
    on_data: Callable[[Connection, int], None]

    def _start_polling(self) -> None:
        """The epoll set from the start, so that the relay's descriptors do not change with its first publisher."""
        self.reads_polled = 0
        self._polling_failed = False
        slots = self.logic.max_connections
        self._poll_loop: PollLoop | None = None
        if self.logic.read_path == READ_COMPILED:
            self._poll_loop = PollLoop(slots, self._read_path, POLLED_READS_PER_CALL)
        self._poll_watched = False  # the event loop watches the epoll descriptor from the first connection polled
        self._polled: list[Connection | None] = [None] * slots
        self._free_slots = list(range(slots - 1, -1, -1))

    def _polling_allowed(self) -> bool:
        """Whether the compiled loop may read: the relay reads, and its journal, if any, writes."""
        return (
            self.logic.read_path == READ_COMPILED
            and not self._polling_failed
            and self._journal_retry is None
            and self._reading
        )

    def after_read(self, conn: Connection) -> None:
        """The event loop read for ``conn``: from now on the relay's epoll set reads it, if it may."""
        if (
            conn.polled < 0
            and conn.fd >= 0
            and conn.filled <= DIRECT_CARRY_LIMIT
            and conn.fault == protocol.NO_FAULT
            and not (conn.held or conn.positioned or conn.transport.is_closing())
            and conn.conn_id in self.connections
            and self._polling_allowed()
        ):
            self._poll(conn)

    def _poll(self, conn: Connection) -> None:
        loop = self._poll_loop
        if loop is None or not self._free_slots:
            return
        if not self._poll_watched:
            asyncio.get_running_loop().add_reader(loop.fileno(), self._on_polled)
            self._poll_watched = True
        slot = self._free_slots.pop()
        conn.transport.pause_reading()
        loop.add(slot, conn.fd, conn.conn_id, conn.buf, conn.filled, conn.counts)
        conn.counts = loop.counts[slot]  # the loop tallies its verdicts in place
        conn.polled = slot
        self._polled[slot] = conn

    def _unpoll(self, conn: Connection, resume: bool = True) -> None:
        """Hand ``conn`` back to the event loop's callbacks (reading again when ``resume``)."""
        slot = conn.polled
        if slot < 0:
            return
        assert self._poll_loop is not None  # a slot is taken only from the loop
        conn.counts = conn.counts.copy()
        conn.filled = self._poll_loop.remove(slot)
        conn.polled = -1
        self._polled[slot] = None
        self._free_slots.append(slot)
        if resume and self._reading and not (conn.held or conn.transport.is_closing()):
            conn.transport.resume_reading()

    def _unpoll_all(self, resume: bool = True) -> None:
        for conn in self._polled:
            if conn is not None:
                self._unpoll(conn, resume)

    def _stop_polling(self) -> None:
        self._unpoll_all(resume=False)
        if self._poll_loop is not None:
            if self._poll_watched:
                asyncio.get_running_loop().remove_reader(self._poll_loop.fileno())
                self._poll_watched = False
            self._poll_loop.close()
            self._poll_loop = None

    def _on_polled(self) -> None:
        """The relay's epoll set is ready: read and forward in one compiled call, then what it reports.

        A relay with a journal gets each read back judged only: journaled, it is sent, and the loop goes on. So
        does one with a filtered cursor behind: each read is owed to it before the next.
        """
        loop = self._poll_loop
        assert loop is not None  # the reader is removed with the loop
        judge_only = self.journal is not None
        try:
            for _ in range(POLLED_READS_PER_CALL):  # one read per call: as many calls, then others' turn
                if not self._polling_allowed():
                    self._unpoll_all()
                    return
                self._prepare_compiled()
                one_by_one = judge_only or self._owing()
                route = self._read_route()
                made = loop.read_ready(
                    self._fan, len(self._targets), DIRECT_CARRY_LIMIT, judge_only, route, 1 if one_by_one else 0
                )
                self.reads_polled += made
                rows = loop.reports[:made].tolist()
                for row in rows:
                    self._polled_read(loop, row)
                if not (one_by_one and rows and rows[-1][c.POLL_KIND] in _READ_ON):
                    return
        except Exception:  # a bug, not a peer's doing: the event loop reads from here on, and says why
            log.exception("the relay's own reads failed; the event loop reads every connection from now on")
            self._polling_failed = True
            self._unpoll_all()

    def _polled_read(self, loop: PollLoop, row: list[int]) -> None:
        """What one read of the poll loop asks of Python: its figures, or its bytes to take the usual way."""
        conn = self._polled[row[c.POLL_SLOT]]
        assert conn is not None  # a slot's socket leaves the epoll set with its connection
        kind = row[c.POLL_KIND]
        if row[c.POLL_GOT] > 0:
            conn.bytes_in += row[c.POLL_GOT]
        if kind == c.POLLED_JUDGED and not self._send_journaled(loop, conn, row):
            kind = c.POLLED_NOT_TAKEN  # the journal refused it: held, judged again when it writes
        elif kind in (c.POLLED_FORWARDED, c.POLLED_CARRY) and row[c.POLL_FORWARDED]:
            times = (row[c.POLL_ARRIVED], row[c.POLL_BEGAN], row[c.POLL_ENDED], row[c.POLL_ENDED])
            self._forwarded(
                conn, row[c.POLL_MESSAGES], row[c.POLL_FORWARDED], row[c.POLL_START], row[c.POLL_SHORT], times
            )
        if kind in (c.POLLED_FORWARDED, c.POLLED_UNFINISHED, c.POLLED_JUDGED):
            return
        self._unpoll(conn)  # everything else is the event loop's: a close or a failure it finds itself
        if kind == c.POLLED_NOT_TAKEN:
            at, n = row[c.POLL_AT], row[c.POLL_BYTES]
            conn.buf[:n] = self.log.ring[at : at + n]
            self.on_data(conn, row[c.POLL_ARRIVED])

    def _send_journaled(self, loop: PollLoop, conn: Connection, row: list[int]) -> bool:
        """Journal a judged read where it lies in the ring, then commit and send it; False if the journal refused."""
        at, n, size = row[c.POLL_AT], row[c.POLL_BYTES], row[c.POLL_FORWARDED]
        log_ = self.log
        if not self._journal([self.ring_bytes[at : at + size]], (log_.epoch, log_.head, log_.messages)):
            return False
        slot = conn.polled
        judged = (row[c.POLL_MESSAGES], size)
        _, messages, size, start, short, began, ended = loop.send_judged(
            self._fan, len(self._targets), slot, (at, at + n), judged, self._route
        )
        rest = n - size
        conn.buf[:rest] = log_.ring[at + size : at + n]
        loop.filled[slot] = rest
        self._forwarded(conn, messages, size, start, short, (row[c.POLL_ARRIVED], began, ended, ended))
        if rest > DIRECT_CARRY_LIMIT:
            self._unpoll(conn)
        return True
