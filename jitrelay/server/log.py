"""The relay's log: one ring of every forwarded byte, and where each batch in it starts.

Operations it must support, per relay process:

- append an accepted batch once (the scan's runs, copied by a kernel);
- say which part of the ring a stream range ``[start, end)`` occupies, as one
  or two pieces (the ring wraps), for sends straight from it;
- say what an append would evict, so the engine can act on the subscribers
  still reading there before it happens;
- count the messages from a position to the head, and find a subscriber's
  next range when it must skip batches it published itself.

Positions are offsets in the relay's stream, counted from 0 when the process
starts; ``epoch`` names that stream, so a position from an earlier process is
never taken for one of this. The ring is ``size`` bytes plus ``mirror`` more
that repeat its first bytes, so any message that starts before the wrap can
be read whole. The oldest retained byte (``tail``) is always the start of a
batch, hence of a message: whatever is evicted, it is whole batches.

Every batch's start, origin connection and first message number sit in three
arrays, oldest first, bounded by ``batch_capacity``: a flood of tiny batches
evicts old ones sooner instead of growing the index. Appends cost one copy and
a few integer writes; nothing here is per message.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from jitrelay import kernels
from jitrelay.core.shared_log import Snapshot
from jitrelay.kernels.constants import (
    KEEP_EVERYTHING_EVICTABLE,
    LOG_BATCH_CAPACITY,
    LOG_HEAD,
    LOG_HI,
    LOG_KEEP,
    LOG_LO,
    LOG_MESSAGES,
    LOG_MIRROR,
    LOG_RESERVE,
    LOG_SIZE,
    LOG_STATE_SLOTS,
    LOG_TAIL,
)

MIN_BATCHES = 4096
BYTES_PER_BATCH = 256  # index entries per ring byte: a full ring of batches this small is the limit


class _StateSlot:
    """One of the log's scalars, kept in ``RelayLog.state`` and read and written as a Python int."""

    def __init__(self, slot: int, doc: str) -> None:
        self.slot = slot
        self.__doc__ = doc

    def __get__(self, log: RelayLog | None, owner: object = None) -> Any:
        return self if log is None else int(log.state[self.slot])

    def __set__(self, log: RelayLog, value: int) -> None:
        log.state[self.slot] = value


