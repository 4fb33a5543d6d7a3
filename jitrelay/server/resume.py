"""The relay's positions: notices for subscribers that ask, resuming after a position, replay from the journal.

A positioned subscriber is told where each run of its stream starts, may
resume after a position it names (from the log, or from the journal when the
log no longer holds it), and is told of a gap instead of being cut off when
the log leaves it behind. The rest of the engine only moves its cursor.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.domains import RelayLogic
from jitrelay.server.connection import Connection
from jitrelay.server.cursors import CursorFlag, CursorMode, CursorTable
from jitrelay.server.journal import Journal, find_replay
from jitrelay.server.log import RelayLog

log = logging.getLogger("jitrelay.relay")


class Resume:
    """The Relay's positions, resumes and journal replays.

    State lives on the Relay (``server/engine.py``); the names below are declared for the type checker only.
    """

    logic: RelayLogic
    log: RelayLog
    journal: Journal | None
    tables: kernels.KernelTables
    gap_notices: int
    cursors: CursorTable[Connection]
    _targets_dirty: bool
    stop_sending: Callable[[Connection], None]
    _consume: Callable[[Connection, int, int], None]
    _write_when_ready: Callable[[Connection], None]

    def _position(self, conn: Connection, asked: protocol.Position | bool | None) -> None:
        """Give ``conn`` position notices from now on, starting at the head or after the position it asked for."""
        log_ = self.log
        start = log_.head
        if isinstance(asked, protocol.Position):
            resumed = self._resume_start(conn, asked)
            if resumed is None:
                return
            start = resumed
        cursors = self.cursors
        cursors.set_flag(conn, CursorFlag.POSITIONED)
        cursors.set_flag(conn, CursorFlag.POSITION_NOTICES)
        if start < 0:  # from the journal first: its notices say where each part starts
            if not conn.behind:
                self._targets_dirty = True
            cursors.set_mode(conn, CursorMode.REPLAYING)
            conn.stream_at = None
            if not conn.writing:
                self._write_when_ready(conn)
            return
        if not conn.behind:
            cursors.set_mode(conn, CursorMode.BEHIND)
            self._targets_dirty = True
        if conn.filter == protocol.EVERYTHING:
            cursors.set_position(conn, start)
        else:
            conn.owed = self._reroute(conn.filter, start, log_.head)
        conn.prefix += protocol.position_notice(protocol.Position(log_.epoch, start, log_.message_number(start)))
        conn.stream_at = start
        log.info("%s receives positions from offset %d of epoch %x", conn.peer, start, log_.epoch)
        if not conn.writing:
            self._write_when_ready(conn)

    def _resume_start(self, conn: Connection, position: protocol.Position) -> int | None:
        """Where a subscriber resuming after ``position`` starts (a gap notice queued if not right there), or None."""
        log_ = self.log
        if (position.epoch != log_.epoch or position.offset < log_.tail) and self._replay_from_journal(conn, position):
            return -1
        if position.epoch != log_.epoch:
            gap = protocol.Gap(protocol.GAP_UNKNOWN_EPOCH, protocol.UNKNOWN, protocol.UNKNOWN)
        elif position.offset > log_.head or (
            position.offset >= log_.tail and log_.boundary(position.offset) != position.offset
        ):
            log.warning(
                "closing connection %s: resume position %s is %s",
                conn.peer,
                position,
                "beyond the head of the log" if position.offset > log_.head else "not at a message boundary",
            )
            self.stop_sending(conn)
            conn.transport.close()
            return None
        elif position.offset < log_.tail:
            missed = max(0, log_.oldest_message() - position.message)
            gap = protocol.Gap(protocol.GAP_LEFT_LOG, missed, log_.tail - position.offset)
        else:
            return position.offset
        conn.prefix += protocol.gap_notice(gap)
        self.gap_notices += 1
        log.info(
            "%s resumes after %s, which is not in the log: %s; from the oldest message kept", conn.peer, position, gap
        )
        return log_.tail

    def _replay_from_journal(self, conn: Connection, position: protocol.Position) -> bool:
        """Resume an unfiltered subscriber from the journal, which holds what the log no longer does (execution)."""
        if self.journal is None or conn.filter != protocol.EVERYTHING:
            return False
        try:
            replay = find_replay(self.journal.directory, self.journal.name, *position)
        except OSError as exc:
            log.warning("%s: cannot read the journal to resume after %s: %s", conn.peer, position, exc)
            return False
        if replay is None:
            return False
        conn.replay = replay
        conn.replay_epoch = 0
        log.info("%s resumes after %s from the journal %s", conn.peer, position, self.journal.directory)
        return True

    def _reroute(self, selection: protocol.Filter, start: int, end: int) -> deque[np.ndarray]:
        """The ``(k, 3)`` ranges a filtered subscriber resuming at ``start`` owes, from the log up to ``end``."""
        owed: deque[np.ndarray] = deque()
        if start >= end:
            return owed
        tables = kernels.group_tables([selection])
        scan_out = kernels.ScanBuffers(self.logic.buffer_size)
        routed = kernels.RouteBuffers(self.logic.buffer_size, 1)
        counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
        for a, b in self.log.spans(start, end, self.logic.buffer_size):
            chunk = np.concatenate([np.frombuffer(view, dtype=np.uint8) for view in self.log.views(a, b)])
            result, routed = kernels.scan_and_route(chunk, 0, len(chunk), self.tables, scan_out, tables, routed, counts)
            own = routed.group_runs(0).reshape(-1, 2)
            if len(own):
                forwarded = scan_out.offsets[: result.count][scan_out.verdicts[: result.count] == protocol.FORWARD]
                rows = np.empty((len(own), 3), dtype=np.int64)
                rows[:, :2] = own + a
                rows[:, 2] = self.log.message_number(a) + np.searchsorted(forwarded, own[:, 0])
                owed.append(rows)
        return owed

    def _skip_to(self, conn: Connection, tail: int) -> None:
        """A positioned subscriber the log leaves behind: it finishes the message it is in, then hears of the gap."""
        log_ = self.log
        needed = conn.needed()
        boundary = log_.boundary(needed)
        if boundary > needed:  # the rest of a message it has part of, copied before the ring reuses it
            for view in log_.views(needed, boundary):
                conn.prefix += view
            self._consume(conn, needed, boundary - needed)
        gap = protocol.Gap(
            protocol.GAP_LEFT_LOG, log_.messages_from(boundary) - log_.messages_from(tail), tail - boundary
        )
        conn.prefix += protocol.gap_notice(gap)
        self.gap_notices += 1
        if conn.filter == protocol.EVERYTHING:
            self.cursors.set_position(conn, tail)
        else:
            while conn.owed and int(conn.owed[0][-1, 1]) <= tail:
                conn.owed.popleft()
        conn.stream_at = None
        log.warning(
            "%s fell out of the log: told of a gap of %d messages (%d bytes)", conn.peer, gap.messages, gap.bytes
        )
        if not conn.writing:
            self._write_when_ready(conn)

    def _replay_more(self, conn: Connection) -> None:
        """The next chunk of a journal replay into ``conn``'s prefix, or, once it reaches the log, the log's turn."""
        replay, log_ = conn.replay, self.log
        assert replay is not None
        chunk = replay.next_chunk(log_.epoch, log_.tail)
        gap = replay.take_gap()
        if gap is not None:  # journal retention deleted part of what it resumes from: told exactly, as the log does
            conn.prefix += protocol.gap_notice(gap)
            conn.replay_epoch = 0  # a position notice says where the journal picks up
            self.gap_notices += 1
            log.warning("%s: the journal no longer holds what it resumes from: told of %s", conn.peer, gap)
        if chunk is None:
            at = replay.offset if replay.epoch == log_.epoch else log_.tail
            replay.close()
            conn.replay = None
            self.cursors.set_mode(conn, CursorMode.BEHIND)  # from the log now
            self.cursors.set_position(conn, at)
            conn.stream_at = at if conn.replay_epoch == log_.epoch else None  # else a notice names this epoch
            log.info("%s: replay from the journal done; the log takes over at %d", conn.peer, at)
            return
        if replay.epoch != conn.replay_epoch:
            conn.prefix += protocol.position_notice(protocol.Position(replay.epoch, replay.offset, replay.message))
            conn.replay_epoch = replay.epoch
        conn.prefix += chunk
        replay.advance(chunk)
