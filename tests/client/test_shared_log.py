"""The mapped log's reader in one process: the relay's ``RelayLog`` appends into ``SharedLogMemory``, a reader maps it.

No relay runs here: the test appends batches to a log whose ring lives in the
shared memory, hands a reader a grant it builds itself with duplicates of the
memory's descriptors, and checks that the reader returns the appended bytes
exactly, across the ring's wrap and its mirror, and that once the log has
overwritten what it had yet to read it reports the exact messages and bytes
missed, then reads on from the oldest message kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitrelay.client.shared_log import SharedLogReader
from jitrelay.core import protocol
from jitrelay.server.log import RelayLog
from jitrelay.server.shared_memory import SharedLogMemory

SIZE = 16 * 1024
MIRROR = 1024  # the largest message here
READERS = 4


class Log:
    """A ``RelayLog`` in shared memory, publishing its extent as the engine's does, and what was appended to it."""

    def __init__(self, size: int = SIZE, mirror: int = MIRROR) -> None:
        self.memory = SharedLogMemory(size, mirror, READERS)
        self.log = RelayLog(size, mirror, ring=self.memory.ring)
        self.memory.start(self.log.epoch)
        self.log.publisher = self.memory.publish
        self.stream = bytearray()  # every byte appended, from stream offset 0
        self.batches: list[tuple[int, int]] = []  # (stream offset, first message number) of each append
        self.sequence = 0

    def append(self, sizes: list[int]) -> bytes:
        """One batch of messages of the given payload sizes; their bytes."""
        batch = b"".join(self.message(size) for size in sizes)
        buf = np.frombuffer(batch, dtype=np.uint8)
        self.batches.append((self.log.head, self.log.messages))
        self.log.append(buf, np.array([0, len(batch)], dtype=np.int64), 1, len(batch), len(sizes), 1)
        self.memory.wake()
        self.stream += batch
        return batch

    def message(self, payload: int) -> bytes:
        """The next market data message: no record, or one of about ``payload`` bytes (at most MIRROR in all)."""
        self.sequence += 1
        records = [(1 + self.sequence % 19, bytes([self.sequence % 251]) * (payload - 2))] if payload else []
        return protocol.build_message(protocol.MARKET_DATA, records, sequence=self.sequence, source=self.sequence % 7)

    def reader(self) -> SharedLogReader:
        """A reader granted from the head, as the relay grants one: a slot, the epoch, duplicated descriptors."""
        slot = self.memory.claim(owner=1 + self.memory.claimed, position=self.log.head)
        grant = protocol.SharedLog(self.log.epoch, self.log.head, self.log.messages, slot)
        log_fd, slots_fd = (os.dup(fd) for fd in self.memory.descriptors)
        return SharedLogReader(grant, log_fd, slots_fd, MIRROR)

    def slot_position(self, reader: SharedLogReader) -> int:
        return int(self.memory.positions([0])[0])  # the first reader's: slots are given from 0

    def close(self) -> None:
        self.memory.close()


@pytest.fixture
def log() -> Iterator[Log]:
    made = Log()
    yield made
    made.close()


def read_all(reader: SharedLogReader, limit: int) -> bytes:
    """Everything up to the head, in reads of at most ``limit`` bytes (at least a message); no lap allowed."""
    got = bytearray()
    while (data := reader.read(limit)) is not None:
        assert not isinstance(data, protocol.Lapped), f"lapped while keeping up: {data}"
        got += data.tobytes()
    return bytes(got)


def test_reads_equal_the_appended_bytes_across_many_wraps(log: Log) -> None:
    reader = log.reader()
    assert reader.read(1 << 16) is None  # at the head
    start = len(log.stream)
    for round_ in range(800):  # over 20 times round the ring, every batch ending somewhere else in it
        log.append([(round_ * 37 + k * 11) % 250 + 2 for k in range(1 + round_ % 5)])
        assert read_all(reader, 1 << 16) == bytes(log.stream[start:])
        start = len(log.stream)
        assert reader.offset == log.log.head and reader.message == log.log.messages
        assert log.slot_position(reader) == log.log.head  # what holds the relay back under ``block``
    assert log.log.head > 20 * SIZE