class RelayLog:
    """A broadcast ring of forwarded bytes with stream positions; one per relay."""

    def __init__(
        self,
        size: int,
        mirror: int,
        batch_capacity: int | None = None,
        ring: np.ndarray | None = None,
        reserve: int = 0,
    ) -> None:
        if size < 1 or not 0 <= mirror <= size or not 0 <= reserve < size:
            raise ValueError(f"a log of {size} bytes cannot mirror {mirror} and keep {reserve} free")
        self.size = size
        self.mirror = mirror
        # Bytes after the head that hold nothing retained: a connection's next read may land there (``space``).
        self.reserve = reserve
        if ring is None:
            ring = np.empty(size + mirror, dtype=np.uint8)  # untouched pages cost nothing until written
        elif ring.shape != (size + mirror,) or ring.dtype != np.uint8:
            raise ValueError(f"a ring for a log of {size} bytes mirroring {mirror} must be that many bytes")
        self.ring = ring
        # Told the extent before an append overwrites anything and again once its bytes are in (shared readers).
        self.publisher: Callable[[Snapshot], None] | None = None
        self.address = self.ring.ctypes.data
        self.epoch = int.from_bytes(os.urandom(8), "little") >> 1 or 1  # never 0: 0 means "no position yet"
        self.batch_capacity = batch_capacity or max(MIN_BATCHES, size // BYTES_PER_BATCH)
        # The scalars below live in one array that the compiled read path (``kernels.read_loop``) moves too.
        self.state = np.zeros(LOG_STATE_SLOTS, dtype=np.int64)
        self.state[[LOG_SIZE, LOG_MIRROR, LOG_RESERVE, LOG_BATCH_CAPACITY]] = size, mirror, reserve, self.batch_capacity
        self.state[LOG_KEEP] = KEEP_EVERYTHING_EVICTABLE  # the relay lowers it while a cursor is behind
        room = 2 * self.batch_capacity  # the live window slides along and is moved back when it reaches the end
        self._starts = np.zeros(room, dtype=np.int64)
        self._origins = np.zeros(room, dtype=np.int64)
        self._first_message = np.zeros(room, dtype=np.int64)
        self.index = (self._starts, self._origins, self._first_message)  # for the compiled read path, which appends

    head = _StateSlot(LOG_HEAD, "stream offset after the last byte appended")
    tail = _StateSlot(LOG_TAIL, "oldest stream offset still in the ring; a batch start")
    messages = _StateSlot(LOG_MESSAGES, "messages appended since the start")
    _lo = _StateSlot(LOG_LO, "the oldest live entry of the batch index")
    _hi = _StateSlot(LOG_HI, "one past the newest entry of the batch index")
    keep = _StateSlot(LOG_KEEP, "the oldest stream offset a cursor behind needs: the read loop evicts up to it only")

    @property
    def batches(self) -> int:
        return self._hi - self._lo

    @property
    def capacity(self) -> int:
        """What the log keeps at most: the ring less the space kept free for reads."""
        return self.size - self.reserve

    @property
    def used(self) -> int:
        return self.head - self.tail

    # appending

    def tail_after(self, nbytes: int) -> int:
        """The tail an append of ``nbytes`` would leave: whole batches go until the bytes and the index fit."""
        if nbytes > self.capacity:
            raise ValueError(f"a batch of {nbytes} bytes does not fit in a log of {self.capacity}")
        needed = self.head + nbytes + self.reserve - self.size  # the oldest byte that must go
        keep = self._lo
        if needed > self.tail:
            starts = self._starts[self._lo : self._hi]
            keep = self._lo + int(np.searchsorted(starts, needed, side="left"))
        keep = max(keep, self._hi - self.batch_capacity + 1)  # room in the index for one more batch
        return self._start_of(keep)

    def append(self, buf: np.ndarray, runs: np.ndarray, n_runs: int, nbytes: int, n_messages: int, origin: int) -> int:
        """Copy a scan's forwarded runs in, evicting what ``tail_after`` says; the stream offset they start at."""
        self._evict_to(self.tail_after(nbytes))
        if self.publisher is not None:
            self.publisher(self.extent())  # readers see the new tail before the bytes they lose change
        start = self.head
        kernels.log_append(buf, runs, n_runs, self.ring, self.size, self.mirror, start % self.size)
        return self._record(start, nbytes, n_messages, origin)

    def space(self) -> tuple[int, int]:
        """Where the next read may land in the ring: ``(ring offset, length)`` of free bytes at the head, in one piece.

        The piece may run on into the mirror; ``commit`` puts such bytes where they belong.
        """
        at = self.head % self.size
        return at, min(self.reserve, self.size + self.mirror - at)

    def commit(self, nbytes: int, n_messages: int, origin: int) -> int:
        """Take ``nbytes`` already read into ``space()`` as the next batch; the stream offset they start at."""
        at, room = self.space()
        if not 0 < nbytes <= room:
            raise ValueError(f"{nbytes} bytes cannot be committed from {room} free at the head")
        # One publication, after: the read landed in space no reader may read, and what this eviction gives up
        # is overwritten only by a later read, which comes after readers have seen the new tail.
        self._evict_to(self.tail_after(nbytes))
        ring, size, mirror = self.ring, self.size, self.mirror
        end = at + nbytes
        if end > size:  # read on into the mirror: these bytes belong at the ring's start
            ring[: end - size] = ring[size:end]
        if at < mirror:  # written at the ring's start: its mirror repeats them
            ring[size + at : size + min(mirror, end)] = ring[at : min(mirror, end)]
        return self._record(self.head, nbytes, n_messages, origin)

    def _record(self, start: int, nbytes: int, n_messages: int, origin: int) -> int:
        if self._hi == len(self._starts):
            self._slide()
        i = self._hi
        self._starts[i] = start
        self._origins[i] = origin
        self._first_message[i] = self.messages
        self._hi += 1
        self.head = start + nbytes
        self.messages += n_messages
        if self.publisher is not None:
            self.publisher(self.extent())
        return start

    def extent(self) -> Snapshot:
        """What is readable now: ``[tail, head)``, with the numbers of the messages at both ends."""
        return Snapshot(self.head, self.messages, self.tail, self.oldest_message())

    def _start_of(self, index: int) -> int:
        return int(self._starts[index]) if index < self._hi else self.head

    def _evict_to(self, tail: int) -> None:
        if tail == self.tail:
            return
        starts = self._starts[self._lo : self._hi]
        self._lo += int(np.searchsorted(starts, tail, side="left"))
        self.tail = tail

    def _slide(self) -> None:
        count = self._hi - self._lo
        for column in (self._starts, self._origins, self._first_message):
            column[:count] = column[self._lo : self._hi]
        self._lo, self._hi = 0, count

    # reading

    def pieces(self, start: int, end: int) -> tuple[tuple[int, int], ...]:
        """Where stream bytes ``[start, end)`` lie in the ring: one or two ``(ring offset, length)`` pieces."""
        if not self.tail <= start <= end <= self.head:
            raise ValueError(f"[{start}, {end}) is not within the log's [{self.tail}, {self.head})")
        at = start % self.size
        first = min(end - start, self.size - at)
        if first == end - start:
            return ((at, first),)
        return ((at, first), (0, end - start - first))

    def views(self, start: int, end: int) -> list[memoryview]:
        """The ring's memory for stream bytes ``[start, end)``, for a ``sendmsg``."""
        data = self.ring.data
        return [data[at : at + length] for at, length in self.pieces(start, end)]

    def next_range(self, position: int, origin: int) -> tuple[int, int]:
        """The next stretch from ``position`` of batches ``origin`` did not publish: a subscriber's own are skipped.

        ``position`` is at or after the tail. Returns ``(start, end)``, empty at the head.
        """
        lo = self._lo + max(0, int(np.searchsorted(self._starts[self._lo : self._hi], position, side="right")) - 1)
        origins = self._origins[lo : self._hi]
        own = origins == origin
        if not own.any():
            return position, self.head
        if own[0] and int(self._starts[lo]) <= position:
            foreign = np.flatnonzero(~own)
            if not len(foreign):
                return self.head, self.head
            lo += int(foreign[0])
            position = max(position, int(self._starts[lo]))
            own = self._origins[lo : self._hi] == origin
        mine = np.flatnonzero(own)
        return position, self._start_of(lo + int(mine[0])) if len(mine) else self.head

    def messages_from(self, position: int) -> int:
        """Messages not wholly before ``position``: what a subscriber there has yet to receive (some in part)."""
        if position >= self.head:
            return 0
        position = max(position, self.tail)
        index = self._lo + int(np.searchsorted(self._starts[self._lo : self._hi], position, side="right")) - 1
        start = int(self._starts[index])
        after = self.messages - int(self._first_message[index])
        return after - self._whole_messages(start, position)

    def spans(self, start: int, end: int, limit: int) -> list[tuple[int, int]]:
        """``[start, end)`` cut at batch starts into stretches of at most ``limit`` bytes (one batch may be more)."""
        starts = self._starts[self._lo : self._hi]
        cuts = [int(s) for s in starts[(starts > start) & (starts < end)]] + [end]
        spans, a, last = [], start, start
        for cut in cuts:
            if cut - a > limit and last > a:
                spans.append((a, last))
                a = last
            last = cut
        spans.append((a, end))
        return spans

    def message_number(self, position: int) -> int:
        """The number of the message that starts at ``position`` (a message boundary in the log, or the head)."""
        return self.messages - self.messages_from(position)

    def boundary(self, position: int) -> int:
        """The first message boundary at or after ``position`` (in the log): where a message cut there ends."""
        if position >= self.head:
            return self.head
        position = max(position, self.tail)
        index = self._lo + int(np.searchsorted(self._starts[self._lo : self._hi], position, side="right")) - 1
        start = int(self._starts[index])
        _, end = self._walk(start, position)
        if end == position:
            return end
        at = end % self.size  # the message cut at ``position`` starts here and is whole in the ring and mirror
        return end + kernels.message_end(self.ring, at, self.size + self.mirror) - at

    def oldest_message(self) -> int:
        """The number of the oldest message still in the log."""
        return int(self._first_message[self._lo]) if self._hi > self._lo else self.messages

    def _whole_messages(self, start: int, end: int) -> int:
        """Complete messages in stream bytes ``[start, end)``, which begin at a message boundary."""
        return self._walk(start, end)[0]

    def _walk(self, start: int, end: int) -> tuple[int, int]:
        """Complete messages in ``[start, end)`` from a boundary, and the boundary after the last of them."""
        count = 0
        while start < end:
            at = start % self.size
            window = min(end - start, self.size + self.mirror - at)
            n, consumed, _ = kernels.frame(self.ring, at, at + window)
            if n == 0:
                break
            count += n
            start += consumed - at
        return count, start
