"""A connection's control messages: subscriptions, positions, shared memory and lapped reports, in order.

The scan gives control messages a verdict of their own; after the batch that
held them is forwarded, the engine hands them here, and what they ask for
applies to what the connection receives from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.server.connection import Connection
from jitrelay.server.cursors import CursorFlag, CursorTable
from jitrelay.server.log import RelayLog

log = logging.getLogger("jitrelay.relay")


class Controls:
    """The Relay's handling of control messages.

    State lives on the Relay (``server/engine.py``); the names below are declared for the type checker only.
    """

    scan_out: kernels.ScanBuffers
    cursors: CursorTable[Connection]
    stop_sending: Callable[[Connection], None]
    _lapped: Callable[[Connection, protocol.Lapped], None]
    _position: Callable[[Connection, protocol.Position | bool | None], None]
    _share: Callable[[Connection], None]
    _retarget: Callable[[], None]
    _unfinished_share: Callable[[Connection, protocol.Filter], bytes]
    _to_cursor: Callable[..., None]
    _write_when_ready: Callable[[Connection], None]
    log: RelayLog

    def _apply_controls(self, conn: Connection, count: int) -> None:
        """Apply the connection's control messages, in order, to what it receives from now on."""
        offsets = self.scan_out.offsets
        before = conn.filter
        asked: protocol.Position | bool | None = False
        share = False
        for k in np.flatnonzero(self.scan_out.verdicts[:count] == protocol.CONTROL):
            message = conn.view[offsets[k] : offsets[k + 1]]
            conn.filter = protocol.apply_control(conn.filter, message)
            if protocol.declares_publish_only(message):
                self.cursors.set_flag(conn, CursorFlag.PUBLISH_ONLY)
            wanted = protocol.requested_position(message)
            asked = asked if wanted is False else wanted
            share = share or protocol.requests_shared_memory(message)
            report = protocol.lapped_report(message)
            if report is not None:
                self._lapped(conn, report)
        if conn.granted:  # it reads the mapped log and filters it itself: the socket carries nothing more
            return
        if conn.never_reads:
            if conn.filter != before or asked is not False or share:
                log.warning(
                    "%s asks to receive, but it never read what it was sent: ignored (it must reconnect)", conn.peer
                )
            return
        if conn.publish_only:
            log.info("%s publishes only; it receives nothing", conn.peer)
        elif conn.filter != before or asked is False:
            log.info("%s subscribes to %s", conn.peer, protocol.describe_filter(conn.filter))
        if conn.filter != before and (conn.behind or conn.positioned):
            # What it owed under the old filter is not what it asks for now: it starts again at the head, once
            # the message (or notice) its socket took part of is finished.
            asked = asked if asked is not False or not conn.positioned else True
            unfinished = self._unfinished_share(conn, before)
            self.stop_sending(conn)
            if unfinished:
                conn.prefix += unfinished
                self._to_cursor(conn, self.log.head)
                self._write_when_ready(conn)
        if asked is not False and not conn.publish_only:
            self._position(conn, asked)
        if share and not conn.publish_only:
            self._share(conn)
        self._retarget()
