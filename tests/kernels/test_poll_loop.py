"""The poll loop (``kernels.polling.PollLoop``): the relay's own epoll set, read and forwarded in one call.

Runs for every build of the loops with the other kernel tests, on socket
pairs. The model: the Python log (``RelayLog.commit``) given the same
batches, and the publishers' own streams. For any publishers sending whole
messages cut at any boundaries, each report row's batch is the next piece of
its publisher's stream, the log ends as the Python log given those batches
ends, every target's peer receives exactly the batches in log order, and
what is left unread is each slot's carry. Then one test per way a call
stops: a read that is not all whole forwarded messages, a close, no room at
the head, a target left short, a carry over the limit, the bound on reads.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.streams import drain

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.domains import logic_for
from jitrelay.kernels import constants as c
from jitrelay.kernels.polling import PollLoop
from jitrelay.kernels.read_path import ReadPath
from jitrelay.server.log import RelayLog

pytestmark = pytest.mark.kernels

TABLES = kernels.tables_for(logic_for("market_data"))
RESERVE = 2048  # a read is at most this long


def message(n: int, size: int) -> bytes:
    return protocol.build_message(
        protocol.MARKET_DATA, [(1 + n % 4, bytes([n % 251]) * size)], sequence=n, timestamp_ns=n
    )


def new_log(size: int, mirror: int = RESERVE) -> RelayLog:
    return RelayLog(size, mirror, ring=np.zeros(size + mirror, dtype=np.uint8), reserve=RESERVE)


class Setup:
    """A log, a poll loop over it, publishers in its slots and subscribers as the send loop's targets."""

    def __init__(self, pairs: list, log: RelayLog, publishers: int, subscribers: int, reads: int = 16) -> None:
        """``pairs`` gets every socket pair made, for the caller to close."""
        self.log = log
        path = ReadPath(log.ring, TABLES, kernels.ScanBuffers(RESERVE), log.state, log.index)
        self.loop = PollLoop(8, path, reads)
        self.fan = kernels.FanOut()
        self.fan.reserve(subscribers + publishers, 2)
        self.senders, self.peers, self.carries = [], [], []
        for slot in range(publishers):
            ours, theirs = socket.socketpair()
            pairs.append((ours, theirs))
            ours.setblocking(False)
            carry = np.zeros(RESERVE, dtype=np.uint8)
            self.carries.append(carry)
            self.loop.add(slot, ours.fileno(), 100 + slot, carry, 0, np.zeros(len(protocol.VERDICT_NAMES), np.int64))
            self.senders.append(theirs)
        for t in range(subscribers):
            ours, theirs = socket.socketpair()
            pairs.append((ours, theirs))
            ours.setblocking(False)
            theirs.setblocking(False)
            self.fan.fds[t] = ours.fileno()
            self.peers.append(theirs)
        self.targets = subscribers

    def run(self, carry_limit: int = RESERVE) -> list[list[int]]:
        made = self.loop.read_ready(self.fan, self.targets, carry_limit)
        return self.loop.reports[:made].tolist()


def log_facts(log: RelayLog) -> tuple:
    live = slice(log._lo, log._hi)
    kept = b"".join(bytes(v) for v in log.views(log.tail, log.head))
    return (
        log.head, log.tail, log.messages, log._starts[live].tolist(), log._origins[live].tolist(),
        log._first_message[live].tolist(), kept,
    )  # fmt: skip