def test_a_read_short_of_the_head_ends_at_a_whole_message(log: Log) -> None:
    """Wrapping batches read with a limit below what is there: whole messages each time, through the mirror."""
    reader = log.reader()
    got = bytearray()
    for _ in range(120):
        log.append([300, 700, 5, 980])
        while (data := reader.read(1)) is not None:  # the limit is raised to the largest message: MIRROR
            assert not isinstance(data, protocol.Lapped)
            messages = list(protocol.decode_messages(data.tobytes()))
            assert messages and len(data) <= MIRROR
            assert b"".join(m.raw for m in messages) == data.tobytes(), "not whole messages"
            got += data.tobytes()
    assert bytes(got) == bytes(log.stream)


def test_a_lapped_reader_is_told_exactly_what_it_missed_then_reads_on(log: Log) -> None:
    reader = log.reader()
    log.append([100] * 3)
    assert read_all(reader, 1 << 16) == bytes(log.stream)
    offset, message = reader.offset, reader.message
    while log.log.tail <= offset:  # the log overwrites past the reader
        log.append([200, 50, 7])
    report = reader.read(1 << 16)
    assert isinstance(report, protocol.Lapped)
    tail = log.log.tail
    kept = [first for start, first in log.batches if start == tail]
    assert kept, "the tail is not where a batch starts"
    assert report == protocol.Lapped(offset, kept[0] - message, tail - offset)
    assert log.slot_position(reader) == tail
    assert read_all(reader, 1 << 16) == bytes(log.stream[tail:])
    assert reader.message == log.log.messages


def test_a_reader_granted_by_another_log_is_refused(log: Log) -> None:
    other = Log()
    try:
        slot = other.memory.claim(owner=1, position=0)
        grant = protocol.SharedLog(log.log.epoch, 0, 0, slot)  # this log's epoch, the other's memory
        with pytest.raises(protocol.ProtocolError):
            SharedLogReader(grant, *(os.dup(fd) for fd in other.memory.descriptors), MIRROR)
    finally:
        other.close()


def test_the_log_is_mapped_read_only(log: Log) -> None:
    reader = log.reader()
    with pytest.raises((TypeError, ValueError)):
        reader._ring[0] = 1


# Rounds of appends (batches of payload sizes) each followed, or not, by a read of a random limit.
rounds = st.lists(
    st.tuples(
        st.lists(st.lists(st.integers(2, 257) | st.just(0), min_size=1, max_size=12), min_size=1, max_size=4),
        st.none() | st.integers(1, 3 * SIZE),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(rounds)
def test_every_byte_is_read_once_in_order_or_reported_missed(plan: list[tuple[list[list[int]], int | None]]) -> None:
    """Whatever the batches and reads: what is read plus what is reported missed is the stream, in order."""
    log = Log()
    try:
        reader = log.reader()
        rebuilt = bytearray()  # what was read, with each reported gap filled from the appended stream
        missed_messages = 0
        for batches, limit in [*plan, ([], 1)]:
            for sizes in batches:
                log.append(sizes)
            if limit is None:
                continue
            while (data := reader.read(limit)) is not None:
                if isinstance(data, protocol.Lapped):
                    assert data.offset == len(rebuilt) and data.bytes > 0 and data.messages > 0
                    assert data.offset + data.bytes == log.log.tail
                    rebuilt += log.stream[data.offset : data.offset + data.bytes]
                    missed_messages += data.messages
                    continue
                got = data.tobytes()
                assert got == bytes(log.stream[len(rebuilt) : len(rebuilt) + len(got)])
                assert len(got) <= max(limit, MIRROR)
                rebuilt += got
        assert bytes(rebuilt) == bytes(log.stream)
        assert reader.message == log.log.messages
        read_messages = len(list(protocol.decode_messages(bytes(log.stream)))) - missed_messages
        assert read_messages + missed_messages == log.sequence
    finally:
        log.close()
