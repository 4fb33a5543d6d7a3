"""The relay's I/O shell: sockets, receive buffers, the log, cursors, back-pressure, shutdown.

Data path, per read: uvloop reads straight into the connection's numpy
buffer (``BufferedProtocol``); one ``kernels.scan_into`` call frames and
judges every complete message in it; the accepted runs are appended once to
the relay's log (``log.RelayLog``); one compiled call (``kernels.FanOut``)
hands the new bytes, straight from the log, to every subscriber that is
keeping up; the partial message at the end, if any, moves to the front of the
receive buffer for the next read.

Every subscriber is a cursor into the log. One whose socket took less than
the batch falls behind alone: it waits for writability on its own socket and
resumes from its position, while everyone else goes on. Nothing is queued
per subscriber but positions (for a filtered one, the stream ranges its
filter selected), and nothing is ever handed to uvloop to write, so uvloop
never holds memory the relay will change.

Memory is bounded: the log, a receive buffer per connection (pages touched
only by publishers), and per filtered subscriber that is behind, its ranges.
A subscriber the log is about to leave behind is cut off under ``disconnect``;
under ``block`` the publishers wait until the slowest cursor makes room. A
publisher that has never read a byte of what it was sent (``_never_read``) is
neither: it is detached from the log, and what it is not sent is counted.
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
from typing import cast

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.domains import BLOCK, DISCONNECT, FSYNC_BATCH, JOURNAL_PAUSE, RelayLogic
from jitrelay.core.histogram import Histogram
from jitrelay.core.shared_log import S_POSITION
from jitrelay.core.units import MiB
from jitrelay.server.figures import Figures
from jitrelay.server.journal import Journal, Replay, find_replay
from jitrelay.server.log import RelayLog
from jitrelay.server.shared_memory import SharedLogMemory
from jitrelay.server.tls import TlsPeer
from jitrelay.server.unread import Unjudgeable, peer_unread_bytes

log = logging.getLogger("jitrelay.relay")

SHUTDOWN_FLUSH_SECONDS = 1.0
SOCKET_BUFFER = 4 * MiB  # kernel buffers per connection: fewer, larger reads and sends
CATCH_UP_BYTES = 8 * MiB  # the most one writability callback hands a subscriber that is behind
CATCH_UP_PIECES = 1024  # and in at most this many pieces (one sendmsg)
SALVAGE_LIMIT = 4  # receive buffers' worth read from a connection that closed under the relay
JOURNAL_RETRY_SECONDS = 0.2  # how often a relay holding its publishers tries a failed journal append again
SLOW_PIDS_KEPT = 1000  # pids of the latest subscribers dropped as slow, for the figures
DIRECT_CARRY_LIMIT = 64 * 1024  # the most of an unfinished message copied into the ring to read the rest there
SHARED_POLL_SECONDS = 0.001  # how often a relay held by a shared-memory reader under ``block`` looks again
_PEERCRED = struct.Struct("3i")


class Connection(asyncio.BufferedProtocol):
    """One client connection: a publisher, a subscriber, or both; as a subscriber, a cursor into the log."""

    def __init__(self, relay: Relay, conn_id: int, tls_peer: TlsPeer | None = None):
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
        self.filter: protocol.Filter = protocol.EVERYTHING  # what it asked to receive (control messages)
        self.published = False  # has appended a batch to the log: its cursor skips its own batches
        # The cursor. Keeping up (``behind`` False): it is at the head and gets each batch from the send loop.
        # Behind: an unfiltered one resumes at ``position``; a filtered one owes the stream ranges in ``owed``.
        self.behind = False
        self.position = 0
        self.owed: deque[np.ndarray] = deque()  # (k, 2) arrays of [start, end) stream offsets, oldest first
        self.held = False  # a publisher paused under ``block`` until the log has room for its bytes
        # Positions (opt in, docs/protocol.md): notices in its stream say where each run of messages starts.
        self.positioned = False
        self.stream_at: int | None = None  # stream offset after the last log byte sent; None: a notice is due
        self.prefix = bytearray()  # bytes due before any more from the log: notices, the rest of a cut message
        self.writing = False  # a writability callback is registered
        self.replay: Replay | None = None  # resuming from the journal, before the log takes over
        self.replay_epoch = 0  # the epoch the last position notice of the replay named
        self.publish_only = False  # it declared it never reads: no target list holds it, so it is never slow
        # A publisher found never to read its socket (``Relay._never_read``): from then on treated as publish-only,
        # and what it is not sent is counted from ``unread_from``: (messages, bytes) its cursor still owed, then
        # the log's message count and head, and its own published messages and bytes, all at the moment.
        self.never_reads = False
        self.unread_from: tuple[int, int, int, int, int, int] | None = None
        self.has_read = False  # the kernel said it read some of what it was sent: it is never judged again
        self.messages_published = 0  # messages (and bytes) of its own the log took
        self.bytes_published = 0
        # Shared memory (opt in): asked, then caught up over the socket, then granted a slot in the mapped log.
        self.sharing = False  # asked; the socket still carries its stream until the grant
        self.shared_slot = -1  # its reader slot, from the moment the grant is sent
        self.granted = False  # the grant is out: it reads the log from shared memory, the socket carries nothing

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

    # the cursor

    def needed(self) -> int:
        """The oldest stream offset this subscriber still has to receive (the head when it keeps up)."""
        if self.shared_slot >= 0:  # a reader of the mapped log says itself how far it has read
            return int(self.relay.memory.slots[self.shared_slot, S_POSITION])
        if not self.behind or self.replay is not None:  # a replay reads the journal: it holds nothing in the log
            return self.relay.log.head
        if self.filter == protocol.EVERYTHING:
            return self.position
        return int(self.owed[0][0, 0]) if self.owed else self.relay.log.head


class Relay:
    """Appends every valid message a connection sends to its log, and sends each subscriber its share from there."""

    def __init__(self, logic: RelayLogic, journal: Journal | None = None, kernel_load_seconds: float = 0.0):
        self.logic = logic
        self.kernel_load_seconds = kernel_load_seconds  # what ``serve.warm_up`` took, for the figures
        self.journal = journal
        self.journal_errors = 0
        self._journal_timer: asyncio.TimerHandle | None = None
        self.tables = kernels.tables_for(logic)
        self.scan_out = kernels.ScanBuffers(logic.buffer_size)
        mirror = protocol.HEADER_SIZE + logic.max_payload
        # The ring keeps ``log_size`` bytes and one receive buffer more: reads land straight in the log there.
        ring_size = logic.log_size + logic.buffer_size
        self.memory = SharedLogMemory(ring_size, mirror, logic.max_connections)
        self.log = RelayLog(ring_size, mirror, ring=self.memory.ring, reserve=logic.buffer_size)
        self.ring_bytes = self.log.ring.data
        self.memory.start(self.log.epoch)
        self._shared: set[Connection] = set()  # readers of the mapped log (each knows its slot)
        self._shared_timer: asyncio.TimerHandle | None = None
        self.connections: dict[int, Connection] = {}
        # Who receives what: connections without a filter get every forwarded
        # byte; each distinct filter is a group whose runs ``kernels.scan_and_route`` cuts.
        self._groups: tuple[tuple[Connection, ...], ...] = ()
        self._group_filters: list[protocol.Filter] = []
        self._group_tables: kernels.GroupTables | None = None
        self._routed = kernels.RouteBuffers(logic.buffer_size, 1)
        # The send loop's targets: every subscriber keeping up, in ``_targets`` order; rebuilt when that changes.
        self._fan = kernels.FanOut()
        self._targets: list[Connection] = []
        self._target_group = np.zeros(0, dtype=np.int64)  # -1 for the unfiltered, else the group index
        self._targets_dirty = True
        self._behind: set[Connection] = set()
        self._positioned: set[Connection] = set()  # they are always sent to from their cursors, with notices
        self._held: set[Connection] = set()
        self._journal_held: list[Connection] = []  # publishers whose batch waits for the journal to write again
        self._journal_retry: asyncio.TimerHandle | None = None
        self._next_id = 0
        self._reading = True
        self.retired_counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
        self.faults: Counter[str] = Counter()
        self.slow_disconnects = 0
        self.slow_pids: deque[int] = deque(maxlen=SLOW_PIDS_KEPT)  # of those dropped, for tools that match them
        self.torn_messages = 0  # connections closed with part of a message in their buffer
        self.slow_pauses = 0  # times a publisher was held under ``block`` because the log was full
        self.gap_notices = 0  # positioned subscribers told of what they missed instead of being cut off
        self.fell_behind = 0  # times a subscriber's socket took less than a batch
        # Publishers found never to read (``_never_read``): how many, those still open, and what the closed
        # ones were not sent.
        self.never_reading = 0
        self._unread: set[Connection] = set()
        self.retired_unread_messages = 0
        self.retired_unread_bytes = 0
        self._cannot_judge_said = False
        self.retired_bytes_in = 0  # bytes read from connections that have closed
        self.bytes_forwarded = 0
        self.batches = 0
        self.accepted = 0
        self.refused: Counter[str] = Counter()
        self.stopping = False
        # Nanoseconds from a read reaching the engine to the send loop's return, and the part of it spent
        # inside the send loop's system calls: the rest is the relay's own work.
        self.forward_time = Histogram()
        self.send_time = Histogram()
        self.own_time = Histogram()
        self.messages_timed = 0

    def refusal(self, conn: Connection) -> str | None:
        """Why ``conn`` may not connect, or None."""
        if conn.address is None and not self.logic.admits(conn.uid, conn.gid):  # TCP peers: see connection_made
            self.refused["not_allowed"] += 1
            return f"uid {conn.uid} / gid {conn.gid} not allowed"
        if len(self.connections) >= self.logic.max_connections:
            self.refused["connection_limit"] += 1
            return f"connection limit {self.logic.max_connections} reached"
        return None

    def new_connection(self, tls_peer: TlsPeer | None = None) -> Connection:
        self._next_id += 1
        return Connection(self, self._next_id, tls_peer)

    # membership

    def add(self, conn: Connection) -> None:
        self.connections[conn.conn_id] = conn
        self.accepted += 1
        self._retarget()
        if not self._reading:
            conn.transport.pause_reading()
        log.info("%s connected", conn.peer)

    def remove(self, conn: Connection) -> None:
        if self.connections.pop(conn.conn_id, None) is None:
            return
        self.retired_counts += conn.counts
        self.retired_bytes_in += conn.bytes_in
        if conn.shared_slot >= 0:
            self._shared.discard(conn)
            self.memory.release(conn.shared_slot)
            conn.shared_slot = -1
            if not self.memory.claimed:
                self.log.publisher = None  # no reader maps the log: appends stop publishing its extent
            self._release_held()
        self._retarget()
        if conn.never_reads:
            messages, nbytes = self._not_taken(conn)
            self.retired_unread_messages += messages
            self.retired_unread_bytes += nbytes
            self._unread.discard(conn)
            log.info(
                "%s disconnected (received %d bytes, sent %d bytes); it never read: "
                "not sent %d messages (%d bytes) since it was detached",
                conn.peer,
                conn.bytes_in,
                conn.bytes_out,
                messages,
                nbytes,
            )
            return
        log.info("%s disconnected (received %d bytes, sent %d bytes)", conn.peer, conn.bytes_in, conn.bytes_out)

    def stop_sending(self, conn: Connection) -> None:
        """Forget ``conn``'s cursor before its descriptors close: no writability wait, no place among the targets."""
        self._drop_cursor(conn)
        self._release_held()

    def _drop_cursor(self, conn: Connection) -> None:
        """``stop_sending`` without letting held publishers go: for callers in the middle of judging room."""
        if conn.behind:
            conn.behind = False
            self._behind.discard(conn)
        self._positioned.discard(conn)
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

    def _retarget(self) -> None:
        live = [
            c
            for c in self.connections.values()
            if not (c.publish_only or c.never_reads or c.granted or c.transport.is_closing())
        ]
        groups: dict[protocol.Filter, list[Connection]] = {}
        for conn in live:
            if conn.filter != protocol.EVERYTHING:
                groups.setdefault(conn.filter, []).append(conn)
        filters = list(groups)
        if filters != self._group_filters:
            self._group_filters = filters
            self._group_tables = kernels.group_tables(filters) if filters else None
        self._groups = tuple(tuple(members) for members in groups.values())
        self._targets_dirty = True

    def _rebuild_targets(self) -> None:
        """The send loop's target arrays: every live subscriber that keeps up, with its group's iovec slice."""
        for i, conn in enumerate(self._targets):  # what the loop sent them since the last rebuild
            conn.bytes_out += int(self._fan.totals[i])
        group_of = {conn: g for g, members in enumerate(self._groups) for conn in members}
        targets = [
            c
            for c in self.connections.values()
            if not (c.behind or c.publish_only or c.never_reads or c.granted or c.transport.is_closing()) and c.fd >= 0
        ]
        self._fan.reserve(len(targets), 0)
        for i, conn in enumerate(targets):
            self._fan.fds[i] = conn.fd
        self._targets = targets
        self._target_group = np.array([group_of.get(c, -1) for c in targets], dtype=np.int64)
        self._fan.totals[: len(targets)] = 0
        self._targets_dirty = False

    # the data path

    def on_data(self, conn: Connection, arrived: int) -> None:
        if self._journal_retry is not None:  # the journal does not write: nothing more is read until it does
            self._hold_for_journal(conn)
            return
        if self._must_hold(conn.filled, conn):
            self._hold(conn)
            return
        counted = conn.counts.copy() if self.journal is not None else None  # undone if the journal refuses
        before = int(conn.counts[protocol.FORWARD])
        result = self._scan(conn, conn.buf, 0, conn.filled)
        if result.forwarded_bytes and not self._forward(
            conn, result, int(conn.counts[protocol.FORWARD]) - before, arrived
        ):
            assert counted is not None  # only the journal refuses a batch
            conn.counts[:] = counted  # the batch was not taken: it is judged again when the journal writes
            self._hold_for_journal(conn)
            return
        if result.controls:
            self._apply_controls(conn, result.count)
        if result.fault != protocol.NO_FAULT:
            self._close_faulty(conn, result.fault, result.consumed)
            return
        leftover = conn.filled - result.consumed
        if leftover and result.consumed:
            conn.buf[:leftover] = conn.buf[result.consumed : conn.filled]
        conn.filled = leftover

    def read_space(self, conn: Connection) -> int:
        """Where ``conn``'s next read may land in the log's ring (its unfinished message copied there first), or -1.

        A read lands in the ring when what it brings can be taken as it is:
        then the log's copy is the read itself. Anything else (a message that
        is not forwarded, a control message, a fault, a batch the journal or
        ``block`` holds back) is moved to the connection's own buffer and
        takes the usual way.
        """
        if self._journal_retry is not None or conn.filled > DIRECT_CARRY_LIMIT:
            return -1
        at, room = self.log.space()
        if room < self.log.reserve:  # near the end of the ring: the usual way, until the head wraps
            return -1
        if conn.filled:
            self.log.ring[at : at + conn.filled] = conn.buf[: conn.filled]
        return at

    def on_direct_data(self, conn: Connection, at: int, arrived: int) -> None:
        """A read that landed in the ring at ``at``: forward it where it lies, or hand it to ``on_data``.

        ``on_data`` takes whatever this does not: a read with anything but forwarded messages, one that
        ``block`` must hold, one the journal refused (it then holds the publisher until the journal writes).
        """
        n = conn.filled
        ring = self.log.ring
        if not self._must_hold(n, conn):
            counted = conn.counts.copy()
            before = int(counted[protocol.FORWARD])
            result = self._scan(conn, ring, at, at + n)
            size = result.forwarded_bytes
            clean = size == result.consumed - at and not result.controls and result.fault == protocol.NO_FAULT
            if size and clean and self._forward(conn, result, int(conn.counts[protocol.FORWARD]) - before, arrived, at):
                conn.filled = n - size
                conn.buf[: conn.filled] = ring[at + size : at + n]
                return
            conn.counts[:] = counted  # judged again there
        conn.buf[:n] = ring[at : at + n]
        self.on_data(conn, arrived)

    def _must_hold(self, nbytes: int, sender: Connection) -> bool:
        """Under ``block``: whether ``nbytes`` more from ``sender`` would pass the slowest cursor, so it waits."""
        return (
            self.logic.slow_policy == BLOCK
            and bool(self._behind or self._shared)
            and not self._has_room(nbytes, sender)
        )

    def _scan(self, conn: Connection, buf: np.ndarray, start: int, end: int) -> kernels.ScanResult:
        """Frame and judge ``buf[start:end]`` for ``conn``; with filters, each group's runs in the same call."""
        if self._groups:
            assert self._group_tables is not None  # built with the groups
            result, self._routed = kernels.scan_and_route(
                buf, start, end, self.tables, self.scan_out, self._group_tables, self._routed, conn.counts
            )
            return result
        return kernels.scan_into(buf, start, end, self.tables, self.scan_out, conn.counts)

    def _forward(
        self, sender: Connection, result: kernels.ScanResult, messages: int, arrived: int, direct: int = -1
    ) -> bool:
        """Journal the accepted runs, append them to the log once, hand them to every subscriber that keeps up.

        With ``direct``, the runs are one, already in the ring at that offset: the log takes them as they lie.
        False when the journal refused them under ``journal_on_error = pause``: nothing was forwarded.
        """
        log_ = self.log
        size = result.forwarded_bytes
        runs = self.scan_out.runs
        if self.journal is not None and not self._journal(
            [self.ring_bytes[direct : direct + size]]
            if direct >= 0
            else [sender.view[runs[2 * k] : runs[2 * k + 1]] for k in range(result.runs)],
            (log_.epoch, log_.head, log_.messages),
        ):
            return False
        if self._behind:
            self._leave_behind(log_.tail_after(size), sender)
        first_message = log_.messages
        if direct >= 0:
            start = log_.commit(size, messages, sender.conn_id)
        else:
            start = log_.append(sender.buf, runs, result.runs, size, messages, sender.conn_id)
        sender.published = True
        sender.messages_published += messages
        sender.bytes_published += size
        self.bytes_forwarded += size
        self.batches += 1
        if self._targets_dirty:
            self._rebuild_targets()
        group_ranges = self._group_ranges(start, first_message, result) if self._groups else None
        if self._behind:
            self._owe(sender, group_ranges)
        for conn in self._positioned:
            if not conn.writing and (conn.owed if conn.filter != protocol.EVERYTHING else conn is not sender):
                self._write_when_ready(conn)
        if self._shared:
            self.memory.wake()  # every sleeping reader of the mapped log, in one call
        if self._targets:
            self._send_batch(sender, start, size, group_ranges, arrived)
        done = time.perf_counter_ns()
        self.forward_time.record(done - arrived)
        self.messages_timed += result.count
        if self._behind:
            self._check_lag()
        return True

    def _group_ranges(self, start: int, first_message: int, result: kernels.ScanResult) -> list[np.ndarray]:
        """Each group's runs of this batch as ``(k, 3)`` rows: stream start, end, and the first message's number."""
        runs = self.scan_out.runs[: 2 * result.runs]
        starts, ends = runs[0::2], runs[1::2]
        at = start + np.concatenate(([0], np.cumsum(ends - starts)[:-1]))  # where each forwarded run landed
        forwarded = self.scan_out.offsets[: result.count][self.scan_out.verdicts[: result.count] == protocol.FORWARD]
        ranges = []
        routed = self._routed
        for g in range(len(self._groups)):
            own = routed.group_runs(g).reshape(-1, 2)
            k = np.searchsorted(starts, own[:, 0], side="right") - 1
            rows = np.empty((len(own), 3), dtype=np.int64)
            rows[:, :2] = own - starts[k, None] + at[k, None]
            rows[:, 2] = first_message + np.searchsorted(forwarded, own[:, 0])
            ranges.append(rows)
        return ranges

    def _send_batch(
        self, sender: Connection, start: int, size: int, group_ranges: list[np.ndarray] | None, arrived: int
    ) -> None:
        """One call into the send loop for every subscriber that keeps up; the ones left short fall behind."""
        fan = self._fan
        n = len(self._targets)
        if not group_ranges:  # everyone gets the whole batch: its one or two pieces of the ring
            address = self.log.address
            pieces = self.log.pieces(start, start + size)
            fan.reserve(n, 2)
            for k, (at, length) in enumerate(pieces):
                fan.iovecs[2 * k] = address + at
                fan.iovecs[2 * k + 1] = length
            sending = time.perf_counter_ns()
            short = fan.send_uniform(n, len(pieces), sender.fd)
            due = None
        else:
            slices = [np.array([[start, start + size, 0]], dtype=np.int64), *group_ranges]
            fan.reserve(n, sum(2 * len(s) for s in slices))
            firsts = np.zeros(len(slices), dtype=np.int64)
            counts = np.zeros(len(slices), dtype=np.int64)
            wanted = np.zeros(len(slices), dtype=np.int64)
            k = 0
            for i, ranges in enumerate(slices):
                firsts[i] = k
                counts[i] = taken = self._write_iovecs(ranges, k)
                wanted[i] = size if i == 0 else int((ranges[:, 1] - ranges[:, 0]).sum())
                k += taken
            slot = self._target_group + 1
            fan.iov_first[:n] = firsts[slot]
            fan.iov_count[:n] = counts[slot]
            due = wanted[slot]
            sending = time.perf_counter_ns()
            short = fan.send(n, sender.fd)
        sent_at = time.perf_counter_ns()
        self.send_time.record(sent_at - sending)
        self.own_time.record(sending - arrived)
        if not short:
            return
        sent = fan.sent[:n]
        wanted_each = size if due is None else due
        for t in np.flatnonzero((sent != kernels.SEND_SKIPPED) & (sent < wanted_each)):
            conn = self._targets[t]
            taken = max(0, int(sent[t]))
            g = int(self._target_group[t])
            if g < 0:
                self._fall_behind(conn, position=start + taken)
            else:
                assert group_ranges is not None  # a target in a group was sent its group's ranges
                self._fall_behind(conn, owed=_after(group_ranges[g], taken))

    def _write_iovecs(self, ranges: np.ndarray, at: int) -> int:
        """Write the ring pieces of ``(k, 2)`` stream ranges into the send loop's iovecs from ``at``; how many."""
        fan = self._fan
        size = self.log.size
        phys = ranges[:, 0] % size
        lengths = ranges[:, 1] - ranges[:, 0]
        if not len(ranges) or int((phys + lengths).max()) <= size:  # nothing wraps: one piece per range
            end = at + len(ranges)
            fan.iovecs[2 * at : 2 * end : 2] = self.log.address + phys
            fan.iovecs[2 * at + 1 : 2 * end : 2] = lengths
            return len(ranges)
        k = at
        for a, b, *_ in ranges.tolist():
            for offset, length in self.log.pieces(a, b):
                fan.iovecs[2 * k] = self.log.address + offset
                fan.iovecs[2 * k + 1] = length
                k += 1
        return k - at

    def _owe(self, sender: Connection, group_ranges: list[np.ndarray] | None) -> None:
        """Filtered subscribers that are behind owe their group's share of this batch (never their own batch)."""
        if not group_ranges:
            return
        for g, members in enumerate(self._groups):
            if len(group_ranges[g]):
                for conn in members:
                    if conn.behind and conn is not sender:
                        conn.owed.append(group_ranges[g])

    def _fall_behind(self, conn: Connection, position: int = 0, owed: np.ndarray | None = None) -> None:
        """A subscriber's socket took less than its share: from now on it catches up on its own, when writable."""
        conn.behind = True
        conn.position = position
        if owed is not None and len(owed):
            conn.owed.append(owed)
        self._behind.add(conn)
        self.fell_behind += 1
        self._targets_dirty = True
        self._write_when_ready(conn)

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
            conn.position = start
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
            conn.position = at
            conn.stream_at = at if conn.replay_epoch == log_.epoch else None  # else a notice names this epoch
            log.info("%s: replay from the journal done; the log takes over at %d", conn.peer, at)
            return
        if replay.epoch != conn.replay_epoch:
            conn.prefix += protocol.position_notice(protocol.Position(replay.epoch, replay.offset, replay.message))
            conn.replay_epoch = replay.epoch
        conn.prefix += chunk
        replay.advance(chunk)

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
            conn.position = start + n
            return
        while n and conn.owed:
            ranges = conn.owed[0]
            rest = _after(ranges, n)
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
        if conn.positioned:  # it stays with the cursors: every batch reaches it from the log, with notices
            conn.owed.clear()
            conn.position = self.log.head
            return
        conn.behind = False
        conn.owed.clear()
        self._behind.discard(conn)
        self._targets_dirty = True
        self._release_held()

    def _apply_controls(self, conn: Connection, count: int) -> None:
        """Apply the connection's control messages, in order, to what it receives from now on."""
        offsets = self.scan_out.offsets
        before = conn.filter
        asked: protocol.Position | bool | None = False
        share = False
        for k in np.flatnonzero(self.scan_out.verdicts[:count] == protocol.CONTROL):
            message = conn.view[offsets[k] : offsets[k + 1]]
            conn.filter = protocol.apply_control(conn.filter, message)
            conn.publish_only = conn.publish_only or protocol.declares_publish_only(message)
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
            # What it owed under the old filter is not what it asks for now: it starts again at the head.
            asked = asked if asked is not False or not conn.positioned else True
            self.stop_sending(conn)
        if asked is not False and not conn.publish_only:
            self._position(conn, asked)
        if share and not conn.publish_only:
            self._share(conn)
        self._retarget()

    # shared memory

    def _share(self, conn: Connection) -> None:
        """Move ``conn`` to the mapped log: first its socket catches up to the head, then the grant goes out."""
        if conn.sharing or conn.granted:
            return
        if conn.address is not None:
            log.warning("%s asked for shared memory over TCP; its stream stays on the socket", conn.peer)
            return
        conn.sharing = True
        if not conn.behind:
            conn.behind = True
            conn.position = self.log.head
            self._behind.add(conn)
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
        conn.sharing = False
        conn.granted = True
        self.stop_sending(conn)
        self._shared.add(conn)
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
        if self._held and self._shared:
            self._shared_timer = asyncio.get_running_loop().call_later(SHARED_POLL_SECONDS, self._poll_shared)

    # positions

    def _position(self, conn: Connection, asked: protocol.Position | bool | None) -> None:
        """Give ``conn`` position notices from now on, starting at the head or after the position it asked for."""
        log_ = self.log
        start = log_.head
        if isinstance(asked, protocol.Position):
            resumed = self._resume_start(conn, asked)
            if resumed is None:
                return
            start = resumed
        conn.positioned = True
        if start < 0:  # from the journal first: its notices say where each part starts
            self._positioned.add(conn)
            if not conn.behind:
                conn.behind = True
                self._behind.add(conn)
                self._targets_dirty = True
            conn.stream_at = None
            if not conn.writing:
                self._write_when_ready(conn)
            return
        self._positioned.add(conn)
        if not conn.behind:
            conn.behind = True
            self._behind.add(conn)
            self._targets_dirty = True
        if conn.filter == protocol.EVERYTHING:
            conn.position = start
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
            conn.position = tail
        else:
            while conn.owed and int(conn.owed[0][-1, 1]) <= tail:
                conn.owed.popleft()
        conn.stream_at = None
        log.warning(
            "%s fell out of the log: told of a gap of %d messages (%d bytes)", conn.peer, gap.messages, gap.bytes
        )
        if not conn.writing:
            self._write_when_ready(conn)

    def _journal(self, pieces: list, at: tuple[int, int, int]) -> bool:
        """Append a batch to the journal before anyone sees it (under ``batch``, fsync soon after); False: hold it."""
        assert self.journal is not None
        try:
            self.journal.append(pieces, at=at)
        except OSError as exc:
            self.journal_errors += 1
            if self.logic.journal_on_error == JOURNAL_PAUSE:
                if self._journal_retry is None:
                    log.error(
                        "journal %s: append failed (%s); holding publishers, nothing unjournaled is forwarded",
                        self.journal.path,
                        exc,
                    )
                    self._set_reading(False)
                    self._journal_retry = asyncio.get_running_loop().call_later(
                        JOURNAL_RETRY_SECONDS, self._retry_journal
                    )
                return False
            log.error("journal %s: append failed, batch forwarded unjournaled: %s", self.journal.path, exc)
            return True
        if self._journal_timer is None and self.logic.journal_fsync == FSYNC_BATCH:
            self._journal_timer = asyncio.get_running_loop().call_later(self.journal.sync_interval, self._sync_journal)
        return True

    def _hold_for_journal(self, conn: Connection) -> None:
        if conn not in self._journal_held:
            self._journal_held.append(conn)
            conn.transport.pause_reading()

    def _retry_journal(self) -> None:
        """Offer the held batches to the journal again, oldest first; resume reading once all are taken."""
        self._journal_retry = None
        waiting, self._journal_held = self._journal_held, []
        for i, conn in enumerate(waiting):
            self.on_data(conn, time.perf_counter_ns())
            if self._journal_retry is not None:  # refused again: the rest keep waiting, in order
                self._journal_held = [
                    *self._journal_held,
                    *[c for c in waiting[i + 1 :] if c not in self._journal_held],
                ]
                return
        log.info("journal %s writes again; publishers resume", self.journal.path if self.journal else "")
        self._set_reading(True)

    def _sync_journal(self) -> None:
        self._journal_timer = None
        assert self.journal is not None
        try:
            self.journal.sync()
        except OSError as exc:
            self.journal_errors += 1
            log.error("journal %s: fsync failed: %s", self.journal.path, exc)

    def _close_faulty(self, conn: Connection, fault: int, offset: int) -> None:
        reason = protocol.FAULT_NAMES[fault]
        conn.fault = fault
        self.faults[reason] += 1
        log.warning(
            "closing connection %s: %s at stream offset %d",
            conn.peer,
            reason,
            conn.bytes_in - conn.filled + offset,
        )
        conn.filled = 0
        self.stop_sending(conn)
        conn.transport.close()
        self._retarget()

    # slow subscribers

    def _leave_behind(self, tail: int, sender: Connection) -> None:
        """Before ``sender``'s append moves the log's tail to ``tail``: cut off every subscriber still before it.

        A publisher that never read a byte is not a subscriber falling behind: it is detached instead.
        """
        for conn in [c for c in self._behind if c.needed() < tail]:
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
        for conn in self._behind:
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
        if self._shared and int(self.memory.positions([c.shared_slot for c in self._shared]).min()) < tail:
            return False
        in_the_way = [c for c in self._behind if c.needed() < tail]  # a list: detaching one changes ``_behind``
        return all(self._never_read(conn, sender) for conn in in_the_way)

    # publishers that never read

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
        rest = b"".join(bytes(v) for v in log_.views(needed, boundary)) if boundary > needed else b""
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
        prefix = bytes(conn.prefix) + rest
        self._drop_cursor(conn)
        conn.never_reads = True
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
        if self._held:  # publishers it held may have room now; judged again outside whatever judges room now
            loop.call_soon(self._release_held)

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

    def _hold(self, conn: Connection) -> None:
        if not conn.held:
            conn.held = True
            self._held.add(conn)
            self.slow_pauses += 1
            conn.transport.pause_reading()
            if len(self._held) == 1:
                log.info("the log is full up to the slowest subscriber; holding %s", conn.peer)
        if self._shared and self._shared_timer is None:
            self._shared_timer = asyncio.get_running_loop().call_later(SHARED_POLL_SECONDS, self._poll_shared)

    def _release_held(self) -> None:
        """Let held publishers go on, oldest first, as far as the log has room for what they already sent."""
        if not self._held:
            return
        for conn in list(self._held):
            if not self._has_room(conn.filled):
                return
            conn.held = False
            self._held.discard(conn)
            self.on_data(conn, time.perf_counter_ns())  # a publisher that closed meanwhile still has these sent
            if not conn.held and self._reading and not conn.transport.is_closing():
                conn.transport.resume_reading()
        if not self._held:
            log.info("subscribers made room; publishers resume")

    def _set_reading(self, reading: bool) -> None:
        if reading == self._reading:
            return
        self._reading = reading
        for conn in self.connections.values():
            if conn.transport.is_closing() or conn.held:
                continue
            if reading:
                conn.transport.resume_reading()
            else:
                conn.transport.pause_reading()

    # figures

    @property
    def subscriber_groups(self) -> int:
        """Distinct subscription filters in force."""
        return len(self._groups)

    def figures(self) -> Figures:
        """Copy the relay's counters; call it on the relay's event-loop thread."""
        live = list(self.connections.values())
        head = self.log.head
        timing = self.forward_time
        verdicts = self.verdict_counts()
        unread_messages, unread_bytes = self._unread_totals()
        return Figures(
            domain=self.logic.name,
            verdicts=verdicts,
            bytes_received=self.retired_bytes_in + sum(conn.bytes_in for conn in live),
            bytes_forwarded=self.bytes_forwarded,
            faults=dict(self.faults),
            connections_open=len(live),
            connections_accepted=self.accepted,
            refused=dict(self.refused),
            pending_max=max((head - conn.needed() for conn in self._cursors()), default=0),
            slow_actions={
                "hold": self.slow_pauses,
                "disconnect": self.slow_disconnects,
                "gap_notice": self.gap_notices,
            },
            never_reading=self.never_reading,
            never_reading_open=len(self._unread),
            unread_messages=unread_messages,
            unread_bytes=unread_bytes,
            journal_errors=self.journal_errors,
            forward_buckets=tuple(timing.counts),
            forward_total_ns=timing.total,
            subscriber_groups=self.subscriber_groups,
            messages_received=sum(verdicts.values()),
            messages_forwarded=verdicts["forward"],
            batches=timing.count,
            forward_p50_us=timing.percentile(50) / 1e3,
            forward_p99_us=timing.percentile(99) / 1e3,
            forward_p99_9_us=timing.percentile(99.9) / 1e3,
            forward_max_us=timing.max / 1e3,
            forward_ns_per_message=timing.total / self.messages_timed if self.messages_timed else 0.0,
            slow_disconnected_pids=tuple(self.slow_pids),
            torn_messages=self.torn_messages,
            kernel_build=str(kernels.backend()["name"]),
            kernel_load_seconds=self.kernel_load_seconds,
            log_size=self.log.capacity,
            log_used=self.log.used,
            log_epoch=self.log.epoch,
            log_head=head,
            subscribers_behind=len(self._behind),
            fell_behind=self.fell_behind,
            lags=tuple(
                (conn.peer, head - conn.needed(), self.log.messages_from(conn.needed())) for conn in self._cursors()
            ),
            shared_readers=len(self._shared),
            own_buckets=tuple(self.own_time.counts),
            own_total_ns=self.own_time.total,
            own_p50_us=self.own_time.percentile(50) / 1e3,
            own_p99_us=self.own_time.percentile(99) / 1e3,
            send_buckets=tuple(self.send_time.counts),
            send_total_ns=self.send_time.total,
            send_p50_us=self.send_time.percentile(50) / 1e3,
            send_p99_us=self.send_time.percentile(99) / 1e3,
        )

    def _cursors(self) -> list[Connection]:
        """Every subscriber not at the head for sure: those behind on their sockets, and the mapped log's readers."""
        return [*self._behind, *self._shared]

    def verdict_counts(self) -> dict[str, int]:
        total = self.retired_counts.copy()
        for conn in self.connections.values():
            total += conn.counts
        return dict(zip(protocol.VERDICT_NAMES, total.tolist(), strict=True))

    def summary(self) -> str:
        counts = self.verdict_counts()
        unread_messages = self._unread_totals()[0]
        received = sum(counts.values())
        rejected = {k: counts[k] for k in protocol.REJECT_NAMES if counts[k]}
        return (
            f"received {received} messages, forwarded {counts['forward']} "
            f"({self.bytes_forwarded} bytes in {self.batches} batches), rejected {rejected or 0}, "
            f"control messages {counts['control']}, "
            f"faults {dict(self.faults) or 0}, slow subscribers dropped {self.slow_disconnects}, "
            f"publishers that never read {self.never_reading} (not sent {unread_messages} messages), "
            f"connections {self.accepted}, refused {dict(self.refused) or 0}, journal errors {self.journal_errors}"
        )

    def timing(self) -> str:
        h, own, send = self.forward_time, self.own_time, self.send_time
        per_message = h.total / self.messages_timed if self.messages_timed else 0.0
        return (
            f"forwarding time per batch: p50 {h.percentile(50) / 1e3:.1f} us, p99 {h.percentile(99) / 1e3:.1f} us, "
            f"p99.9 {h.percentile(99.9) / 1e3:.1f} us, max {h.max / 1e3:.1f} us over {h.count} batches; "
            f"{per_message:.1f} ns per message; the relay's own part p50 {own.percentile(50) / 1e3:.1f} us, "
            f"p99 {own.percentile(99) / 1e3:.1f} us, inside send calls p50 {send.percentile(50) / 1e3:.1f} us"
        )

    def log_figures(self, state: str) -> None:
        log.info("jitrelay %s relay %s: %s", self.logic.name, state, self.summary())
        log.info("jitrelay %s relay %s", self.logic.name, self.timing())

    async def drain_and_close(self, timeout: float) -> None:
        """Stop reading, give subscribers that are behind ``timeout`` seconds to catch up, then close everything."""
        self.stopping = True
        self._set_reading(False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._behind:
            await asyncio.sleep(0.01)
        for conn in list(self.connections.values()):
            behind = conn.behind
            self.stop_sending(conn)
            conn.transport.abort() if behind else conn.transport.close()
        self.memory.close()  # readers of the mapped log read on to the head, then end
        await asyncio.sleep(0)


def _after(ranges: np.ndarray, taken: int) -> np.ndarray:
    """What is left of ``(k, 2)`` stream ranges once ``taken`` bytes of them were sent."""
    lengths = ranges[:, 1] - ranges[:, 0]
    done = np.cumsum(lengths)
    first = int(np.searchsorted(done, taken, side="right"))
    rest = ranges[first:].copy()
    if len(rest):
        rest[0, 0] += taken - (int(done[first - 1]) if first else 0)
    return rest
