"""Every connection's cursor as a slot in arrays: its mode, its flags, its position, its group.

The relay asks the same questions of its cursors again and again (is anyone
behind? who is held? who reads the mapped log?). One table with a mode per
cursor and counts per mode answers them in O(1), and cannot drift out of step
the way separate sets kept by hand can. Arrays, not objects, so that compiled
code reads the same state the Python control plane writes: the read loop
keeps in the log whatever an unfiltered cursor behind has not read, from
``mode``, ``group`` and ``position``, and looks at them only while
``mode_counts`` says a cursor is behind (``kernels.read_path.ReadPath.watch_cursors``).

A mode says what serves a cursor now; a flag says something that holds
whatever the mode (a positioned subscriber keeps up or is behind, a publisher
is held or not). A cursor that nothing serves from a writer of its own rests
in the mode its flags give (``settle``): mapped once granted, not reading once
found so, publish-only once declared, else keeping up.
"""

from __future__ import annotations

import enum
from typing import Generic, Protocol, TypeVar

import numpy as np

from jitrelay.kernels.constants import CURSOR_BEHIND


class CursorMode(enum.IntEnum):
    """What serves a connection's cursor now."""

    FREE = 0  # the slot holds no connection
    KEEPING_UP = 1  # at the head: the send loop hands it each batch
    BEHIND = CURSOR_BEHIND  # its socket took less than its share: its own writer sends from its position in the log
    REPLAYING = 3  # behind, and resuming from the journal before the log takes over
    MAPPED = 4  # a reader of the mapped log, granted its slot: the socket carries nothing
    PUBLISH_ONLY = 5  # it declared it never reads: it is sent nothing
    NOT_READING = 6  # a publisher found never to read its socket: detached, it is sent nothing
    CLOSED = 7  # its connection is gone, but a batch of its still waits (held, or for the journal)


CATCHING_UP = (CursorMode.BEHIND, CursorMode.REPLAYING)  # the modes whose own writer serves them
_RESTING = frozenset(
    int(m) for m in (CursorMode.KEEPING_UP, CursorMode.MAPPED, CursorMode.PUBLISH_ONLY, CursorMode.NOT_READING)
)


class CursorFlag(enum.IntFlag):
    """What holds of a cursor whatever its mode."""

    POSITIONED = 1  # it asked for position notices (for good)
    POSITION_NOTICES = 2  # its cursor sends it notices between batches: woken when a batch is owed to it
    HELD = 4  # a publisher paused under ``block`` until the log has room for its bytes
    SHARING = 8  # it asked for the mapped log; the socket carries its stream until the grant
    GRANTED = 16  # the grant is out: it reads the mapped log
    PUBLISH_ONLY = 32  # it declared it never reads
    NEVER_READS = 64  # found never to read its socket


# A connection with any of these is sent nothing over its socket, whatever its mode: no send target, in no group.
NOT_SENT_TO = int(CursorFlag.PUBLISH_ONLY | CursorFlag.NEVER_READS | CursorFlag.GRANTED)


class Cursor(Protocol):
    """What the table reads and writes of a connection (the server's ``Connection``)."""

    peer: str
    fd: int
    cursor_slot: int


C = TypeVar("C", bound=Cursor)


class CursorTableFull(RuntimeError):
    """Every slot of the cursor table is taken."""


