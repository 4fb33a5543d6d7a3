"""The relay's I/O shell: sockets, receive buffers, the log, cursors, back-pressure, shutdown.

Data path, per read: in the ordinary case the relay reads a publisher
itself, from its own epoll set, and one compiled call per wake-up reads,
judges, logs and sends, waking the readers of the mapped log
(``polled_reads``; ``_forward_compiled`` is the same path for a read the
event loop made). Otherwise, step by step: uvloop reads
straight into the log's ring or the connection's numpy buffer
(``BufferedProtocol``); one ``kernels.scan_into`` call frames and judges every
complete message in it; the accepted runs are appended once to the relay's
log (``log.RelayLog``); one compiled call (``kernels.FanOut``) hands the new
bytes, straight from the log, to every subscriber that is keeping up; the
partial message at the end, if any, moves to the front of the receive buffer
for the next read.

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

This module is the Relay's core: its state, membership, and the path of a
read (scan, journal append, log append, fan-out). Its other jobs are classes
of their own that the Relay inherits, their state the Relay's: cursors that
are behind catching up (``catch_up``), the slow-reader policies
(``slow_readers``), positions and resuming (``resume``), readers of the
mapped log (``shared_readers``), the journal off the data path
(``journaling``), control messages (``controls``) and the figures
(``relay_figures``). Every cursor's mode and flags are one table
(``cursors``); a peer's protocol is ``connection``. Whatever runs for every
batch stays here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.domains import BLOCK, FSYNC_BATCH, JOURNAL_PAUSE, READ_PYTHON, RelayLogic
from jitrelay.core.histogram import Histogram
from jitrelay.kernels.constants import KEEP_EVERYTHING_EVICTABLE
from jitrelay.kernels.read_path import ReadPath
from jitrelay.server.catch_up import CatchUp, ranges_after
from jitrelay.server.connection import Connection as Connection  # re-exported: the engine's connections
from jitrelay.server.controls import Controls
from jitrelay.server.cursors import CATCHING_UP, NOT_SENT_TO, CursorFlag, CursorMode, CursorTable
from jitrelay.server.journal import Journal
from jitrelay.server.journaling import JOURNAL_RETRY_SECONDS, Journaling
from jitrelay.server.log import RelayLog
from jitrelay.server.polled_reads import DIRECT_CARRY_LIMIT, PolledReads
from jitrelay.server.relay_figures import RelayFigures
from jitrelay.server.resume import Resume
from jitrelay.server.shared_memory import SharedLogMemory
from jitrelay.server.shared_readers import SharedReaders
from jitrelay.server.slow_readers import SlowReaders
from jitrelay.server.tls import TlsPeer

log = logging.getLogger("jitrelay.relay")

SHUTDOWN_FLUSH_SECONDS = 1.0
SLOW_PIDS_KEPT = 1000  # pids of the latest subscribers dropped as slow, for the figures


class Relay(CatchUp, SlowReaders, Resume, SharedReaders, Journaling, Controls, PolledReads, RelayFigures):
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
        self._shared_timer: asyncio.TimerHandle | None = None
        self.connections: dict[int, Connection] = {}
        # Every connection's cursor: who keeps up, who is behind, held, positioned, reads the mapped log.
        self.cursors: CursorTable[Connection] = CursorTable(logic.max_connections)
        # Who receives what: connections without a filter get every forwarded
        # byte; each distinct filter is a group whose runs ``kernels.scan_and_route`` cuts.
        self._groups: tuple[tuple[Connection, ...], ...] = ()
        self._group_filters: list[protocol.Filter] = []
        self._group_tables: kernels.GroupTables | None = None
        self._routed = kernels.RouteBuffers(logic.buffer_size, 1)
        # The send loop's targets: every subscriber keeping up, in ``_targets`` order; rebuilt when that changes.
        self._fan = kernels.FanOut()
        self._compiled_reads = logic.read_path != READ_PYTHON
        self._read_path = ReadPath(
            self.log.ring, self.tables, self.scan_out, self.log.state, self.log.index
        )  # the ordinary read's whole path, compiled: ``_forward_compiled``
        table = self.cursors
        self._read_path.watch_cursors(table.mode, table.position, table.group, table.mode_counts)
        self._start_polling()  # the relay's own epoll set: ``polled_reads``
        self._targets: list[Connection] = []
        self._target_group = np.zeros(0, dtype=np.int64)  # -1 for the unfiltered, else the group index
        self._route: kernels.GroupRoute | None = None  # the groups and targets as the read loop takes them
        self._targets_dirty = True
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
        if len(self.connections) >= self.logic.max_connections or self.cursors.full:
            self.refused["connection_limit"] += 1
            return f"connection limit {self.logic.max_connections} reached"
        return None

    def new_connection(self, tls_peer: TlsPeer | None = None) -> Connection:
        self._next_id += 1
        return Connection(self, self._next_id, tls_peer)

    # membership

    def add(self, conn: Connection) -> None:
        self.connections[conn.conn_id] = conn
        self.cursors.add(conn)
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
        never_reads = conn.never_reads
        self._retire(conn)  # before any held publisher is judged again: a closed reader holds no one
        if conn.shared_slot >= 0:
            self.memory.release(conn.shared_slot)
            conn.shared_slot = -1
            if not self.memory.claimed:
                self.log.publisher = None  # no reader maps the log: appends stop publishing its extent
            self._release_held()
        self._retarget()
        if never_reads:
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

    def _retire(self, conn: Connection) -> None:
        """Free a gone connection's cursor slot, or close it while a batch of its waits (held, or for the journal)."""
        if conn.cursor_slot < 0 or conn.conn_id in self.connections:
            return
        if conn.held or conn in self._journal_held:
            self.cursors.set_mode(conn, CursorMode.CLOSED)
        else:
            self.cursors.remove(conn)

    def stop_sending(self, conn: Connection) -> None:
        """Forget ``conn``'s cursor before its descriptors close: no writability wait, no place among the targets."""
        self._unpoll(conn)  # nor in the relay's epoll set: its transport reads again, unless it is closing
        self._drop_cursor(conn)
        self._release_held()

    def _retarget(self) -> None:
        sent_nothing = ((self.cursors.flags & NOT_SENT_TO) != 0).tolist()  # by slot: one look-up per connection
        live = [c for c in self.connections.values() if not (sent_nothing[c.cursor_slot] or c.transport.is_closing())]
        groups: dict[protocol.Filter, list[Connection]] = {}
        for conn in live:
            if conn.filter != protocol.EVERYTHING:
                groups.setdefault(conn.filter, []).append(conn)
        filters = list(groups)
        if filters != self._group_filters:
            self._group_filters = filters
            self._group_tables = kernels.group_tables(filters) if filters else None
        self._groups = tuple(tuple(members) for members in groups.values())
        self.cursors.group[:] = -1
        for g, members in enumerate(self._groups):
            for conn in members:
                self.cursors.group[conn.cursor_slot] = g
        self._targets_dirty = True

    def _rebuild_targets(self) -> None:
        """The send loop's target arrays: every live subscriber that keeps up, with its group's iovec slice."""
        for i, conn in enumerate(self._targets):  # what the loop sent them since the last rebuild
            conn.bytes_out += int(self._fan.totals[i])
        keeping_up = (self.cursors.mode == CursorMode.KEEPING_UP).tolist()  # by slot: one look-up per connection
        targets = [
            c
            for c in self.connections.values()
            if keeping_up[c.cursor_slot] and not c.transport.is_closing() and c.fd >= 0
        ]
        self._fan.reserve(len(targets), 0)
        for i, conn in enumerate(targets):
            self._fan.fds[i] = conn.fd
        self._targets = targets
        self._target_group = self.cursors.group[[c.cursor_slot for c in targets]]
        self._fan.totals[: len(targets)] = 0
        self._route = None
        self._targets_dirty = False

    def _read_route(self) -> kernels.GroupRoute | None:
        """The filtered groups and the targets' groups for the read loop (None without a filter), kept while current."""
        if not self._groups:
            return None
        route = self._route
        if route is None or not route.current(self._routed):
            route = self._route = kernels.GroupRoute(
                self._group_tables, self._routed, self.scan_out, self._target_group
            )
            self._routed = route.routed
        return route

    # the data path

    def on_data(self, conn: Connection, arrived: int) -> None:
        if conn.positioned and not (conn.behind or conn.granted):
            self._publishing(conn)
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
        at, room = self.log.space()  # near the ring's end, less than a whole read: the read is cut to it
        if room <= conn.filled:
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
        if conn.positioned and not (conn.behind or conn.granted):
            self._publishing(conn)
        if self._compiled_reads:
            if self._forward_compiled(conn, at, n, arrived):
                return
        elif not self._must_hold(n, conn):
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

    def _prepare_compiled(self) -> None:
        """What the compiled loops read of the control plane besides the cursor table, up to date before a call.

        The send loop's targets; the oldest stream offset that a filtered cursor
        behind (its owed ranges) or, under ``block``, a reader of the mapped log
        (its slot's position, which only moves on, so a stale one errs on the
        safe side) still needs (``LOG_KEEP``), past which no read is taken (the
        loop reads the positions of unfiltered cursors behind from the table
        itself); and the mapped log's header, while it is published, for each
        commit to publish to.
        """
        if self._targets_dirty:
            self._rebuild_targets()
        keep = min((conn.needed() for conn in self._filtered_behind()), default=KEEP_EVERYTHING_EVICTABLE)
        if self.logic.slow_policy == BLOCK:
            keep = min(keep, self._slowest_mapped())
        self.log.keep = keep
        self._read_path.publish_to(self.memory.header if self.log.publisher is not None else None)

    def _filtered_behind(self) -> list[Connection]:
        """Filtered cursors behind: every batch owes them their group's ranges, made from the batch's scan."""
        if not (self._groups and self.cursors.count(*CATCHING_UP)):
            return []
        return [conn for conn in self.cursors.members(*CATCHING_UP) if conn.filter != protocol.EVERYTHING]

    def _owing(self) -> bool:
        """Whether a batch is owed to a filtered cursor behind: then the poll loop reads one batch per call."""
        return bool(self._filtered_behind())

    def _forward_compiled(self, sender: Connection, at: int, n: int, arrived: int) -> bool:
        """The ordinary read in one compiled call (``ReadPath``): scan, commit, fan out; False if not taken.

        A filtered target gets its group's runs (``_read_route``); a read that would evict what a cursor behind
        or, under ``block``, a reader of the mapped log still needs is not taken (``_prepare_compiled``). With a
        journal the call is cut in two around its append: judged, journaled, then committed and sent. Else, or
        for anything but whole forwarded messages, the usual way takes the read, judging it again (and holding
        it, if the journal refused it).
        """
        self._prepare_compiled()
        path, fan, targets, route = self._read_path, self._fan, len(self._targets), self._read_route()
        if self.journal is None:
            status, messages, size, start, short, sending, sent_at = path.forward(
                at, at + n, sender.counts, sender.conn_id, fan, targets, sender.fd, route=route
            )
        else:
            status, messages, size, *_ = path.forward(
                at, at + n, sender.counts, sender.conn_id, fan, targets, sender.fd, kernels.STAGE_JUDGE, route=route
            )
            log_ = self.log
            if status != kernels.READ_JUDGED or not self._journal(
                [self.ring_bytes[at : at + size]], (log_.epoch, log_.head, log_.messages)
            ):
                return False
            status, messages, size, start, short, sending, sent_at = path.forward(
                at, at + n, sender.counts, sender.conn_id, fan, targets, sender.fd, kernels.STAGE_SEND,
                (messages, size), route,
            )  # fmt: skip
            assert status == kernels.READ_FORWARDED  # judged so a moment ago, on the same log: journaled once
        if status != kernels.READ_FORWARDED:
            return False
        sender.filled = n - size
        if sender.filled:
            sender.buf[: sender.filled] = self.log.ring[at + size : at + n]
        self._forwarded(sender, messages, size, start, short, (arrived, sending, sent_at, 0))
        return True

    def _forwarded(self, sender: Connection, messages: int, size: int, start: int, short: int, times: tuple) -> None:
        """The figures and bookkeeping of a batch the read loop forwarded.

        ``times``: the read arrived, the send loop began, it ended, and when the relay was done with the batch (0:
        now, after this bookkeeping; the poll loop reports its send loop's end, before its next read).
        """
        arrived, sending, sent_at, done = times
        sender.published = True
        sender.messages_published += messages
        sender.bytes_published += size
        self.bytes_forwarded += size
        self.batches += 1
        self.send_time.record(sent_at - sending)
        self.own_time.record(sending - arrived)
        first = self.log.messages - messages  # the read loop's batch is one run of ``messages`` messages
        ranges = None
        if self._owing():  # the last batch of the call (``PolledReads``): its scan and routes are still there
            ranges = self._group_ranges(start, first, 1, messages)
            self._owe(sender, ranges)
        if short:
            route = self._route
            due = None if route is None else route.due(len(self._targets), size)
            self._left_short(start, size, due, lambda: ranges or self._group_ranges(start, first, 1, messages))
        self._wake_positioned(sender)
        self.forward_time.record((done or time.perf_counter_ns()) - arrived)
        self.messages_timed += messages
        if self.cursors.count(*CATCHING_UP):
            self._check_lag()

    def _publishing(self, conn: Connection) -> None:
        """A positioned subscriber the send loop serves sends something: its own batches will be missing from its
        stream, so its cursor serves it from here on (from the next batch of another), with a notice wherever its
        stream skips one."""
        self._to_cursor(conn, self.log.head)

    def _must_hold(self, nbytes: int, sender: Connection) -> bool:
        """Under ``block``: whether ``nbytes`` more from ``sender`` would pass the slowest cursor, so it waits."""
        return (
            self.logic.slow_policy == BLOCK
            and bool(self.cursors.count(*CATCHING_UP, CursorMode.MAPPED))
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
        if self.cursors.count(*CATCHING_UP):
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
        # Each group's share as stream ranges, for cursors that owe it: only while someone is behind.
        group_ranges = None
        if self._groups and self.cursors.count(*CATCHING_UP):
            group_ranges = self._group_ranges(start, first_message, result.runs, result.count)
        if self.cursors.count(*CATCHING_UP):
            self._owe(sender, group_ranges)
        self._wake_positioned(sender)
        if self.cursors.count(CursorMode.MAPPED):
            self.memory.wake()  # every sleeping reader of the mapped log, in one call
        if self._targets:
            self._send_batch(sender, start, size, arrived, result, first_message, group_ranges)
        done = time.perf_counter_ns()
        self.forward_time.record(done - arrived)
        self.messages_timed += result.count
        if self.cursors.count(*CATCHING_UP):
            self._check_lag()
        return True

    def _wake_positioned(self, sender: Connection) -> None:
        """Positioned cursors the send loop does not serve, idle at the head: a new batch of another's is theirs."""
        for conn in self.cursors.flagged(CursorFlag.POSITION_NOTICES):
            if (
                conn.behind
                and not conn.writing
                and (conn.owed if conn.filter != protocol.EVERYTHING else conn is not sender)
            ):
                self._write_when_ready(conn)

    def _group_ranges(self, start: int, first_message: int, n_runs: int, count: int) -> list[np.ndarray]:
        """Each group's runs of the last scanned batch (``n_runs`` runs of ``count`` messages) as ``(k, 3)`` rows:
        stream start, end, and the first message's number."""
        runs = self.scan_out.runs[: 2 * n_runs]
        starts, ends = runs[0::2], runs[1::2]
        at = start + np.concatenate(([0], np.cumsum(ends - starts)[:-1]))  # where each forwarded run landed
        forwarded = self.scan_out.offsets[:count][self.scan_out.verdicts[:count] == protocol.FORWARD]
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
        self,
        sender: Connection,
        start: int,
        size: int,
        arrived: int,
        result: kernels.ScanResult,
        first_message: int,
        group_ranges: list[np.ndarray] | None,
    ) -> None:
        """One call into the send loop for every subscriber that keeps up; the ones left short fall behind."""
        fan = self._fan
        n = len(self._targets)
        address = self.log.address
        pieces = self.log.pieces(start, start + size)  # the whole batch: its one or two pieces of the ring
        fan.reserve(n, len(pieces))
        for k, (at, length) in enumerate(pieces):
            fan.iovecs[2 * k] = address + at
            fan.iovecs[2 * k + 1] = length
        if not self._groups:  # everyone gets the whole batch
            sending = time.perf_counter_ns()
            short = fan.send_uniform(n, len(pieces), sender.fd)
            due = None
        else:  # each group its runs, placed in the ring in one compiled call; the unfiltered the whole batch
            placed = fan.place_groups(
                self.scan_out.runs, result.runs, start, self._routed, len(self._groups), address, self.log.size,
                len(pieces),
            )  # fmt: skip
            slot = self._target_group + 1
            fan.iov_first[:n] = np.concatenate(([0], placed[0]))[slot]
            fan.iov_count[:n] = np.concatenate(([len(pieces)], placed[1]))[slot]
            due = np.concatenate(([size], placed[2]))[slot]
            sending = time.perf_counter_ns()
            short = fan.send(n, sender.fd)
        sent_at = time.perf_counter_ns()
        self.send_time.record(sent_at - sending)
        self.own_time.record(sending - arrived)
        if short:
            runs, count = result.runs, result.count
            self._left_short(
                start, size, due, lambda: group_ranges or self._group_ranges(start, first_message, runs, count)
            )

    def _left_short(
        self, start: int, size: int, due: np.ndarray | None, group_ranges: Callable[[], list[np.ndarray]]
    ) -> None:
        """Targets whose socket took less than the batch (``due`` each, else all of it) fall behind from there.

        A filtered one owes the rest of its group's ranges (``group_ranges()``, made only if one is short).
        """
        sent = self._fan.sent[: len(self._targets)]
        ranges = None
        for t in np.flatnonzero((sent != kernels.SEND_SKIPPED) & (sent < (size if due is None else due))):
            conn = self._targets[t]
            taken = max(0, int(sent[t]))
            g = int(self._target_group[t])
            if g < 0:
                self._fall_behind(conn, position=start + taken)
            else:
                ranges = ranges or group_ranges()
                self._fall_behind(conn, owed=ranges_after(ranges[g], taken))

    def _owe(self, sender: Connection, group_ranges: list[np.ndarray] | None) -> None:
        """Filtered subscribers that are behind owe their group's share of this batch (never their own batch)."""
        if not group_ranges:
            return
        for g, members in enumerate(self._groups):
            if len(group_ranges[g]):
                for conn in members:
                    if conn.behind and conn is not sender:
                        conn.owed.append(group_ranges[g])

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

    def _set_reading(self, reading: bool) -> None:
        if reading == self._reading:
            return
        self._reading = reading
        if not reading:
            self._unpoll_all(resume=False)
        for conn in self.connections.values():
            if conn.transport.is_closing() or conn.held:
                continue
            if reading:
                conn.transport.resume_reading()
            else:
                conn.transport.pause_reading()

    async def drain_and_close(self, timeout: float) -> None:
        """Stop reading, give subscribers that are behind ``timeout`` seconds to catch up, then close everything."""
        self.stopping = True
        self._set_reading(False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.cursors.count(*CATCHING_UP):
            await asyncio.sleep(0.01)
        for conn in list(self.connections.values()):
            behind = conn.behind
            self.stop_sending(conn)
            conn.transport.abort() if behind else conn.transport.close()
        self._stop_polling()
        self.memory.close()  # readers of the mapped log read on to the head, then end
        await asyncio.sleep(0)
