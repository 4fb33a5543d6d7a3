"""A reader of the relay's log mapped into this process: whole messages straight from shared memory.

The relay hands the log's memory file over the Unix socket once it has checked
the peer (docs/protocol.md, "Shared memory"). From then on this reader copies
``[position, head)`` out of the ring in one or two pieces and checks that the
relay did not overwrite them meanwhile (``core.shared_log``: the tail moves
before the bytes do). A reader that was lapped says so: ``read`` returns a
``protocol.Lapped`` with the exact messages and bytes it missed, and the
reader goes on from the oldest message kept.

After each batch it writes its position in its slot, which is what holds the
publishers back under ``block`` and what the relay's lag figures show. When it
has caught up it sleeps on the log's futex word, which the relay bumps after
every append.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol, shared_log
from jitrelay.core.domains import RelayLogic
from jitrelay.core.views import message_offsets
from jitrelay.kernels import futex
from jitrelay.kernels.framer import MessageFramer


class SharedLogReader:
    """One reader's view of a relay's mapped log, from the position the grant names."""

    def __init__(self, grant: protocol.SharedLog, log_fd: int, slots_fd: int, max_message: int) -> None:
        try:
            length = os.fstat(log_fd).st_size
            self._log_map = mmap.mmap(log_fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            self._slots_map = mmap.mmap(slots_fd, os.fstat(slots_fd).st_size, flags=mmap.MAP_SHARED)
        finally:
            for fd in (log_fd, slots_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)  # the mappings keep the memory; nothing of it has a name anywhere
        header = shared_log.header_view(self._log_map)
        if int(header[shared_log.W_MAGIC]) != shared_log.MAGIC or int(header[shared_log.W_EPOCH]) != grant.epoch:
            raise protocol.ProtocolError("the memory the relay passed is not the log its grant names")
        self._header = header
        self.size = int(header[shared_log.W_SIZE])
        self.mirror = int(header[shared_log.W_MIRROR])
        self._ring = shared_log.ring_view(self._log_map, self.size, self.mirror)
        self._slot = shared_log.slots_view(self._slots_map)[grant.slot]
        self._wait = futex.Waiter(header.ctypes.data + 8 * shared_log.W_WAKE)
        self.epoch = grant.epoch
        self.offset = grant.offset  # stream offset of the next byte to read
        self.message = grant.message  # number of the message that starts there
        self.max_message = max_message

    @property
    def position(self) -> protocol.Position:
        return protocol.Position(self.epoch, self.offset, self.message)

    @property
    def closed(self) -> bool:
        """The relay has gone away: what is left to read is all there will be."""
        return bool(self._header[shared_log.W_CLOSED])

    def read(self, limit: int) -> np.ndarray | protocol.Lapped | None:
        """The next whole messages (at most ``limit`` bytes, at least one message), a lap, or None at the head."""
        start = self.offset
        if self._header[shared_log.W_HEAD] <= start:  # at the head (where the tail never passes it): one load
            return None
        extent = shared_log.snapshot(self._header)
        if start < extent.tail:
            return self._lapped(extent)
        if start >= extent.head:
            return None
        end, count = extent.head, extent.head_message - self.message
        limit = max(limit, self.max_message)
        if end - start > limit:
            data = self._copy(start, start + limit)
            count, consumed, _ = kernels.frame(data, 0, len(data))
            data, end = data[:consumed], start + consumed
        else:
            data = self._copy(start, end)
        if start < int(self._header[shared_log.W_TAIL]):  # overwritten while copied: the copy is not the stream
            return self._lapped(shared_log.snapshot(self._header))
        self.offset, self.message = end, self.message + count
        self._slot[shared_log.S_POSITION] = end
        return data

    def wait(self, timeout: float) -> bool:
        """Sleep until the relay appends (or ``timeout`` seconds pass), unless there is something to read now.

        False when the whole ``timeout`` passed without a wake: a quiet log, or a relay that is gone.
        """
        seen = int(self._header[shared_log.W_WAKE])
        if self._header[shared_log.W_HEAD] != self.offset or self.closed:
            return True
        return self._wait(seen, timeout)

    @property
    def head(self) -> int:
        """The stream offset after the last message the relay has appended."""
        return int(self._header[shared_log.W_HEAD])

    def at_head(self) -> bool:
        """Whether the reader has copied everything the relay has published: then it waits for the next append."""
        return int(self._header[shared_log.W_HEAD]) <= self.offset

    def _copy(self, start: int, end: int) -> np.ndarray:
        at = start % self.size
        n = end - start
        if at + n <= self.size + self.mirror:
            return self._ring[at : at + n].copy()
        first = self.size - at
        out = np.empty(n, dtype=np.uint8)
        out[:first] = self._ring[at : self.size]
        out[first:] = self._ring[: n - first]
        return out

    def _lapped(self, extent: shared_log.Snapshot) -> protocol.Lapped:
        """The relay overwrote what this reader had yet to read: skip to the oldest message kept, and say how far."""
        report = protocol.Lapped(self.offset, extent.tail_message - self.message, extent.tail - self.offset)
        self.offset, self.message = extent.tail, extent.tail_message
        self._slot[shared_log.S_POSITION] = extent.tail
        return report


class CutOff(EOFError):
    """The end of a shared-memory reader's stream because the relay lapped it (no positions asked for)."""