streams = st.lists(  # per publisher: message sizes, and where its stream is cut into sends
    st.tuples(st.lists(st.integers(0, 300), min_size=1, max_size=30), st.lists(st.integers(1, 900), max_size=8)),
    min_size=1,
    max_size=3,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=streams,
    size=st.integers(2 * RESERVE, 6 * RESERVE),
    mirror=st.sampled_from([RESERVE, 400]),  # 400: the relay's shape, reads cut short near the ring's end
    subscribers=st.integers(0, 2),
    reads=st.integers(1, 16),
)
@example(  # three publishers, 30 KB, wrapping a small log seven times: reads cut short at every lap's end
    plan=[([300, 17, 250] * 10, [700, 1900, 4000, 6100]) for _ in range(3)],
    size=2 * RESERVE,
    mirror=400,
    subscribers=1,
    reads=16,
)
def test_every_batch_is_its_publishers_next_piece_and_the_log_ends_as_the_python_log(
    plan: list, size: int, mirror: int, subscribers: int, reads: int
) -> None:
    pairs: list = []
    try:
        check_batches(Setup(pairs, new_log(size, mirror), len(plan), subscribers, reads), plan, size, mirror)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def check_batches(setup: Setup, plan: list, size: int, mirror: int = RESERVE) -> None:
    model = new_log(size, mirror)
    streams_, sent = [], []
    n = 0
    for sizes, cuts in plan:
        stream = b"".join(message(n + k, s) for k, s in enumerate(sizes))
        n += len(sizes)
        streams_.append(stream)
        points = sorted({min(x, len(stream)) for x in cuts})
        pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True) if b > a]
        sent.append(pieces)
    taken = [0] * len(plan)
    batches = []

    def consume(rows: list[list[int]]) -> int:
        for row in rows:
            if row[c.POLL_KIND] == c.POLLED_UNFINISHED:  # nothing whole yet: all of it is the slot's carry
                assert row[c.POLL_FORWARDED] == 0 and setup.loop.filled[row[c.POLL_SLOT]] == row[c.POLL_BYTES]
                continue
            assert row[c.POLL_KIND] == c.POLLED_FORWARDED, row
            slot, at, forwarded = row[c.POLL_SLOT], row[c.POLL_AT], row[c.POLL_FORWARDED]
            piece = streams_[slot][taken[slot] : taken[slot] + forwarded]
            assert len(piece) == forwarded and row[c.POLL_START] == model.head
            assert model.space()[0] == at
            model.ring[at : at + forwarded] = np.frombuffer(piece, dtype=np.uint8)
            model.commit(forwarded, row[c.POLL_MESSAGES], 100 + slot)
            taken[slot] += forwarded
            batches.append(piece)
            assert row[c.POLL_SHORT] == 0 and row[c.POLL_ARRIVED] <= row[c.POLL_BEGAN] <= row[c.POLL_ENDED]
        return len(rows)

    while any(sent):
        for slot, pieces in enumerate(sent):  # one more send from each publisher, then the loop reads
            if pieces:
                setup.senders[slot].sendall(pieces.pop(0))
        consume(setup.run())
    while consume(setup.run()):  # what is still in the sockets
        pass
    assert log_facts(setup.log) == log_facts(model)
    for slot, (sizes, _) in enumerate(plan):
        assert taken[slot] == len(streams_[slot])  # whole messages only: every one was forwarded, nothing carried
        assert setup.loop.filled[slot] == 0
        assert setup.loop.counts[slot].tolist() == [
            len(sizes) if v == protocol.FORWARD else 0 for v in range(len(protocol.VERDICT_NAMES))
        ]
    for peer in setup.peers:
        assert drain(peer) == b"".join(batches)


@pytest.fixture
def setup(pairs: list) -> Setup:
    """One publisher (slot 0) and one subscriber, over a log of 8 reads."""
    return Setup(pairs, new_log(8 * RESERVE), 1, 1)


def test_a_stream_that_wraps_the_log_reaches_the_subscriber_whole(setup: Setup) -> None:
    stream = b"".join(message(n, 200 + n % 50) for n in range(400))  # about six times the log
    got = bytearray()
    for a in range(0, len(stream), 1000):  # reads of any length: messages are cut across them and the wrap
        setup.senders[0].sendall(stream[a : a + 1000])
        rows = setup.run()
        assert {row[c.POLL_KIND] for row in rows} <= {c.POLLED_FORWARDED, c.POLLED_UNFINISHED}
        got += drain(setup.peers[0])
    assert bytes(got) == stream and setup.log.head == len(stream) > 4 * setup.log.size
    assert setup.loop.counts[0, protocol.FORWARD] == 400 and setup.loop.filled[0] == 0


