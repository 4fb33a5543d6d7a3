"""One peer of the relay: the asyncio protocol that reads into its buffer, and its cursor into the log.

A connection is the event loop's side of a peer: it is accepted (credentials
or address checked), reads straight into its buffer or the log's ring, and on
close salvages what the peer sent before its transport went. It holds the
state the engine's cursors work on, but decides nothing about what is
forwarded or sent: that is the engine's (``server/engine.py``). It is apart
so that the engine keeps only the relay's own logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections import Counter, deque
from typing import Protocol, cast

import numpy as np

from jitrelay.core import protocol
from jitrelay.core.domains import RelayLogic
from jitrelay.core.shared_log import S_POSITION
from jitrelay.core.units import MiB
from jitrelay.server.cursors import CursorFlag, CursorMode, CursorTable
from jitrelay.server.journal import Replay
from jitrelay.server.log import RelayLog
from jitrelay.server.shared_memory import SharedLogMemory
from jitrelay.server.tls import TlsPeer

log = logging.getLogger("jitrelay.relay")

SOCKET_BUFFER = 4 * MiB  # kernel buffers per connection: fewer, larger reads and sends
SALVAGE_LIMIT = 4  # receive buffers' worth read from a connection that closed under the relay
_PEERCRED = struct.Struct("3i")
# The table's codes as plain ints: a connection's properties read them for every batch.
_BEHIND, _REPLAYING = int(CursorMode.BEHIND), int(CursorMode.REPLAYING)
_HELD, _POSITIONED, _SHARING, _GRANTED = (
    int(CursorFlag.HELD),
    int(CursorFlag.POSITIONED),
    int(CursorFlag.SHARING),
    int(CursorFlag.GRANTED),
)
_PUBLISH_ONLY, _NEVER_READS = int(CursorFlag.PUBLISH_ONLY), int(CursorFlag.NEVER_READS)


class ConnectionOwner(Protocol):
    """What a connection asks of the relay it belongs to (the engine's ``Relay``)."""

    logic: RelayLogic
    log: RelayLog
    memory: SharedLogMemory
    cursors: CursorTable[Connection]
    ring_bytes: memoryview
    refused: Counter[str]
    stopping: bool
    torn_messages: int

    def refusal(self, conn: Connection) -> str | None: ...
    def add(self, conn: Connection) -> None: ...
    def remove(self, conn: Connection) -> None: ...
    def stop_sending(self, conn: Connection) -> None: ...
    def read_space(self, conn: Connection) -> int: ...
    def on_data(self, conn: Connection, arrived: int) -> None: ...
    def on_direct_data(self, conn: Connection, at: int, arrived: int) -> None: ...
    def after_read(self, conn: Connection) -> None: ...


class Connection(asyncio.BufferedProtocol):
    """One client connection: a publisher, a subscriber, or both; as a subscriber, a cursor into the log."""

    def __init__(self, relay: ConnectionOwner, conn_id: int, tls_peer: TlsPeer | None = None):
        self.relay = relay
        self.conn_id = conn_id
        self.tls_peer = tls_peer  # a peer the TLS front admitted: it reaches the engine over a socketpair
        # Set by ``connection_made``, before the event loop calls anything else of the protocol's.
        self.transport: asyncio.Transport
        self.peer = f"conn={conn_id}"
        self.pid = self.uid = self.gid = -1
        self.buf = np.empty(relay.logic.buffer_size, dtype=np.uint8)
        self.view = self.buf.data
        self.filled = 0
        self.direct_at = -1  # where in the log's ring the read under way lands, when it reads there
        self.counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
        self.bytes_in = 0
        self.bytes_out = 0
        self.fault = protocol.NO_FAULT
        self.slow_timer: asyncio.TimerHandle | None = None
        self.spare: socket.socket | None = None  # a second descriptor: sends from the log, and salvage
        self.fd = -1
        self.polled = -1  # its slot in the relay's epoll set while the relay reads it itself (``polled_reads``)
        self.filter: protocol.Filter = protocol.EVERYTHING  # what it asked to receive (control messages)
        self.published = False  # has appended a batch to the log: its cursor skips its own batches
        # The cursor: its mode, flags and position are its slot in the relay's table (``server/cursors.py``), from
        # ``Relay.add`` until the relay is done with it. Keeping up: it is at the head and gets each batch from the
        # send loop. Behind: an unfiltered one resumes at ``position``; a filtered one owes the stream ranges in
        # ``owed``.
        self.cursor_slot = -1
        self.owed: deque[np.ndarray] = deque()  # (k, 2) arrays of [start, end) stream offsets, oldest first
        # Positions (opt in, docs/protocol.md): notices in its stream say where each run of messages starts.
        self.stream_at: int | None = None  # stream offset after the last log byte sent; None: a notice is due
        self.prefix = bytearray()  # bytes due before any more from the log: notices, the rest of a cut message
        self.writing = False  # a writability callback is registered
        self.replay: Replay | None = None  # resuming from the journal, before the log takes over
        self.replay_epoch = 0  # the epoch the last position notice of the replay named
        # A publisher found never to read its socket (``Relay._never_read``): from then on treated as publish-only,
        # and what it is not sent is counted from ``unread_from``: (messages, bytes) its cursor still owed, then
        # the log's message count and head, and its own published messages and bytes, all at the moment.
        self.unread_from: tuple[int, int, int, int, int, int] | None = None
        self.has_read = False  # the kernel said it read some of what it was sent: it is never judged again
        self.messages_published = 0  # messages (and bytes) of its own the log took
        self.bytes_published = 0
        # Shared memory (opt in): asked, then caught up over the socket, then granted a slot in the mapped log.
        self.shared_slot = -1  # its reader slot, from the moment the grant is sent

    # asyncio protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, though they are one: no isinstance check.
        transport = self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        # TCP peers have no credentials: their address, checked against the allowed networks, stands in for them.
        self.address: str | None = None
        refusal = None
        if self.tls_peer is not None:  # checked by the TLS front (``server.tls``): address, then certificate names
            self.address = self.tls_peer.host
            self.peer = f"conn={self.conn_id} tls {self.tls_peer.label}"
            tcp = True  # a network peer from here on, except that its socket is the socketpair's
        elif tcp:
            host, port = transport.get_extra_info("peername")[:2]
            self.address = host
            self.peer = f"conn={self.conn_id} addr={f'[{host}]' if ':' in host else host}:{port}"
            if not self.relay.logic.admits_address(host):
                self.relay.refused["not_allowed"] += 1
                refusal = f"address {host} is not in an allowed network"
        else:
            with contextlib.suppress(OSError, AttributeError):
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
                self.pid, self.uid, self.gid = _PEERCRED.unpack(creds)
                self.peer = f"conn={self.conn_id} pid={self.pid} uid={self.uid}"
        refusal = refusal or self.relay.refusal(self)
        if refusal:
            log.warning("refusing %s%s: %s", self.peer, "" if tcp else f" gid={self.gid}", refusal)
            transport.abort()
            return
        try:
            self.spare = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError as exc:
            log.warning("refusing %s: %s", self.peer, exc)
            transport.abort()
            return
        self.spare.setblocking(False)
        self.fd = self.spare.fileno()
        with contextlib.suppress(OSError):
            self.spare.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            self.spare.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            if sock.family != socket.AF_UNIX:
                self.spare.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.relay.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        at = self.relay.read_space(self)
        if at < 0:
            self.direct_at = -1
            return self.view[self.filled :]
        self.direct_at = at
        return self.relay.ring_bytes[at + self.filled : at + self.relay.log.reserve]

    def buffer_updated(self, nbytes: int) -> None:
        arrived = time.perf_counter_ns()
        self.filled += nbytes
        self.bytes_in += nbytes
        if self.direct_at >= 0:
            at, self.direct_at = self.direct_at, -1
            self.relay.on_direct_data(self, at, arrived)
        else:
            self.relay.on_data(self, arrived)
        self.relay.after_read(self)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.stop_sending(self)  # a held publisher stays held: its buffered messages go out when there is room
        if self.spare is not None:
            if self.fault == protocol.NO_FAULT and not self.relay.stopping:
                self._salvage()
            self.spare.close()
        if self.filled and self.fault == protocol.NO_FAULT and not self.held:
            self.relay.torn_messages += 1
            log.info("%s closed mid-message; discarded %d bytes of an unfinished message", self.peer, self.filled)
        self.filled = 0
        self.relay.remove(self)

    def _salvage(self) -> None:
        """Forward what the peer sent before its transport closed under it.

        uvloop closes a connection on a write error (a peer that exits with
        unread data gets a reset) or on ``abort`` without reading what is still
        queued on the socket. Those are complete messages the peer sent; the
        spare descriptor reads them, up to what is queued now and at most
        ``SALVAGE_LIMIT`` buffers.
        """
        budget = SALVAGE_LIMIT * len(self.buf)
        while budget > 0 and self.fault == protocol.NO_FAULT and not self.held:
            self.direct_at = -1  # salvage reads into the connection's own buffer
            try:
                assert self.spare is not None  # salvage runs only on a connection that was accepted
                nbytes = self.spare.recv_into(self.view[self.filled :])
            except OSError:
                return
            if not nbytes:
                return
            budget -= nbytes
            self.buffer_updated(nbytes)

    # the cursor, read from the relay's table (a connection without a slot has none: it keeps up, flagless)

    @property
    def behind(self) -> bool:
        """Its own writer serves it, from its position in the log (or the journal first)."""
        slot = self.cursor_slot
        return slot >= 0 and _BEHIND <= self.relay.cursors.mode[slot] <= _REPLAYING

    @property
    def position(self) -> int:
        """Where an unfiltered cursor that is behind resumes in the log's stream."""
        slot = self.cursor_slot
        return int(self.relay.cursors.position[slot]) if slot >= 0 else 0

    @property
    def held(self) -> bool:
        """A publisher paused under ``block`` until the log has room for its bytes."""
        return self._flagged(_HELD)

    @property
    def positioned(self) -> bool:
        """It asked for position notices."""
        return self._flagged(_POSITIONED)

    @property
    def publish_only(self) -> bool:
        """It declared it never reads: no target list holds it, so it is never slow."""
        return self._flagged(_PUBLISH_ONLY)

    @property
    def never_reads(self) -> bool:
        """A publisher found never to read its socket: treated as publish-only from then on."""
        return self._flagged(_NEVER_READS)

    @property
    def sharing(self) -> bool:
        """It asked for shared memory; the socket still carries its stream until the grant."""
        return self._flagged(_SHARING)

    @property
    def granted(self) -> bool:
        """The grant is out: it reads the log from shared memory, the socket carries nothing."""
        return self._flagged(_GRANTED)

    def _flagged(self, flag: int) -> bool:
        slot = self.cursor_slot
        return slot >= 0 and bool(self.relay.cursors.flags[slot] & flag)

    def needed(self, selection: protocol.Filter | None = None) -> int:
        """The oldest stream offset this subscriber still has to receive (the head when it keeps up).

        ``selection``: the filter its cursor was made for, when that is not its filter any more.
        """
        if self.shared_slot >= 0:  # a reader of the mapped log says itself how far it has read
            return int(self.relay.memory.slots[self.shared_slot, S_POSITION])
        if not self.behind or self.replay is not None:  # a replay reads the journal: it holds nothing in the log
            return self.relay.log.head
        if (self.filter if selection is None else selection) == protocol.EVERYTHING:
            return self.position
        return int(self.owed[0][0, 0]) if self.owed else self.relay.log.head
