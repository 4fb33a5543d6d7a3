"""The relay's slow-reader policies: lag checks and cut-off, holding publishers, publishers that never read.

Under ``disconnect`` a subscriber too far behind, or one the log leaves
behind, is cut off; under ``block`` publishers are held until the slowest
cursor makes room. A publisher that never reads its socket is neither held
for nor cut off: it is detached and what it is not sent is counted. These
decisions are taken off the per-batch path, when someone is behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.domains import DISCONNECT, RelayLogic
from jitrelay.kernels.constants import KEEP_EVERYTHING_EVICTABLE
from jitrelay.server.connection import Connection
from jitrelay.server.cursors import CATCHING_UP, CursorFlag, CursorMode, CursorTable
from jitrelay.server.log import RelayLog
from jitrelay.server.shared_memory import SharedLogMemory
from jitrelay.server.shared_readers import SHARED_POLL_SECONDS
from jitrelay.server.unread import Unjudgeable, peer_unread_bytes

log = logging.getLogger("jitrelay.relay")


class SlowReaders:
    """The Relay's policies for subscribers that fall behind and publishers that never read.

    State lives on the Relay (``server/engine.py``); the names below are declared for the type checker only.
    """

    logic: RelayLogic
    log: RelayLog
    memory: SharedLogMemory
    connections: dict[int, Connection]
    slow_disconnects: int
    slow_pids: deque[int]
    slow_pauses: int
    never_reading: int
    retired_unread_messages: int
    retired_unread_bytes: int
    cursors: CursorTable[Connection]
    _shared_timer: asyncio.TimerHandle | None
    _unread: set[Connection]
    _cannot_judge_said: bool
    _reading: bool
    _targets: list[Connection]
    _fan: kernels.FanOut
    stop_sending: Callable[[Connection], None]
    on_data: Callable[[Connection, int], None]
    _drop_cursor: Callable[[Connection], None]
    _retarget: Callable[[], None]
    _retire: Callable[[Connection], None]
    _skip_to: Callable[[Connection, int], None]
    _poll_shared: Callable[[], None]

    def _leave_behind(self, tail: int, sender: Connection) -> None:
        """Before ``sender``'s append moves the log's tail to ``tail``: cut off every subscriber still before it.

        A publisher that never read a byte is not a subscriber falling behind: it is detached instead.
        """
        for conn in [c for c in self.cursors.members(*CATCHING_UP) if c.needed() < tail]:
            if self._never_read(conn, sender):
                continue
            if conn.positioned:
                self._skip_to(conn, tail)
            else:
                self._cut_off(conn, "fell out of the log")

    def _check_lag(self) -> None:
        """Under ``disconnect``, a subscriber more than ``pending_high`` behind has ``slow_timeout`` to come back."""
        if self.logic.slow_policy != DISCONNECT:
            return
        head = self.log.head
        loop = asyncio.get_running_loop()
        for conn in self.cursors.members(*CATCHING_UP):
            if conn.positioned:  # it asked to hear of gaps: it stays until the log leaves it behind
                continue
            if conn.slow_timer is None and head - conn.needed() > self.logic.pending_high:
                conn.slow_timer = loop.call_later(self.logic.slow_timeout, self._drop_if_still_behind, conn)
                log.info(
                    "%s is %d bytes behind the head (limit %d); cut off in %.1f s unless it catches up",
                    conn.peer,
                    head - conn.needed(),
                    self.logic.pending_high,
                    self.logic.slow_timeout,
                )

    def _drop_if_still_behind(self, conn: Connection) -> None:
        conn.slow_timer = None
        if conn.behind and self.log.head - conn.needed() > self.logic.pending_low:
            if self._never_read(conn):
                return
            self._cut_off(conn, f"still behind after {self.logic.slow_timeout:.1f} s")

    def _cut_off(self, conn: Connection, why: str) -> None:
        if conn.conn_id not in self.connections or conn.transport.is_closing():
            return
        needed = conn.needed()
        behind_bytes = self.log.head - needed
        behind_messages = self.log.messages_from(needed)
        self.slow_disconnects += 1
        if conn.pid > 0:
            self.slow_pids.append(conn.pid)
        log.warning(
            "disconnecting slow subscriber %s: %s, %d bytes (%d messages) behind the head (limit %d, log %d)",
            conn.peer,
            why,
            behind_bytes,
            behind_messages,
            self.logic.pending_high,
            self.log.capacity,
        )
        self.stop_sending(conn)
        conn.transport.abort()
        self._retarget()

    def _has_room(self, nbytes: int, sender: Connection | None = None) -> bool:
        """Under ``block``: whether ``nbytes`` more fit in the log without passing the slowest cursor.

        A cursor in the way whose connection has published and never read is detached, not waited for.
        """
        tail = self.log.tail_after(min(nbytes, self.log.capacity))
        if self._slowest_mapped() < tail:
            return False
        in_the_way = [c for c in self.cursors.members(*CATCHING_UP) if c.needed() < tail]
        return all(self._never_read(conn, sender) for conn in in_the_way)

    def _slowest_mapped(self) -> int:
        """How far the slowest reader of the mapped log says it has read (``KEEP_EVERYTHING_EVICTABLE``: none)."""
        mapped = self.cursors.members(CursorMode.MAPPED)
        if not mapped:
            return KEEP_EVERYTHING_EVICTABLE
        return int(self.memory.positions([conn.shared_slot for conn in mapped]).min())

    def _hold(self, conn: Connection) -> None:
        cursors = self.cursors
        if not conn.held:
            cursors.set_flag(conn, CursorFlag.HELD)
            self.slow_pauses += 1
            conn.transport.pause_reading()
            if cursors.count_flagged(CursorFlag.HELD) == 1:
                log.info("the log is full up to the slowest subscriber; holding %s", conn.peer)
        if cursors.count(CursorMode.MAPPED) and self._shared_timer is None:
            self._shared_timer = asyncio.get_running_loop().call_later(SHARED_POLL_SECONDS, self._poll_shared)

    def _release_held(self) -> None:
        """Let held publishers go on, in slot order, as far as the log has room for what they already sent."""
        cursors = self.cursors
        if not cursors.count_flagged(CursorFlag.HELD):
            return
        for conn in cursors.flagged(CursorFlag.HELD):
            if not self._has_room(conn.filled):
                return
            if conn.held:  # else a release nested in an earlier one's ``on_data`` let it go already
                cursors.clear_flag(conn, CursorFlag.HELD)
            self.on_data(conn, time.perf_counter_ns())  # a publisher that closed meanwhile still has these sent
            if not conn.held and self._reading and not conn.transport.is_closing():
                conn.transport.resume_reading()
            self._retire(conn)  # one that closed meanwhile is done with, once its batch is taken
        if not cursors.count_flagged(CursorFlag.HELD):
            log.info("subscribers made room; publishers resume")

    def _never_read(self, conn: Connection, sender: Connection | None = None) -> bool:
        """Whether ``conn``, about to be cut off or to hold publishers, is a publisher that never read: then detach it.

        It must have published (or be publishing now: ``sender``, or held with a batch waiting, or have sent any
        message that is not a control message, even one the relay rejected) and its peer's
        receive queue must still hold every byte the relay wrote to it. Once the kernel says it read anything it
        is a subscriber for good. TCP peers, and kernels without ``unix_diag``, keep the slow policy as it is.
        """
        if conn.has_read or conn.address is not None or conn.fd < 0:
            return False
        if not (conn.published or conn.held or conn is sender or self._sent_data(conn)):
            return False
        try:
            unread = peer_unread_bytes(conn.fd)
        except (Unjudgeable, OSError) as exc:
            if not self._cannot_judge_said:
                self._cannot_judge_said = True
                log.warning(
                    "cannot tell whether %s reads its socket (%s); publishers that never read get the slow policy",
                    conn.peer,
                    exc,
                )
            return False
        sent = self._sent_to(conn)
        if unread < sent:
            conn.has_read = True
        if unread < sent or sent == 0:  # nothing sent yet: nothing to tell from
            return False
        self._detach_unread(conn, sent)
        return True

    @staticmethod
    def _sent_data(conn: Connection) -> bool:
        """Whether ``conn`` sent any message that is not a control message, forwarded or not.

        A Torq publisher's first bytes may be rejected (its identification
        header is market data whatever relay it reaches), and a strategy may
        publish rarely: what it sent still shows it is a publisher.
        """
        return int(conn.counts.sum()) > int(conn.counts[protocol.CONTROL])

    def _sent_to(self, conn: Connection) -> int:
        """Bytes written to ``conn`` so far, the send loop's share since the targets were last rebuilt included."""
        sent = conn.bytes_out
        for i, target in enumerate(self._targets):
            if target is conn:
                sent += int(self._fan.totals[i])
        return sent

    def _detach_unread(self, conn: Connection, sent: int) -> None:
        """Treat ``conn`` as publish-only from now on; note what its cursor still owed, to count what it misses.

        A message its socket took part of is finished first (from the prefix, when it becomes writable), so
        that whatever it reads one day is whole messages.
        """
        log_ = self.log
        needed = conn.needed()
        boundary = log_.boundary(needed)
        prefix = self._unfinished_share(conn)
        ranges: list[tuple[int, int]]
        if conn.filter == protocol.EVERYTHING:
            ranges, at = [], boundary
            while True:
                start, end = log_.next_range(at, conn.conn_id)
                if start >= end:
                    break
                ranges.append((start, end))
                at = end
        else:
            ranges = [(max(a, boundary), b) for block in conn.owed for a, b, *_ in block.tolist() if b > boundary]
        owed_messages = sum(log_.message_number(b) - log_.message_number(a) for a, b in ranges)
        owed_bytes = sum(b - a for a, b in ranges)
        self._drop_cursor(conn)
        self.cursors.set_flag(conn, CursorFlag.NEVER_READS)
        conn.unread_from = (
            owed_messages,
            owed_bytes,
            log_.messages,
            log_.head,
            conn.messages_published,
            conn.bytes_published,
        )
        self._unread.add(conn)
        self.never_reading += 1
        self._retarget()
        log.warning(
            "%s publishes and has never read its socket (%d bytes sent to it, all unread): "
            "it is sent nothing more and never holds anyone; what it is not sent is counted",
            conn.peer,
            sent,
        )
        loop = asyncio.get_running_loop()
        if prefix:
            conn.prefix += prefix
            conn.writing = True
            loop.add_writer(conn.fd, self._finish_message, conn)
        if self.cursors.count_flagged(CursorFlag.HELD):
            # Publishers it held may have room now; judged again outside whatever judges room now.
            loop.call_soon(self._release_held)

    def _unfinished_share(self, conn: Connection, selection: protocol.Filter | None = None) -> bytes:
        """What ``conn`` must be sent before its stream can start anew: its prefix (a notice or message its socket
        took part of, or notices due) and the rest of the log message its cursor stands in, copied before the ring
        reuses it. ``selection``: the filter its cursor was made for, if it has just asked for another."""
        needed = conn.needed(selection)
        boundary = self.log.boundary(needed)
        rest = b"".join(bytes(v) for v in self.log.views(needed, boundary)) if boundary > needed else b""
        return bytes(conn.prefix) + rest

    def _finish_message(self, conn: Connection) -> None:
        """Writability on a detached publisher: the rest of the message its socket took part of, then nothing."""
        if conn.conn_id not in self.connections or conn.transport.is_closing() or not conn.prefix:
            self._drop_cursor(conn)
            return
        assert conn.spare is not None
        try:
            taken = conn.spare.send(conn.prefix)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("%s: send failed (%s); closing", conn.peer, exc)
            self._drop_cursor(conn)
            conn.transport.abort()
            return
        del conn.prefix[:taken]
        conn.bytes_out += taken
        if not conn.prefix:
            self._drop_cursor(conn)

    def _not_taken(self, conn: Connection) -> tuple[int, int]:
        """Messages and bytes a detached publisher would have been sent and was not: others' messages since."""
        assert conn.unread_from is not None
        owed_messages, owed_bytes, messages, head, own_messages, own_bytes = conn.unread_from
        return (
            owed_messages + self.log.messages - messages - (conn.messages_published - own_messages),
            owed_bytes + self.log.head - head - (conn.bytes_published - own_bytes),
        )

    def _unread_totals(self) -> tuple[int, int]:
        """What every publisher that never read, open or closed, was not sent: messages and bytes."""
        messages, nbytes = self.retired_unread_messages, self.retired_unread_bytes
        for conn in self._unread:
            m, b = self._not_taken(conn)
            messages += m
            nbytes += b
        return messages, nbytes
