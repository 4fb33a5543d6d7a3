"""The relay's readers of the mapped log: the grant of a slot, laps they report, and polling while they hold.

A subscriber that asks for shared memory first catches up over its socket,
then is sent its reader slot and the log's descriptors, and from then on reads
the log itself. This is a job of its own beside the socket cursors: the
relay learns of such a reader only from its slot and its reports.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable

from jitrelay.core import protocol
from jitrelay.core.shared_log import S_POSITION
from jitrelay.server.connection import Connection
from jitrelay.server.cursors import CursorFlag, CursorMode, CursorTable
from jitrelay.server.log import RelayLog
from jitrelay.server.shared_memory import SharedLogMemory

log = logging.getLogger("jitrelay.relay")

SHARED_POLL_SECONDS = 0.001  # how often a relay held by a shared-memory reader under ``block`` looks again


class SharedReaders:
    """The Relay's readers of the mapped log.

    State lives on the Relay (``server/engine.py``); the names below are declared for the type checker only.
    """

    log: RelayLog
    memory: SharedLogMemory
    gap_notices: int
    slow_disconnects: int
    slow_pids: deque[int]
    cursors: CursorTable[Connection]
    _shared_timer: asyncio.TimerHandle | None
    _targets_dirty: bool
    stop_sending: Callable[[Connection], None]
    _release_held: Callable[[], None]
    _retarget: Callable[[], None]
    _write_when_ready: Callable[[Connection], None]

    def _share(self, conn: Connection) -> None:
        """Move ``conn`` to the mapped log: first its socket catches up to the head, then the grant goes out."""
        if conn.sharing or conn.granted:
            return
        if conn.address is not None:
            log.warning("%s asked for shared memory over TCP; its stream stays on the socket", conn.peer)
            return
        self.cursors.set_flag(conn, CursorFlag.SHARING)
        if not conn.behind:
            self.cursors.set_mode(conn, CursorMode.BEHIND)
            self.cursors.set_position(conn, self.log.head)
            self._targets_dirty = True
        if not conn.writing:
            self._write_when_ready(conn)

    def _grant(self, conn: Connection) -> None:
        """Send the caught-up ``conn`` its slot and the log's descriptors; it stays writing until all is out."""
        log_, memory = self.log, self.memory
        if conn.shared_slot < 0:
            slot = memory.claim(conn.conn_id, log_.head)
            if slot < 0:  # one per connection, as many as connections: only a relay mid-close runs out
                log.warning(
                    "closing connection %s: it asked for shared memory, but all %d reader slots are taken",
                    conn.peer,
                    memory.readers,
                )
                self.stop_sending(conn)
                conn.transport.close()
                return
            conn.shared_slot = slot
            if log_.publisher is None:
                log_.publisher = memory.publish
            memory.publish(log_.extent())
            notice = protocol.shared_log_notice(protocol.SharedLog(log_.epoch, log_.head, log_.messages, slot))
            assert conn.spare is not None
            try:
                sent = socket.send_fds(conn.spare, [notice], memory.descriptors)
            except (BlockingIOError, InterruptedError):
                memory.release(slot)
                conn.shared_slot = -1
                return  # writability brings it back here
            except OSError as exc:
                log.info("%s: send failed (%s); closing", conn.peer, exc)
                self.stop_sending(conn)
                conn.transport.abort()
                return
            conn.bytes_out += sent
            if sent < len(notice):
                conn.prefix += notice[sent:]  # the descriptors went with its first byte; the rest follows
                return
        elif conn.prefix:
            return
        self.cursors.clear_flag(conn, CursorFlag.SHARING)
        self.cursors.set_flag(conn, CursorFlag.GRANTED)
        self.stop_sending(conn)  # its cursor rests as mapped from here on
        log.info(
            "%s reads the log from shared memory (slot %d) from offset %d",
            conn.peer,
            conn.shared_slot,
            memory.slots[conn.shared_slot, S_POSITION],
        )
        self._retarget()

    def _lapped(self, conn: Connection, report: protocol.Lapped) -> None:
        """A reader of the mapped log found its bytes overwritten: a gap it was told of, or the end of it."""
        if not conn.granted:
            log.info("%s sent a lapped report but does not read shared memory; ignored", conn.peer)
            return
        if conn.positioned:
            self.gap_notices += 1
            log.warning(
                "%s fell out of the log in shared memory at offset %d: a gap of %d messages (%d bytes)",
                conn.peer,
                report.offset,
                report.messages,
                report.bytes,
            )
            return
        self.slow_disconnects += 1
        if conn.pid > 0:
            self.slow_pids.append(conn.pid)
        log.warning(
            "disconnecting slow subscriber %s: lapped in shared memory at offset %d, "
            "%d messages (%d bytes) overwritten before it read them (log %d)",
            conn.peer,
            report.offset,
            report.messages,
            report.bytes,
            self.log.capacity,
        )
        conn.transport.abort()

    def _poll_shared(self) -> None:
        """Held under ``block`` by a reader of the mapped log, which moves without telling: look again soon."""
        self._shared_timer = None
        self._release_held()
        if self.cursors.count_flagged(CursorFlag.HELD) and self.cursors.count(CursorMode.MAPPED):
            self._shared_timer = asyncio.get_running_loop().call_later(SHARED_POLL_SECONDS, self._poll_shared)