class CursorTable(Generic[C]):
    """One slot per connection: ``fd``, ``mode``, ``flags``, ``position`` and ``group`` arrays, and counts
    (``mode_counts``: cursors per mode, an array too).

    ``group`` is the subscription group a cursor is in (-1: none), as the relay last worked it out.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("a cursor table needs at least one slot")
        self.capacity = capacity
        self.fd = np.full(capacity, -1, dtype=np.int64)
        self.mode = np.full(capacity, CursorMode.FREE, dtype=np.int8)
        self.flags = np.zeros(capacity, dtype=np.int64)
        self.position = np.zeros(capacity, dtype=np.int64)
        self.group = np.full(capacity, -1, dtype=np.int64)
        self.connections: list[C | None] = [None] * capacity
        self._free = list(range(capacity - 1, -1, -1))  # a stack: the lowest slots first, then the latest freed
        self._mode_counts = [0] * len(CursorMode)
        self._mode_counts[CursorMode.FREE] = capacity
        self.mode_counts = np.array(self._mode_counts, dtype=np.int64)  # the same, for compiled code
        self._flag_counts = dict.fromkeys(map(int, CursorFlag), 0)

    @property
    def full(self) -> bool:
        return not self._free

    def add(self, conn: C) -> int:
        """Give ``conn`` a slot, keeping up, with no flags; its slot."""
        if conn.cursor_slot >= 0:
            raise ValueError(f"{conn.peer} already has cursor slot {conn.cursor_slot}")
        if not self._free:
            raise CursorTableFull(f"no cursor slot for {conn.peer}: all {self.capacity} are taken")
        slot = self._free.pop()
        self.connections[slot] = conn
        self.fd[slot] = conn.fd
        self.position[slot] = 0
        self.group[slot] = -1
        self._set_mode(slot, CursorMode.KEEPING_UP)
        conn.cursor_slot = slot
        return slot

    def remove(self, conn: C) -> None:
        """Free ``conn``'s slot: its flags and mode go with it."""
        slot = self._slot(conn)
        flags = int(self.flags[slot])
        for flag in self._flag_counts:
            if flags & flag:
                self._flag_counts[flag] -= 1
        self.flags[slot] = 0
        self._set_mode(slot, CursorMode.FREE)
        self.fd[slot] = -1
        self.group[slot] = -1
        self.connections[slot] = None
        self._free.append(slot)
        conn.cursor_slot = -1

    def set_mode(self, conn: C, mode: CursorMode) -> None:
        if mode == CursorMode.FREE:
            raise ValueError("a slot is freed by remove, not by a mode")
        self._set_mode(self._slot(conn), mode)

    def settle(self, conn: C) -> None:
        """``conn``'s cursor is served by no writer of its own any more: the resting mode its flags give."""
        slot = self._slot(conn)
        self._set_mode(slot, _resting_mode(int(self.flags[slot])))

    def set_flag(self, conn: C, flag: CursorFlag) -> None:
        slot, bit = self._slot(conn), int(flag)
        flags = int(self.flags[slot])
        if not flags & bit:
            self.flags[slot] = flags | bit
            self._flag_counts[bit] += 1
            self._follow_flags(slot)

    def clear_flag(self, conn: C, flag: CursorFlag) -> None:
        slot, bit = self._slot(conn), int(flag)
        flags = int(self.flags[slot])
        if flags & bit:
            self.flags[slot] = flags & ~bit
            self._flag_counts[bit] -= 1
            self._follow_flags(slot)

    def set_position(self, conn: C, position: int) -> None:
        self.position[self._slot(conn)] = position

    def count(self, *modes: CursorMode) -> int:
        """How many cursors are in any of ``modes``."""
        if len(modes) == 1:
            return self._mode_counts[modes[0]]
        return sum(self._mode_counts[mode] for mode in modes)

    def count_flagged(self, flag: CursorFlag) -> int:
        return self._flag_counts[int(flag)]

    def members(self, *modes: CursorMode) -> list[C]:
        """The connections whose cursors are in any of ``modes``, by slot: a new list, safe to change them over."""
        if not self.count(*modes):
            return []
        if len(modes) == 1:
            return self._at(np.flatnonzero(self.mode == int(modes[0])))
        return self._at(np.flatnonzero(np.isin(self.mode, [int(mode) for mode in modes])))

    def flagged(self, flag: CursorFlag) -> list[C]:
        """The connections whose cursors have ``flag``, by slot: a new list, safe to change them over."""
        if not self._flag_counts[int(flag)]:
            return []
        return self._at(np.flatnonzero(self.flags & int(flag)))

    def _at(self, slots: np.ndarray) -> list[C]:
        found = [self.connections[slot] for slot in slots.tolist()]
        return [conn for conn in found if conn is not None]

    def _slot(self, conn: C) -> int:
        slot = conn.cursor_slot
        if slot < 0 or self.connections[slot] is not conn:
            raise LookupError(f"{conn.peer} has no cursor slot")
        return slot

    def _set_mode(self, slot: int, mode: int) -> None:
        old = int(self.mode[slot])
        self._mode_counts[old] -= 1
        self._mode_counts[mode] += 1
        self.mode_counts[old] -= 1
        self.mode_counts[mode] += 1
        self.mode[slot] = mode

    def _follow_flags(self, slot: int) -> None:
        """A resting cursor's mode follows its flags."""
        if int(self.mode[slot]) in _RESTING:
            self._set_mode(slot, _resting_mode(int(self.flags[slot])))


_GRANTED, _NEVER_READS, _PUBLISH_ONLY = (
    int(CursorFlag.GRANTED),
    int(CursorFlag.NEVER_READS),
    int(CursorFlag.PUBLISH_ONLY),
)
_MAPPED, _NOT_READING, _PUBLISHING_ONLY, _KEEPING_UP = (
    int(CursorMode.MAPPED),
    int(CursorMode.NOT_READING),
    int(CursorMode.PUBLISH_ONLY),
    int(CursorMode.KEEPING_UP),
)


def _resting_mode(flags: int) -> int:
    if flags & _GRANTED:
        return _MAPPED
    if flags & _NEVER_READS:
        return _NOT_READING
    if flags & _PUBLISH_ONLY:
        return _PUBLISHING_ONLY
    return _KEEPING_UP
