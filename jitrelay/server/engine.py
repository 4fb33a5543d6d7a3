"""The relay's I/O shell: sockets, receive buffers, fan-out, back-pressure, shutdown.

Data path, per read: uvloop reads straight into the connection's numpy
buffer (``BufferedProtocol``); one ``kernels.scan_into`` call frames and
judges every complete message in it; the accepted runs go to every other
connection; the partial message at the end, if any, moves to the front of
the buffer for the next read.

uvloop keeps a reference to the memory of a write it cannot finish at once
and sends whatever that memory holds later, and the receive buffer is reused
on the next read. So runs are sent zero-copy only with a synchronous
``send``/``sendmsg`` on a spare descriptor, when the subscriber has nothing
queued; anything left over is queued in uvloop as an immutable copy, made
at most once per batch and shared by every subscriber that needs it.

Memory is bounded: a receive buffer per connection (pages touched only by
publishers), and per subscriber at most ``pending_high`` bytes plus one batch
of pending writes before the slow-subscriber policy acts.
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

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.domains import DISCONNECT, FSYNC_BATCH, RelayLogic
from jitrelay.core.histogram import Histogram
from jitrelay.core.units import MiB
from jitrelay.server.figures import Figures
from jitrelay.server.journal import Journal

log = logging.getLogger("jitrelay.relay")

SHUTDOWN_FLUSH_SECONDS = 1.0
SOCKET_BUFFER = 4 * MiB  # kernel buffers per connection: fewer, larger reads and sends
MAX_IOV = 64  # runs sent with one sendmsg; more are compacted first
SALVAGE_LIMIT = 4  # receive buffers' worth read from a connection that closed under the relay
SLOW_PIDS_KEPT = 1000  # pids of the latest subscribers dropped as slow, for the figures
_PEERCRED = struct.Struct("3i")


class Connection(asyncio.BufferedProtocol):
    """One client connection: a publisher, a subscriber, or both."""

    def __init__(self, relay: Relay, conn_id: int):
        self.relay = relay
        self.conn_id = conn_id
        self.transport: asyncio.Transport | None = None
        self.peer = f"conn={conn_id}"
        self.pid = self.uid = self.gid = -1
        self.buf = np.empty(relay.logic.buffer_size, dtype=np.uint8)
        self.view = memoryview(self.buf)
        self.filled = 0
        self.counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
        self.bytes_in = 0
        self.bytes_out = 0
        self.fault = protocol.NO_FAULT
        self.slow_timer: asyncio.TimerHandle | None = None
        self.spare: socket.socket | None = None  # a second descriptor: zero-copy sends and salvage
        self.filter: protocol.Filter = protocol.EVERYTHING  # what it asked to receive (control messages)
        self.publish_only = False  # it declared it never reads: no target list holds it, so it is never slow

    # asyncio protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        # TCP peers have no credentials: their address, checked against the allowed networks, stands in for them.
        self.address: str | None = None
        refusal = None
        if tcp:
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
        with contextlib.suppress(OSError):
            self.spare.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            self.spare.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            if tcp:
                self.spare.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=self.relay.logic.pending_high, low=self.relay.logic.pending_low)
        self.relay.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        arrived = time.perf_counter_ns()
        self.filled += nbytes
        self.bytes_in += nbytes
        self.relay.on_data(self, arrived)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.spare is not None:
            if self.fault == protocol.NO_FAULT and not self.relay.stopping:
                self._salvage()
            self.spare.close()
        if self.filled and self.fault == protocol.NO_FAULT:
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
        while budget > 0 and self.fault == protocol.NO_FAULT:
            try:
                nbytes = self.spare.recv_into(self.view[self.filled :])
            except OSError:
                return
            if not nbytes:
                return
            budget -= nbytes
            self.buffer_updated(nbytes)

    def pause_writing(self) -> None:
        self.relay.on_over_limit(self)

    def resume_writing(self) -> None:
        self.relay.on_under_limit(self)


class Relay:
    """Fans out every valid message a connection sends to all other connections."""

    def __init__(self, logic: RelayLogic, journal: Journal | None = None, kernel_load_seconds: float = 0.0):
        self.logic = logic
        self.kernel_load_seconds = kernel_load_seconds  # what ``serve.warm_up`` took, for the figures
        self.journal = journal
        self.journal_errors = 0
        self._journal_timer: asyncio.TimerHandle | None = None
        self.tables = kernels.tables_for(logic)
        self.scan_out = kernels.ScanBuffers(logic.buffer_size)
        self.connections: dict[int, Connection] = {}
        # Who receives what: connections without a filter get every forwarded
        # run; each distinct filter is a group whose runs ``kernels.scan_and_route`` cuts.
        self._everyone: tuple[tuple[Connection, asyncio.Transport], ...] = ()
        self._groups: tuple[tuple[tuple[Connection, asyncio.Transport], ...], ...] = ()
        self._group_filters: list[protocol.Filter] = []
        self._group_tables: kernels.GroupTables | None = None
        self._routed = kernels.RouteBuffers(logic.buffer_size, 1)
        # Where runs too many for one sendmsg are packed; reused, as every send copies or finishes before the next.
        self._packed = np.empty(logic.buffer_size, dtype=np.uint8)
        self._next_id = 0
        self._blocked: set[Connection] = set()
        self._reading = True
        self.retired_counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
        self.faults: Counter[str] = Counter()
        self.slow_disconnects = 0
        self.slow_pids: deque[int] = deque(maxlen=SLOW_PIDS_KEPT)  # of those dropped, for tools that match them
        self.torn_messages = 0  # connections closed with part of a message in their buffer
        self.slow_pauses = 0  # times a subscriber passed pending_high and paused the publishers
        self.retired_bytes_in = 0  # bytes read from connections that have closed
        self.bytes_forwarded = 0
        self.batches = 0
        self.accepted = 0
        self.refused: Counter[str] = Counter()
        self.stopping = False
        # Nanoseconds from a read reaching the engine to the last subscriber write issued.
        self.forward_time = Histogram()
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

    def new_connection(self) -> Connection:
        self._next_id += 1
        return Connection(self, self._next_id)

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
        self._retarget()
        log.info("%s disconnected (received %d bytes, sent %d bytes)", conn.peer, conn.bytes_in, conn.bytes_out)
        self.on_under_limit(conn)

    def _retarget(self) -> None:
        live = [(c, c.transport) for c in self.connections.values() if not (c.publish_only or c.transport.is_closing())]
        self._everyone = tuple(target for target in live if target[0].filter == protocol.EVERYTHING)
        groups: dict[protocol.Filter, list[tuple[Connection, asyncio.Transport]]] = {}
        for target in live:
            if target[0].filter != protocol.EVERYTHING:
                groups.setdefault(target[0].filter, []).append(target)
        filters = list(groups)
        if filters != self._group_filters:
            self._group_filters = filters
            self._group_tables = kernels.group_tables(filters) if filters else None
        self._groups = tuple(tuple(members) for members in groups.values())

    # the data path

    def on_data(self, conn: Connection, arrived: int) -> None:
        if self._groups:  # some subscriber has a filter: the same compiled call cuts each group's runs
            result, self._routed = kernels.scan_and_route(
                conn.buf, 0, conn.filled, self.tables, self.scan_out, self._group_tables, self._routed, conn.counts
            )
        else:
            result = kernels.scan_into(conn.buf, 0, conn.filled, self.tables, self.scan_out, conn.counts)
        if result.forwarded_bytes:
            self._forward(conn, result)
            self.forward_time.record(time.perf_counter_ns() - arrived)
            self.messages_timed += result.count
        if result.controls:
            self._apply_controls(conn, result.count)
        if result.fault != protocol.NO_FAULT:
            self._close_faulty(conn, result.fault, result.consumed)
            return
        leftover = conn.filled - result.consumed
        if leftover and result.consumed:
            conn.buf[:leftover] = conn.buf[result.consumed : conn.filled]
        conn.filled = leftover

    def _forward(self, sender: Connection, result: kernels.ScanResult) -> None:
        """Send the accepted runs to every other connection, and each filtered group its share of them."""
        if self._everyone or self.journal is not None:
            pieces = self._pieces(sender, self.scan_out.runs, result.runs)
            if self.journal is not None:
                self._journal(pieces)
            if self._everyone:
                self._send(sender, self._everyone, pieces, result.forwarded_bytes)
        if self._groups:
            routed = self._routed  # cut by ``scan_and_route`` in on_data
            for g, members in enumerate(self._groups):
                size = int(routed.sizes[g])
                if size:
                    self._send(sender, members, self._pieces(sender, routed.group_runs(g), routed.counts[g]), size)
        self.bytes_forwarded += result.forwarded_bytes
        self.batches += 1

    def _pieces(self, sender: Connection, runs: np.ndarray, n_runs: int) -> list:
        """Views of the runs in the sender's buffer; packed back to back when there are too many for one sendmsg."""
        if n_runs == 1:
            return [sender.view[runs[0] : runs[1]]]
        if n_runs <= MAX_IOV:
            view = sender.view
            return [view[runs[2 * k] : runs[2 * k + 1]] for k in range(n_runs)]
        return [kernels.compact(sender.buf, runs, n_runs, self._packed).data]

    @staticmethod
    def _send(sender: Connection, targets: tuple, pieces: list, size: int) -> None:
        """Write ``pieces`` to every target but the sender, zero-copy where the kernel takes them at once.

        A subscriber with nothing pending gets the runs straight from the
        receive buffer (``send``/``sendmsg`` on its spare descriptor: the
        kernel copies them before the call returns). Whatever it cannot take
        now, and everything for a subscriber that already has bytes pending,
        goes to uvloop as an immutable copy made once per call, since uvloop
        keeps references to what it has not sent yet.
        """
        copy: memoryview | None = None
        sender_transport = sender.transport
        for conn, transport in targets:
            if transport is sender_transport or transport.is_closing():
                continue
            sent = 0
            if not transport.get_write_buffer_size():
                try:
                    sent = conn.spare.send(pieces[0]) if len(pieces) == 1 else conn.spare.sendmsg(pieces)
                except OSError:
                    sent = 0  # would block, or an error the transport reports when it writes the rest
            if sent < size:
                if copy is None:
                    copy = memoryview(b"".join(pieces))
                transport.write(copy[sent:])
            conn.bytes_out += size

    def _apply_controls(self, conn: Connection, count: int) -> None:
        """Apply the connection's control messages, in order, to what it receives from now on."""
        offsets = self.scan_out.offsets
        for k in np.flatnonzero(self.scan_out.verdicts[:count] == protocol.CONTROL):
            message = conn.view[offsets[k] : offsets[k + 1]]
            conn.filter = protocol.apply_control(conn.filter, message)
            conn.publish_only = conn.publish_only or protocol.declares_publish_only(message)
        if conn.publish_only:
            log.info("%s publishes only; it receives nothing", conn.peer)
        else:
            log.info("%s subscribes to %s", conn.peer, protocol.describe_filter(conn.filter))
        self._retarget()

    def _journal(self, pieces: list) -> None:
        """Append a batch to the journal before anyone sees it; under ``batch`` fsync soon after."""
        assert self.journal is not None
        try:
            self.journal.append(pieces)
        except OSError as exc:
            self.journal_errors += 1
            log.error("journal %s: append failed, batch forwarded unjournaled: %s", self.journal.path, exc)
            return
        if self._journal_timer is None and self.logic.journal_fsync == FSYNC_BATCH:
            self._journal_timer = asyncio.get_running_loop().call_later(self.journal.sync_interval, self._sync_journal)

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
        conn.transport.close()
        self._retarget()

    # slow subscribers

    def on_over_limit(self, conn: Connection) -> None:
        """A subscriber passed ``pending_high``: pause publishers until it drains.

        Under ``disconnect`` it gets ``slow_timeout`` seconds to drain below
        ``pending_low``; a subscriber that is stuck, not merely momentarily
        behind, is then dropped and the publishers resume.
        """
        if not self._blocked:
            log.info("%s has %d bytes pending; pausing publishers", conn.peer, self._pending(conn))
        self.slow_pauses += 1
        self._blocked.add(conn)
        self._set_reading(False)
        if self.logic.slow_policy == DISCONNECT and conn.slow_timer is None:
            conn.slow_timer = asyncio.get_running_loop().call_later(self.logic.slow_timeout, self._drop_slow, conn)

    def on_under_limit(self, conn: Connection) -> None:
        if conn.slow_timer is not None:
            conn.slow_timer.cancel()
            conn.slow_timer = None
        if conn in self._blocked:
            self._blocked.discard(conn)
            if not self._blocked:
                log.info("subscribers caught up; resuming publishers")
                self._set_reading(True)

    def _drop_slow(self, conn: Connection) -> None:
        conn.slow_timer = None
        if conn.conn_id not in self.connections or conn.transport.is_closing():
            return
        self.slow_disconnects += 1
        if conn.pid > 0:
            self.slow_pids.append(conn.pid)
        log.warning(
            "disconnecting slow subscriber %s: %d bytes pending after %.1f s (limit %d)",
            conn.peer,
            self._pending(conn),
            self.logic.slow_timeout,
            self.logic.pending_high,
        )
        conn.transport.abort()
        self._retarget()

    @staticmethod
    def _pending(conn: Connection) -> int:
        return conn.transport.get_write_buffer_size() if conn.transport else 0

    def _set_reading(self, reading: bool) -> None:
        if reading == self._reading:
            return
        self._reading = reading
        for conn in self.connections.values():
            if conn.transport.is_closing():
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
        pending = [conn.transport.get_write_buffer_size() for conn in live if conn.transport is not None]
        timing = self.forward_time
        verdicts = self.verdict_counts()
        return Figures(
            domain=self.logic.name,
            verdicts=verdicts,
            bytes_received=self.retired_bytes_in + sum(conn.bytes_in for conn in live),
            bytes_forwarded=self.bytes_forwarded,
            faults=dict(self.faults),
            connections_open=len(live),
            connections_accepted=self.accepted,
            refused=dict(self.refused),
            pending_max=max(pending, default=0),
            slow_actions={"pause": self.slow_pauses, "disconnect": self.slow_disconnects},
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
        )

    def verdict_counts(self) -> dict[str, int]:
        total = self.retired_counts.copy()
        for conn in self.connections.values():
            total += conn.counts
        return dict(zip(protocol.VERDICT_NAMES, total.tolist(), strict=True))

    def summary(self) -> str:
        counts = self.verdict_counts()
        received = sum(counts.values())
        rejected = {k: counts[k] for k in protocol.REJECT_NAMES if counts[k]}
        return (
            f"received {received} messages, forwarded {counts['forward']} "
            f"({self.bytes_forwarded} bytes in {self.batches} batches), rejected {rejected or 0}, "
            f"control messages {counts['control']}, "
            f"faults {dict(self.faults) or 0}, slow subscribers dropped {self.slow_disconnects}, "
            f"connections {self.accepted}, refused {dict(self.refused) or 0}, journal errors {self.journal_errors}"
        )

    def timing(self) -> str:
        h = self.forward_time
        per_message = h.total / self.messages_timed if self.messages_timed else 0.0
        return (
            f"forwarding time per batch: p50 {h.percentile(50) / 1e3:.1f} us, p99 {h.percentile(99) / 1e3:.1f} us, "
            f"p99.9 {h.percentile(99.9) / 1e3:.1f} us, max {h.max / 1e3:.1f} us over {h.count} batches; "
            f"{per_message:.1f} ns per message"
        )

    def log_figures(self, state: str) -> None:
        log.info("jitrelay %s relay %s: %s", self.logic.name, state, self.summary())
        log.info("jitrelay %s relay %s", self.logic.name, self.timing())

    async def drain_and_close(self, timeout: float) -> None:
        """Stop reading, give pending writes ``timeout`` seconds, then close everything."""
        self.stopping = True
        self._set_reading(False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(self._pending(c) for c in self.connections.values()):
            await asyncio.sleep(0.01)
        for conn in list(self.connections.values()):
            conn.transport.abort() if self._pending(conn) else conn.transport.close()
        await asyncio.sleep(0)
