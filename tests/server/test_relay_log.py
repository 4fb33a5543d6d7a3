"""The relay's log against a plain model: the bytes it keeps, what it evicts, positions, counts, own batches.

The model is the whole stream as one ``bytes`` with each batch's start,
origin and messages; the log must hold exactly the model's bytes from its tail
to its head, evict only whole batches, and count and skip as the model does.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitrelay.core.protocol import build_message
from jitrelay.server.log import RelayLog

MIRROR = 32 + 64  # the largest message these tests build


def batch(origin: int, sizes: list[int], first: int) -> tuple[bytes, list[int]]:
    """Messages of the given payload sizes (one record each), back to back."""
    messages = [
        build_message(1, [(1, bytes([first + i & 0xFF]) * (n - 2))], sequence=first + i) for i, n in enumerate(sizes)
    ]
    return b"".join(messages), [len(m) for m in messages]


class Model:
    def __init__(self) -> None:
        self.stream = b""
        self.batches: list[tuple[int, int, int]] = []  # (start, origin, first message)
        self.message_starts: list[int] = []

    def append(self, data: bytes, lengths: list[int], origin: int) -> None:
        self.batches.append((len(self.stream), origin, len(self.message_starts)))
        at = len(self.stream)
        for n in lengths:
            self.message_starts.append(at)
            at += n
        self.stream += data

    def messages_from(self, position: int) -> int:
        ends = [start + n for start, n in zip(self.message_starts, self._lengths(), strict=True)]
        return sum(1 for end in ends if end > position)

    def _lengths(self) -> list[int]:
        starts = [*self.message_starts, len(self.stream)]
        return [b - a for a, b in zip(starts, starts[1:], strict=False)]


def append(log: RelayLog, data: bytes, lengths: list[int], origin: int) -> int:
    buf = np.frombuffer(data, dtype=np.uint8).copy()
    runs = np.array([0, len(data)], dtype=np.int64)
    return log.append(buf, runs, 1, len(data), len(lengths), origin)


def held(log: RelayLog, start: int, end: int) -> bytes:
    return b"".join(bytes(view) for view in log.views(start, end))


batches = st.lists(
    st.tuples(st.integers(1, 3), st.lists(st.integers(2, 64), min_size=1, max_size=6)), min_size=1, max_size=40
)


@settings(max_examples=150, deadline=None)
@given(batches, st.integers(1152, 4096), st.randoms(use_true_random=False))  # a batch is at most half the log
def test_the_log_keeps_exactly_the_stream_from_tail_to_head(plan: list, size: int, rng: object) -> None:
    log, model = RelayLog(size, MIRROR, batch_capacity=16), Model()
    for origin, sizes in plan:
        data, lengths = batch(origin, sizes, len(model.message_starts))
        tail = log.tail_after(len(data))
        assert append(log, data, lengths, origin) == len(model.stream)
        model.append(data, lengths, origin)
        assert log.tail == tail and log.head == len(model.stream)
        assert log.used <= size and tail in [start for start, _, _ in model.batches]
        assert held(log, log.tail, log.head) == model.stream[log.tail :]
        assert log.messages == len(model.message_starts)
    for _ in range(20):
        position = rng.randint(log.tail, log.head)  # type: ignore[attr-defined]
        assert log.messages_from(position) == model.messages_from(position)
    boundaries = [start for start, _, _ in model.batches if start >= log.tail]
    for position in boundaries:
        for origin in (1, 2, 3, -1):
            start, end = log.next_range(position, origin)
            foreign = [(s, o) for s, o, _ in model.batches if s >= position]
            skipped = next((s for s, o in foreign if o != origin), log.head)
            assert start == skipped
            assert end == next((s for s, o in foreign if o == origin and s > start), log.head)


def test_pieces_split_where_the_ring_wraps_and_the_mirror_keeps_messages_whole() -> None:
    log = RelayLog(256, MIRROR)
    first, lengths = batch(1, [40, 40, 40], 0)  # three 72-byte messages: 0..216
    append(log, first, lengths, 1)
    second, lengths = batch(1, [40, 40], 3)  # 216..360: wraps at 256
    start = append(log, second, lengths, 1)
    assert start == 216
    assert log.pieces(start, start + len(second)) == ((216, 40), (0, 104))
    assert held(log, start, start + len(second)) == second
    # The message that starts before the end reads whole from the ring, mirror included.
    assert log.ring[216 : 216 + lengths[0]].tobytes() == second[: lengths[0]]
    with pytest.raises(ValueError, match="not within the log"):
        log.pieces(0, 10)  # evicted


def test_a_batch_larger_than_the_log_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        RelayLog(64, 0).tail_after(65)


@settings(max_examples=150, deadline=None)
@given(batches, st.integers(1152, 4096), st.integers(256, 512), st.lists(st.booleans(), min_size=40, max_size=40))
def test_reads_committed_where_they_landed_keep_the_same_stream_as_appends(
    plan: list, size: int, reserve: int, direct: list[bool]
) -> None:
    """A read into ``space()`` then ``commit`` is an append without the copy: the ring, mirror and index agree."""
    log, model = RelayLog(size + reserve, MIRROR, batch_capacity=16, reserve=reserve), Model()
    for (origin, sizes), in_place in zip(plan, direct, strict=False):
        data, lengths = batch(origin, sizes, len(model.message_starts))
        data, lengths = data[:reserve], lengths[: max(1, sum(1 for k in np.cumsum(lengths) if k <= reserve))]
        data = data[: sum(lengths)]
        at, room = log.space()
        assert room <= reserve
        kept = held(log, log.tail, log.head)
        if in_place and len(data) <= room:
            log.ring[at : at + len(data)] = np.frombuffer(data, dtype=np.uint8)  # what a read there does
            assert held(log, log.tail, log.head) == kept  # the space holds nothing the log keeps
            start = log.commit(len(data), len(lengths), origin)
        else:
            start = append(log, data, lengths, origin)
        assert start == len(model.stream)
        model.append(data, lengths, origin)
        assert log.used <= size
        assert held(log, log.tail, log.head) == model.stream[log.tail :]
        kept_at = np.arange(log.tail, log.head) % log.size  # where each byte kept lies; its mirror repeats it
        mirrored = kept_at[kept_at < MIRROR]
        assert (log.ring[log.size + mirrored] == log.ring[mirrored]).all()
        for position in [s for s, _, _ in model.batches if s >= log.tail]:
            assert log.boundary(position) == position


def test_a_commit_larger_than_the_space_is_refused() -> None:
    log = RelayLog(1024, MIRROR, reserve=128)
    assert log.space() == (0, 128)
    with pytest.raises(ValueError, match="cannot be committed"):
        log.commit(129, 1, 1)
