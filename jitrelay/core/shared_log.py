"""The layout of the relay's log in shared memory, and the seqlock both sides read it by.

The log's memory file is one header page, then the ring (``size`` bytes), then
the mirror (``mirror`` bytes repeating the ring's first ones). The relay is the
only writer. Readers map it read-only; each also has a slot of its own in a
second, small file of reader slots, where it says how far it has read (the
relay's gate under ``block``, and its lag figures). The relay is the only
writer of the header; a reader is the only writer of its slot's position.

Ordering (the anchors' rule: publish a position only after its bytes): the
relay moves ``tail`` forward before it overwrites the bytes it gives up, and
``head`` only after the new bytes are in. A reader copies ``[position, head)``
and then reads ``tail`` again: if the tail passed its position meanwhile, the
copy may hold overwritten bytes and is thrown away. The four stream words are
one seqlock snapshot: ``SEQUENCE`` is odd while the relay writes them.

Stores and loads here are plain aligned 64-bit ones; on x86-64 (total store
order) that is all the ordering the rule needs. Everything here is memory,
no system call: the wake-up and the mapping live with their users.
"""

from __future__ import annotations

import mmap
from typing import NamedTuple

import numpy as np

MAGIC = 0x6A69_7472_6C6F_6701  # "jitrlog", version 1
HEADER_BYTES = 4096  # one page: the ring starts page-aligned
WORDS = HEADER_BYTES // 8

# Header words (int64).
W_MAGIC = 0
W_EPOCH = 1
W_SIZE = 2
W_MIRROR = 3
W_SEQUENCE = 8  # seqlock over the next four
W_HEAD = 9
W_HEAD_MESSAGE = 10
W_TAIL = 11
W_TAIL_MESSAGE = 12
W_WAKE = 16  # the futex word (its low 32 bits), on a cache line of its own; bumped after each append
W_CLOSED = 24  # the relay is going away: readers drain to the head and end

# Reader slots: one cache line each.
SLOT_BYTES = 64
SLOT_WORDS = SLOT_BYTES // 8
S_POSITION = 0  # written by the reader: the stream offset it has read up to
S_OWNER = 1  # written by the relay: the connection the slot belongs to, 0 when free


class Snapshot(NamedTuple):
    """The log's extent at one instant: ``[tail, head)`` is readable; message numbers at both ends."""

    head: int
    head_message: int
    tail: int
    tail_message: int


def header_view(buffer: mmap.mmap) -> np.ndarray:
    """The header words of a mapped log (read-only or writable, as the buffer is)."""
    return np.frombuffer(buffer, dtype=np.int64, count=WORDS)


def ring_view(buffer: mmap.mmap, size: int, mirror: int) -> np.ndarray:
    """The ring and its mirror, as bytes."""
    return np.frombuffer(buffer, dtype=np.uint8, count=size + mirror, offset=HEADER_BYTES)


def slots_view(buffer: mmap.mmap) -> np.ndarray:
    """The reader slots as a ``(slots, SLOT_WORDS)`` array of int64."""
    words = np.frombuffer(buffer, dtype=np.int64)
    return words.reshape(-1, SLOT_WORDS)


def initialise(header: np.ndarray, epoch: int, size: int, mirror: int) -> None:
    """Write a new log's header words: its epoch, sizes and empty extent, before any reader maps it."""
    header[:] = 0
    header[W_EPOCH] = epoch
    header[W_SIZE] = size
    header[W_MIRROR] = mirror
    header[W_MAGIC] = MAGIC


def publish(header: np.ndarray, snapshot: Snapshot) -> None:
    """Write a new extent as one seqlock update (the relay only)."""
    header[W_SEQUENCE] += 1
    header[W_HEAD] = snapshot.head
    header[W_HEAD_MESSAGE] = snapshot.head_message
    header[W_TAIL] = snapshot.tail
    header[W_TAIL_MESSAGE] = snapshot.tail_message
    header[W_SEQUENCE] += 1


def snapshot(header: np.ndarray) -> Snapshot:
    """Read the extent as one consistent seqlock snapshot."""
    words = header[W_SEQUENCE : W_TAIL_MESSAGE + 1]
    while True:
        before, head, head_message, tail, tail_message = words.tolist()  # one load each, sequence first
        if not before & 1 and header[W_SEQUENCE] == before:
            return Snapshot(head, head_message, tail, tail_message)
