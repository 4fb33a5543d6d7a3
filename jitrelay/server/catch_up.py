"""A cursor behind: how a subscriber leaves the send loop, catches up from the log when writable, and rejoins.

Once a subscriber's socket takes less than its share, the send loop no longer
serves it: its own writer sends from its cursor, as much as the socket takes
per writability, until it reaches the head. This is apart from the engine
because it runs per writability of one subscriber, not per batch; the engine
only hands it those its send loop left short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import numpy as np

from jitrelay.core import protocol
from jitrelay.core.units import MiB
from jitrelay.server.connection import Connection
from jitrelay.server.cursors import CursorFlag, CursorMode, CursorTable
from jitrelay.server.log import RelayLog

log = logging.getLogger("jitrelay.relay")

CATCH_UP_BYTES = 8 * MiB  # the most one writability callback hands a subscriber that is behind
CATCH_UP_PIECES = 1024  # and in at most this many pieces (one sendmsg)


class CatchUp:
    """The Relay's cursors that are behind: falling behind, catching up, caught up, dropped.

    State lives on the Relay (``server/engine.py``); the names below are declared for the type checker only.
    """

    log: RelayLog
    cursors: CursorTable[Connection]
    connections: dict[int, Connection]
    fell_behind: int
    _targets_dirty: bool
    stop_sending: Callable[[Connection], None]
    _release_held: Callable[[], None]
    _grant: Callable[[Connection], None]
    _replay_more: Callable[[Connection], None]

    def _fall_behind(self, conn: Connection, position: int = 0, owed: np.ndarray | None = None) -> None:
        """A subscriber's socket took less than its share: from now on it catches up on its own, when writable."""
        self._to_cursor(conn, position, owed)
        self.fell_behind += 1
        self._write_when_ready(conn)

    def _to_cursor(self, conn: Connection, position: int, owed: np.ndarray | None = None) -> None:
        """Take ``conn`` out of the send loop's targets: from ``position`` on, its cursor serves it."""
        self.cursors.set_mode(conn, CursorMode.BEHIND)
        self.cursors.set_position(conn, position)
        if conn.positioned:
            conn.stream_at = position  # its stream has gone on without a break up to here, notice or not
        if owed is not None and len(owed):
            conn.owed.append(owed)
        self._targets_dirty = True

    def _write_when_ready(self, conn: Connection) -> None:
        conn.writing = True
        asyncio.get_running_loop().add_writer(conn.fd, self._catch_up, conn)

    def _catch_up(self, conn: Connection) -> None:
        """Writability on a subscriber that is behind: send what it owes from its cursor, until full or caught up."""
        if conn.conn_id not in self.connections or conn.transport.is_closing():
            self.stop_sending(conn)
            return
        budget = CATCH_UP_BYTES
        while budget > 0:
            views, segments = self._owed(conn, budget)
            if not views:
                self._caught_up(conn)
                return
            wanted = sum(len(v) for v in views)
            assert conn.spare is not None  # a cursor exists only on an accepted connection
            try:
                taken = conn.spare.sendmsg(views)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.info("%s: send failed (%s); closing", conn.peer, exc)
                self.stop_sending(conn)
                conn.transport.abort()
                return
            self._advance(conn, taken, segments)
            conn.bytes_out += taken
            budget -= taken
            self._release_held()
            if taken < wanted:
                return

    def _owed(self, conn: Connection, budget: int) -> tuple[list, list]:
        """What ``conn`` is to be sent next, at most ``budget`` log bytes in one sendmsg: views and what each is.

        Segments are ``("prefix", n)``, ``("notice", bytes, start)`` (a position notice for the run at
        ``start``) and ``("data", start, end)`` stream ranges.
        """
        log_ = self.log
        views: list = []
        segments: list[tuple] = []
        if conn.replay is not None and not conn.prefix:
            self._replay_more(conn)
        if conn.prefix:
            views.append(bytes(conn.prefix))  # a copy: the prefix shrinks as it goes out
            segments.append(("prefix", len(conn.prefix)))
        if conn.replay is not None or conn.shared_slot >= 0:
            rows = []  # the journal first (the log takes over when it ends); after a grant, the mapping
        elif conn.filter == protocol.EVERYTHING:
            start, end = log_.next_range(conn.position, conn.conn_id if conn.published else -1)
            self.cursors.set_position(conn, start)
            rows = [(start, end, -1)] if end > start else []
        else:
            rows = [row for ranges in conn.owed for row in ranges.tolist()]
        for a, b, message in rows:
            if conn.positioned and a != conn.stream_at:
                number = message if message >= 0 else log_.message_number(a)
                notice = protocol.position_notice(protocol.Position(log_.epoch, a, number))
                views.append(notice)
                segments.append(("notice", notice, a))
            b = min(b, a + budget)
            views.extend(log_.views(a, b))
            segments.append(("data", a, b))
            budget -= b - a
            if budget <= 0 or len(views) >= CATCH_UP_PIECES:
                break
        return (views if len(segments) else []), segments

    def _advance(self, conn: Connection, taken: int, segments: list[tuple]) -> None:
        """Move ``conn``'s cursor past the ``taken`` bytes of ``segments`` sent (shared owed ranges never change)."""
        for segment in segments:
            kind = segment[0]
            if kind == "prefix":
                n = min(taken, segment[1])
                del conn.prefix[:n]
                taken -= n
                if conn.prefix:
                    return
            elif kind == "notice":
                notice = segment[1]
                conn.stream_at = segment[2]  # from now on the notice is the stream's: its rest goes first
                if taken < len(notice):
                    conn.prefix[:0] = notice[taken:]
                    return
                taken -= len(notice)
            else:
                a, b = segment[1], segment[2]
                n = min(taken, b - a)
                self._consume(conn, a, n)
                conn.stream_at = a + n
                taken -= n
                if n < b - a:
                    return

    def _consume(self, conn: Connection, start: int, n: int) -> None:
        """``n`` log bytes from stream offset ``start`` were sent to ``conn``."""
        if conn.filter == protocol.EVERYTHING:
            self.cursors.set_position(conn, start + n)
            return
        while n and conn.owed:
            ranges = conn.owed[0]
            rest = ranges_after(ranges, n)
            n -= int((ranges[:, 1] - ranges[:, 0]).sum()) - int((rest[:, 1] - rest[:, 0]).sum())
            if len(rest):
                conn.owed[0] = rest
                return
            conn.owed.popleft()

    def _caught_up(self, conn: Connection) -> None:
        if conn.sharing:
            self._grant(conn)
            return
        asyncio.get_running_loop().remove_writer(conn.fd)
        conn.writing = False
        if conn.slow_timer is not None:
            conn.slow_timer.cancel()
            conn.slow_timer = None
        if conn.positioned:
            conn.owed.clear()
            self.cursors.set_position(conn, self.log.head)
            announced = conn.stream_at == conn.position  # it has been told where its stream stands
            if conn.filter != protocol.EVERYTHING or conn.published or conn.replay is not None or not announced:
                return  # it stays with the cursors: its stream needs notices between batches, or one first
            # Unfiltered, never publishing and told where it stands, its stream goes on batch after batch without
            # a notice until it falls behind: the send loop serves it like any other subscriber that keeps up.
        self.cursors.settle(conn)
        conn.owed.clear()
        self._targets_dirty = True
        self._release_held()

    def _drop_cursor(self, conn: Connection) -> None:
        """``stop_sending`` without letting held publishers go: for callers in the middle of judging room."""
        if conn.behind:
            self.cursors.settle(conn)
        if conn.cursor_slot >= 0:
            self.cursors.clear_flag(conn, CursorFlag.POSITION_NOTICES)
        conn.prefix.clear()
        if conn.replay is not None:
            conn.replay.close()
            conn.replay = None
        if conn.writing:
            conn.writing = False
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_writer(conn.fd)
        if conn.slow_timer is not None:
            conn.slow_timer.cancel()
            conn.slow_timer = None
        conn.owed.clear()
        self._targets_dirty = True


def ranges_after(ranges: np.ndarray, taken: int) -> np.ndarray:
    """What is left of ``(k, 2)`` stream ranges once ``taken`` bytes of them were sent."""
    lengths = ranges[:, 1] - ranges[:, 0]
    done = np.cumsum(lengths)
    first = int(np.searchsorted(done, taken, side="right"))
    rest = ranges[first:].copy()
    if len(rest):
        rest[0, 0] += taken - (int(done[first - 1]) if first else 0)
    return rest