def test_a_read_that_is_not_all_forwarded_messages_stops_the_call_and_changes_nothing(setup: Setup) -> None:
    first = message(1, 40)
    setup.senders[0].sendall(first[:50])  # the start of a message: carried
    assert [row[c.POLL_KIND] for row in setup.run()] == [c.POLLED_UNFINISHED]
    before = (setup.log.head, setup.log.messages, setup.loop.counts[0].tolist())
    rest = first[50:] + protocol.publish_only_message() + message(2, 10)
    setup.senders[0].sendall(rest)
    (row,) = setup.run()
    assert row[c.POLL_KIND] == c.POLLED_NOT_TAKEN and row[c.POLL_GOT] == len(rest)
    at, n = row[c.POLL_AT], row[c.POLL_BYTES]
    assert setup.log.ring[at : at + n].tobytes() == first[:50] + rest  # the carry, then the read: for Python to take
    assert setup.loop.filled[0] == n
    assert (setup.log.head, setup.log.messages, setup.loop.counts[0].tolist()) == before
    assert drain(setup.peers[0]) == b""


@pytest.mark.parametrize("start", [b"\x00\x00\x00\x00", b"\x00"], ids=["bad-magic", "too-short-to-tell"])
def test_bytes_that_start_no_message_go_to_python_unless_too_short_to_judge(setup: Setup, start: bytes) -> None:
    setup.senders[0].sendall(start)
    (row,) = setup.run()
    kind = c.POLLED_UNFINISHED if len(start) < 4 else c.POLLED_NOT_TAKEN
    assert row[c.POLL_KIND] == kind and setup.loop.filled[0] == len(start)


def test_an_oversized_header_goes_to_python(pairs: list) -> None:
    log = new_log(8 * RESERVE)
    setup = Setup(pairs, log, 1, 1)
    header = bytearray(message(0, 10)[: protocol.HEADER_SIZE])
    header[protocol.OFF_PAYLOAD_SIZE : protocol.OFF_PAYLOAD_SIZE + 4] = (TABLES.max_payload + 1).to_bytes(4, "little")
    setup.senders[0].sendall(bytes(header))
    (row,) = setup.run()
    assert row[c.POLL_KIND] == c.POLLED_NOT_TAKEN


def test_a_close_stops_the_call_and_keeps_the_carry(setup: Setup) -> None:
    setup.senders[0].sendall(message(1, 40) + message(2, 40)[:10])
    setup.senders[0].close()
    rows = setup.run()
    assert [row[c.POLL_KIND] for row in rows] == [c.POLLED_FORWARDED, c.POLLED_CLOSED]
    assert setup.loop.filled[0] == 10 and drain(setup.peers[0]) == message(1, 40)


def head_near_the_end(log: RelayLog, left: int) -> None:
    """Fill the log's first lap with messages until exactly ``left`` bytes are left before the ring's end."""
    overhead = len(message(0, 0))  # a message of n payload bytes is this much longer
    while (rest := log.size - left - log.head) > 0:
        size = rest if rest <= 2 * overhead + 200 else overhead + 200  # the last one fills it exactly
        one = message(0, size - overhead)
        log.append(np.frombuffer(one, dtype=np.uint8), np.array([0, len(one)], dtype=np.int64), 1, len(one), 1, 7)