IDLE_CHECK_SECONDS = 0.05  # how long a caught-up reader sleeps before it looks whether the relay is still there
GRANT_TIMEOUT = 10.0  # how long a subscriber waits for the relay to hand over its log


@dataclass(eq=False, repr=False)
class MappedStream:
    """A subscriber's stream once the relay granted shared memory: the mapped log, filtered here if asked.

    The socket stays open: it carries the subscriber's control messages and
    lapped reports, and its end tells the reader the relay has gone.
    """

    sock: socket.socket
    reader: SharedLogReader
    logic: RelayLogic
    selection: InitVar[protocol.Filter]
    limit: int
    positioned: bool
    gaps: list[protocol.Gap]
    cut_off: CutOff | None = field(default=None, init=False)
    _selection: protocol.Filter = field(default=protocol.EVERYTHING, init=False)
    _route: tuple | None = field(default=None, init=False)
    # Subscriptions asked for while the log held messages not read yet: (stream offset, selection), oldest first.
    _switches: deque[tuple[int, protocol.Filter]] = field(default_factory=deque, init=False)
    # the last wait ended without a wake: look whether the relay is still there
    _quiet: bool = field(default=True, init=False)
    _filtered_batch: bool = field(default=False, init=False)

    def __post_init__(self, selection: protocol.Filter) -> None:
        self._apply(selection)

    @classmethod
    def take_grant(
        cls,
        sock: socket.socket,
        feed: Callable[[bytes], None],
        logic: RelayLogic,
        selection: protocol.Filter,
        limit: int,
        positioned: bool,
        gaps: list[protocol.Gap],
    ) -> MappedStream:
        """Read the socket up to the relay's grant: what came before goes to ``feed``; the grant opens the mapping."""
        framer = MessageFramer()
        received: list[int] = []
        sock.settimeout(GRANT_TIMEOUT)
        try:
            while True:
                try:
                    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
                except TimeoutError:
                    raise ConnectionError("the relay did not hand over its log in time") from None
                received += fds
                if not data:
                    raise ConnectionError("the relay closed the connection instead of handing over its log")
                framer.feed(data)
                while (batch := framer.maybe_extract_batch()) is not None:
                    starts = message_offsets(batch)
                    ends = np.append(starts[1:], len(batch))
                    for k in np.flatnonzero(batch[starts + protocol.OFF_DOMAIN] == protocol.CONTROL_DOMAIN).tolist():
                        at = int(starts[k])
                        notice = protocol.read_notice(batch[at : ends[k]].tobytes())
                        if not isinstance(notice, protocol.SharedLog):
                            continue
                        if len(received) != 2:
                            raise ConnectionError(f"the relay's grant came with {len(received)} descriptors, not 2")
                        feed(batch[:at].tobytes())
                        log_fd, slots_fd = received
                        received = []
                        reader = SharedLogReader(notice, log_fd, slots_fd, protocol.HEADER_SIZE + logic.max_payload)
                        sock.settimeout(None)
                        return cls(sock, reader, logic, selection, limit, positioned, gaps)
                    feed(batch.tobytes())
        finally:
            for fd in received:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def select(self, selection: protocol.Filter) -> None:
        """Filter as the relay would for a subscription of ``selection``, from the next message it appends.

        What the log holds already was forwarded under the subscription in force until now: it is read under
        that one (as a socket subscriber receives it), however late it is read.
        """
        at = self.reader.head
        if self._switches or at > self.reader.offset:
            self._switches.append((at, selection))
        else:
            self._apply(selection)

    def _apply(self, selection: protocol.Filter) -> None:
        self._selection = selection
        if selection == protocol.EVERYTHING:
            self._route = None
            return
        capacity = self.limit + self.reader.max_message
        self._route = (
            kernels.tables_for(self.logic)._replace(
                checksum_policy=protocol.CHECKSUM_OFF
            ),  # the relay verified what it logged
            kernels.ScanBuffers(capacity),
            kernels.group_tables([selection]),
            kernels.RouteBuffers(capacity, 1),
            np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64),
        )

    @property
    def filtered(self) -> bool:
        """Whether batches are (or the last one was) filtered here, so that their messages may skip some."""
        return self._route is not None or self._filtered_batch

    def poll(self) -> np.ndarray | None:
        """The next batch the subscriber is to get, or None if it is at the head; EOFError once cut off."""
        if self.cut_off is not None:
            raise self.cut_off
        while True:
            start = self.reader.offset
            got = self.reader.read(self.limit)
            if got is None:
                return None
            if isinstance(got, protocol.Lapped):
                self._lapped(got)
                continue
            if self._route is None and not self._switches:
                self._filtered_batch = False
                return got
            self._filtered_batch = False
            end, at, pieces = self.reader.offset, start, []
            while self._switches and self._switches[0][0] < end:  # a subscription that takes over within the batch
                switch, selection = self._switches.popleft()
                if switch > at:
                    pieces.append(self._filter(got[at - start : switch - start]))
                    at = switch
                self._apply(selection)
            pieces.append(self._filter(got[at - start :]))
            pieces = [piece for piece in pieces if len(piece)]
            if pieces:
                return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _filter(self, data: np.ndarray) -> np.ndarray:
        """The messages of ``data`` the subscription in force selects."""
        if self._route is None:
            return data
        self._filtered_batch = True
        tables, scanned, groups, routed, counts = self._route
        _, routed = kernels.scan_and_route(data, 0, len(data), tables, scanned, groups, routed, counts)
        self._route = (tables, scanned, groups, routed, counts)
        runs = routed.group_runs(0)
        return kernels.compact(data, runs, len(runs) // 2) if len(runs) else data[:0]

    def wait(self, timeout: float) -> None:
        """Sleep on the log until it moves or ``timeout`` passes; EOFError when the relay has gone and all is read."""
        reader = self.reader
        if not reader.at_head():
            return
        if self._quiet and (reader.closed or self._relay_gone()):
            if reader.at_head():
                raise EOFError("the relay closed the connection")
            return
        # The socket is looked at only after a wait that nothing ended: a busy reader never pays for it.
        self._quiet = not reader.wait(min(timeout, IDLE_CHECK_SECONDS)) or reader.closed

    def send(self, message: bytes) -> None:
        """Send a control message on the socket the grant came over (subscriptions, lap reports); ``OSError``."""
        self.sock.sendall(message)

    def _relay_gone(self) -> bool:
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return False
        try:
            return not self.sock.recv(1 << 16, socket.MSG_DONTWAIT)  # the relay sends nothing after the grant
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _lapped(self, report: protocol.Lapped) -> None:
        with contextlib.suppress(OSError):
            self.send(protocol.lapped_message(report))
        if self.positioned:
            self.gaps.append(protocol.Gap(protocol.GAP_LEFT_LOG, report.messages, report.bytes))
            return
        self.cut_off = CutOff(
            f"the relay overwrote {report.messages} messages ({report.bytes} bytes) this shared-memory reader "
            "had not read yet: it is cut off, as a slow socket subscriber would be"
        )
        raise self.cut_off