def test_near_the_rings_end_a_read_is_cut_to_what_is_left_and_the_head_wraps(pairs: list) -> None:
    """Less than a whole read before the mirror's end: the loop reads that much, runs on into the mirror, and the
    batch lands across the wrap; every byte reaches the subscriber once, in order, and the log ends as Python's."""
    log = new_log(4 * RESERVE, mirror=300)  # the relay's shape: a mirror shorter than a read, longer than a message
    model = new_log(4 * RESERVE, mirror=300)
    setup = Setup(pairs, log, 1, 1)
    for each in (log, model):
        head_near_the_end(each, RESERVE // 2)
    at = log.head % log.size
    assert log.size + log.mirror - at < RESERVE  # the zone where a whole read would not fit
    stream = b"".join(message(n, 90) for n in range(20))  # 2,440 bytes: more than is left, less than two reads
    setup.senders[0].sendall(stream)
    rows = setup.run()
    assert rows[0][c.POLL_KIND] == c.POLLED_FORWARDED and rows[0][c.POLL_GOT] == log.size + log.mirror - at
    assert all(row[c.POLL_KIND] in (c.POLLED_FORWARDED, c.POLLED_UNFINISHED) for row in rows)
    assert drain(setup.peers[0]) == stream and log.head == model.head + len(stream) and log.head > log.size
    model.append(
        np.frombuffer(stream, dtype=np.uint8), np.array([0, len(stream)], dtype=np.int64), 1, len(stream), 20, 0
    )
    assert b"".join(bytes(v) for v in log.views(model.tail, log.head)) == b"".join(
        bytes(v) for v in model.views(model.tail, model.head)
    )


def test_no_room_even_for_the_carry_reads_nothing(pairs: list) -> None:
    log = new_log(4 * RESERVE, mirror=100)  # a mirror shorter than a message: never so in the relay
    setup = Setup(pairs, log, 1, 1)
    head_near_the_end(log, 50)
    left = log.size + log.mirror - log.head % log.size
    unfinished = message(98, 400)[: left + 10]  # a carry longer than what is left
    setup.carries[0][: len(unfinished)] = np.frombuffer(unfinished, dtype=np.uint8)
    setup.loop.filled[0] = len(unfinished)
    whole = log.head
    setup.senders[0].sendall(message(99, 10))
    (row,) = setup.run()
    assert row[c.POLL_KIND] == c.POLLED_NO_ROOM and row[c.POLL_GOT] == 0 and log.head == whole
    assert setup.senders[0] is not None and drain(setup.peers[0]) == b""
    ours = pairs[0][0]
    assert ours.recv(100) == message(99, 10)  # still in the socket, for the event loop to read


def test_a_target_left_short_stops_the_call(pairs: list) -> None:
    setup = Setup(pairs, new_log(64 * RESERVE), 2, 1)
    peer_side = pairs[2][0]  # the subscriber's socket, on the relay's side
    peer_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    batch = b"".join(message(n, 250) for n in range(6))
    for sender in setup.senders:
        for _ in range(40):
            sender.sendall(batch)
    rows = setup.run()
    assert rows[-1][c.POLL_SHORT] == 1 and all(row[c.POLL_SHORT] == 0 for row in rows[:-1])
    assert len(rows) < 16  # it stopped there, with more ready


def test_a_carry_over_the_limit_stops_the_call(setup: Setup) -> None:
    setup.senders[0].sendall(message(1, 40) + message(2, 300)[:200])
    (row,) = setup.run(carry_limit=100)
    assert row[c.POLL_KIND] == c.POLLED_CARRY and row[c.POLL_FORWARDED] == len(message(1, 40))
    assert setup.loop.filled[0] == 200 and setup.carries[0][:200].tobytes() == message(2, 300)[:200]


def test_one_call_makes_at_most_its_report_rows_of_reads(pairs: list) -> None:
    setup = Setup(pairs, new_log(64 * RESERVE), 3, 1, reads=4)
    for sender in setup.senders:
        for n in range(10):
            sender.sendall(message(n, 500))
    made = []
    while rows := setup.run():
        assert len(rows) <= 4
        made.append(len(rows))
    assert made[0] == 4 and setup.log.messages == 30


def test_the_loop_refuses_slots_and_carries_that_do_not_fit(setup: Setup) -> None:
    counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
    with pytest.raises(ValueError, match="taken"):
        setup.loop.add(0, 99, 1, np.zeros(RESERVE, np.uint8), 0, counts)
    with pytest.raises(ValueError, match="whole read"):
        setup.loop.add(1, 99, 1, np.zeros(RESERVE - 1, np.uint8), 0, counts)
    with pytest.raises(OSError):
        setup.loop.add(1, 999_999, 1, np.zeros(RESERVE, np.uint8), 0, counts)
    with pytest.raises(ValueError, match="not watched"):
        setup.loop.remove(5)
    assert setup.loop.remove(0) == 0
