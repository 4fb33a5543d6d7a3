"""The compiled read path (``kernels.read_path``): scan, commit to the log and fan out in one call, on socket pairs.

Runs for every build of the loops (ahead of time, JIT, Python) with the other
kernel tests. The model is the Python log (``RelayLog.commit``) and the send
loop: for any sequence of reads, the compiled path leaves the log's state,
batch index and ring exactly as the Python log does, and every target's peer
receives exactly the batch's bytes. A read that is not all whole forwarded
messages changes nothing.
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.reference import selects
from support.streams import drain

from jitrelay import kernels
from jitrelay.core import protocol, shared_log
from jitrelay.core.domains import logic_for
from jitrelay.kernels import futex
from jitrelay.kernels.constants import CURSOR_BEHIND, LOG_KEEP
from jitrelay.kernels.read_path import ReadPath
from jitrelay.server.log import RelayLog

pytestmark = pytest.mark.kernels

TABLES = kernels.tables_for(logic_for("market_data"))
MIRROR = 256
NOTHING_SENT = -1  # no targets: a skipped descriptor the loop never meets


def message(n: int, size: int) -> bytes:
    return protocol.build_message(
        protocol.MARKET_DATA, [(1 + n % 4, bytes([n % 251]) * size)], sequence=n, timestamp_ns=n
    )


def new_log(size: int, reserve: int, batch_capacity: int | None = None) -> RelayLog:
    ring = np.zeros(size + MIRROR, dtype=np.uint8)  # two logs given the same reads hold the same bytes
    return RelayLog(size, MIRROR, batch_capacity=batch_capacity, ring=ring, reserve=reserve)


def path_for(log: RelayLog) -> ReadPath:
    return ReadPath(log.ring, TABLES, kernels.ScanBuffers(log.reserve), log.state, log.index)


def land(log: RelayLog, data: bytes) -> int:
    """Put a read where the relay's reads land: the free space at the head."""
    at, room = log.space()
    assert len(data) <= room
    log.ring[at : at + len(data)] = np.frombuffer(data, dtype=np.uint8)
    return at


def log_facts(log: RelayLog) -> tuple:
    live = slice(log._lo, log._hi)
    return (
        log.head, log.tail, log.messages, log.batches,
        log._starts[live].tolist(), log._origins[live].tolist(), log._first_message[live].tolist(),
        log.ring.tobytes(),
    )  # fmt: skip


def targets(fan: kernels.FanOut, made: list, n: int) -> list[socket.socket]:
    """``n`` socket pairs as the send loop's targets; their peers, to read what arrived."""
    fan.reserve(n, 2)
    peers = []
    for t in range(n):
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        made.append((ours, theirs))
        fan.fds[t] = ours.fileno()
        theirs.setblocking(False)
        peers.append(theirs)
    return peers


batches = st.lists(
    st.tuples(st.lists(st.integers(0, 90), min_size=1, max_size=6), st.integers(0, 40), st.integers(1, 9)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reads=batches, size=st.integers(1400, 3000), capacity=st.sampled_from([None, 3, 8]))
def test_the_compiled_path_commits_exactly_as_the_python_log(
    reads: list[tuple[list[int], int, int]], size: int, capacity: int | None
) -> None:
    """Reads of whole messages (and part of one after them), wrapping and evicting: the two logs stay equal."""
    reserve = 700  # the relay's receive buffer: a read is never more, and the log holds at least two
    model, compiled = new_log(size, reserve, capacity), new_log(size, reserve, capacity)
    path = path_for(compiled)
    header = np.zeros(shared_log.WORDS, dtype=np.int64)  # a mapped log's: each commit of the loop's is published
    path.publish_to(header)
    published = 0
    fan = kernels.FanOut()
    counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
    n = 0
    for sizes, partial, origin in reads:
        read = b"".join(message(n + k, s) for k, s in enumerate(sizes)) + message(n + len(sizes), 30)[:partial]
        read = read[:reserve]
        count, end, _ = kernels.frame(np.frombuffer(read, dtype=np.uint8))
        n += len(sizes) + 1
        if model.space()[1] < reserve:  # near the ring's end the relay reads into its own buffer: both logs append
            if count:
                runs = np.array([0, end], dtype=np.int64)
                for log in (model, compiled):
                    log.append(np.frombuffer(read, dtype=np.uint8), runs, 1, end, count, origin)
            assert log_facts(compiled) == log_facts(model)
            continue
        at_model, at = land(model, read), land(compiled, read)
        assert at_model == at
        status, messages, forwarded, start, short, _, _ = path.forward(
            at, at + len(read), counts, origin, fan, 0, NOTHING_SENT
        )
        if count == 0:
            assert status == kernels.READ_NOT_TAKEN
        else:
            if status != kernels.READ_FORWARDED:  # only a full batch index sends the relay the usual way
                assert compiled._hi == len(compiled._starts)
                start = compiled.commit(end, count, origin)
            else:
                assert (messages, forwarded, short) == (count, end, 0)
                published += 1
                assert shared_log.snapshot(header) == compiled.extent()
            assert model.commit(end, count, origin) == start
        assert log_facts(compiled) == log_facts(model)
        assert (header[shared_log.W_SEQUENCE], header[shared_log.W_WAKE]) == (2 * published, published)


def test_a_read_goes_out_to_every_target_but_its_sender_exactly(pairs: list) -> None:
    log = new_log(1 << 16, 1 << 12)
    path = path_for(log)
    fan = kernels.FanOut()
    peers = targets(fan, pairs, 4)
    counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
    whole = b"".join(message(k, 10 * k) for k in range(12))
    read = whole + message(12, 50)[:20]
    at = land(log, read)
    sender = int(fan.fds[2])
    status, messages, forwarded, start, short, began, ended = path.forward(
        at, at + len(read), counts, 7, fan, 4, sender
    )
    assert (status, messages, forwarded, start, short) == (kernels.READ_FORWARDED, 12, len(whole), 0, 0)
    assert 0 < began <= ended
    assert [drain(peer) for peer in peers] == [whole, whole, b"", whole]
    assert fan.sent[:4].tolist() == [len(whole), len(whole), kernels.SEND_SKIPPED, len(whole)]
    assert counts[protocol.FORWARD] == 12 and counts.sum() == 12
    assert (log.head, log.messages, log.batches, int(log._origins[0])) == (len(whole), 12, 1, 7)
    assert log.ring[at + len(whole) : at + len(read)].tobytes() == message(12, 50)[:20]  # left for the next read


def test_a_batch_across_the_wrap_goes_out_whole_and_lands_at_the_rings_start(pairs: list) -> None:
    size, reserve = 4096, 200
    log, model = new_log(size, reserve), new_log(size, reserve)
    path = path_for(log)
    fan = kernels.FanOut()
    peers = targets(fan, pairs, 2)
    counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
    for each in (log, model):  # two batches put the head 100 bytes before the ring's end
        for length in (2000, size - 100 - 2000):
            filler = np.frombuffer(message(0, length - protocol.HEADER_SIZE - 2), dtype=np.uint8)
            each.append(filler, np.array([0, length], dtype=np.int64), 1, length, 1, 1)
    read = b"".join(message(k, 28) for k in range(1, 4))  # 186 bytes: 86 of them run on into the mirror
    at = land(log, read)
    assert land(model, read) == at and at + len(read) > size
    status, _, forwarded, start, short, _, _ = path.forward(at, at + len(read), counts, 2, fan, 2, -1)
    assert (status, forwarded, short) == (kernels.READ_FORWARDED, len(read), 0)
    assert fan.iov_count[:2].tolist() == [2, 2]  # the end of the ring, then its start
    model.commit(len(read), 3, 2)
    assert log_facts(log) == log_facts(model)
    assert [drain(peer) for peer in peers] == [read, read]
    assert b"".join(v.tobytes() for v in log.views(start, start + len(read))) == read


@pytest.mark.parametrize(
    "read",
    [
        pytest.param(message(0, 10)[:20], id="only-part-of-a-message"),
        pytest.param(message(0, 10) + protocol.subscribe_message([1]), id="a-control-after-data"),
        pytest.param(message(0, 10) + b"\x00" * 40, id="a-fault-after-data"),
        pytest.param(protocol.build_message(protocol.SIGNAL, [(20, b"x")]), id="a-message-of-another-domain"),
    ],
)
def test_anything_but_whole_forwarded_messages_changes_nothing(read: bytes, pairs: list) -> None:
    log = new_log(1 << 16, 1 << 12)
    path = path_for(log)
    fan = kernels.FanOut()
    peers = targets(fan, pairs, 2)
    counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
    at = land(log, read)
    before = log_facts(log)
    status, *_ = path.forward(at, at + len(read), counts, 1, fan, 2, -1)
    assert status == kernels.READ_NOT_TAKEN
    assert log_facts(log) == before and not counts.any()
    assert [drain(peer) for peer in peers] == [b"", b""]


def test_a_target_that_takes_less_is_reported_short_and_the_others_get_everything(pairs: list) -> None:
    log = new_log(1 << 22, 1 << 20)
    path = path_for(log)
    fan = kernels.FanOut()
    peers = targets(fan, pairs, 2)
    pairs[0][0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)  # the first takes the whole batch
    pairs[1][0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the second a little only
    counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
    read = b"".join(message(k, 1000) for k in range(300))
    at = land(log, read)
    status, _, forwarded, _, short, _, _ = path.forward(at, at + len(read), counts, 1, fan, 2, -1)
    assert (status, forwarded, short) == (kernels.READ_FORWARDED, len(read), 1)
    got = drain(peers[1])
    assert int(fan.sent[1]) == len(got) < len(read) and got == read[: len(got)]
    assert int(fan.sent[0]) == len(read) and drain(peers[0]) == read


def test_the_read_path_refuses_arguments_that_would_reach_outside_its_arrays() -> None:
    log = new_log(1 << 16, 1 << 12)
    path = path_for(log)
    counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
    with pytest.raises(ValueError, match="not a range"):
        path.forward(0, len(log.ring) + 1, counts, 1, kernels.FanOut(), 0, -1)
    with pytest.raises(TypeError, match="counts"):
        path.forward(0, 10, counts.astype(np.int32), 1, kernels.FanOut(), 0, -1)
    with pytest.raises(ValueError, match="targets"):
        path.forward(0, 10, counts, 1, kernels.FanOut(targets=1), 5, -1)
    with pytest.raises(ValueError, match="ring"):
        ReadPath(np.zeros(10, dtype=np.uint8), TABLES, kernels.ScanBuffers(100), log.state, log.index)


def test_judged_then_sent_is_the_one_call_cut_in_two(pairs: list) -> None:
    """What a journaling relay does: judge, write the journal (here: nothing), then commit and send."""
    one, two = new_log(1 << 16, 1 << 12), new_log(1 << 16, 1 << 12)
    fan_one, fan_two = kernels.FanOut(), kernels.FanOut()
    peers_one, peers_two = targets(fan_one, pairs, 2), targets(fan_two, pairs, 2)
    counts_one, counts_two = (np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64) for _ in range(2))
    read = b"".join(message(k, 3 * k) for k in range(9)) + message(9, 5)[:7]
    at = land(one, read)
    assert land(two, read) == at
    whole = path_for(one).forward(at, at + len(read), counts_one, 4, fan_one, 2, -1)
    path = path_for(two)
    before = log_facts(two)
    judged = path.forward(at, at + len(read), counts_two, 4, fan_two, 2, -1, kernels.STAGE_JUDGE)
    assert judged[:3] == (kernels.READ_JUDGED, 9, len(read) - 7)
    assert log_facts(two) == before and not counts_two.any() and [drain(p) for p in peers_two] == [b"", b""]
    sent = path.forward(at, at + len(read), counts_two, 4, fan_two, 2, -1, kernels.STAGE_SEND, judged[1:3])
    assert sent[:5] == whole[:5] and sent[0] == kernels.READ_FORWARDED
    assert log_facts(two) == log_facts(one) and counts_two.tolist() == counts_one.tolist()
    assert [drain(p) for p in peers_two] == [drain(p) for p in peers_one] == [read[:-7]] * 2


def routed_message(n: int, types: list[int], source: int) -> bytes:
    return protocol.build_message(
        protocol.MARKET_DATA, [(t, bytes([n % 251]) * (3 + n % 17)) for t in types], source=source, sequence=n
    )


def route_for(
    filters: list[protocol.Filter], target_group: list[int], capacity: int, routed: kernels.RouteBuffers | None = None
) -> kernels.GroupRoute:
    tables = kernels.group_tables(filters) if filters else None
    routed = routed or kernels.RouteBuffers(capacity, 1)
    return kernels.GroupRoute(tables, routed, kernels.ScanBuffers(capacity), np.array(target_group, dtype=np.int64))


a_filter = st.tuples(
    st.none() | st.frozensets(st.integers(1, 8), min_size=1, max_size=4),
    st.none() | st.frozensets(st.integers(0, 5), min_size=1, max_size=4),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(st.tuples(st.lists(st.integers(1, 8), min_size=1, max_size=3), st.integers(0, 5)), max_size=40),
    filters=st.lists(a_filter, min_size=1, max_size=3),
    groups_of=st.lists(st.integers(-1, 2), min_size=1, max_size=4),
    before=st.integers(0, 6000),
    judged_first=st.booleans(),
)
def test_each_filtered_target_gets_exactly_its_groups_messages(
    shapes: list, filters: list[protocol.Filter], groups_of: list[int], before: int, judged_first: bool
) -> None:
    """Any messages, any filters, the batch anywhere in the ring (across its end too): each target's peer receives
    the messages its group selects, in order, whole; an unfiltered target all of them; the log as the Python log's."""
    target_group = [min(g, len(filters) - 1) for g in groups_of]
    size, reserve = 4096, 1024
    log, model = new_log(size, reserve), new_log(size, reserve)
    for each in (log, model):  # the head anywhere in the ring: up to two batches before the read
        for length in (min(before, size - reserve), before - min(before, size - reserve)):
            if length >= protocol.HEADER_SIZE + 2:
                filler = np.frombuffer(message(0, length - protocol.HEADER_SIZE - 2), dtype=np.uint8)
                each.append(filler, np.array([0, length], dtype=np.int64), 1, length, 1, 1)
    messages = [routed_message(n, types, source) for n, (types, source) in enumerate(shapes)]
    read = b"".join(messages)[: log.space()[1]]
    whole, used = [], 0
    for m in messages:
        if used + len(m) > len(read):
            break
        whole.append(m)
        used += len(m)
    made: list = []
    try:
        fan = kernels.FanOut()
        peers = targets(fan, made, len(target_group))
        route = route_for(filters, target_group, reserve)
        counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
        at = land(log, read)
        assert land(model, read) == at
        path = path_for(log)
        call = (at, at + len(read), counts, 3, fan, len(target_group), -1)
        if judged_first:
            status, messages_, forwarded, start, short, _, _ = path.forward(*call, kernels.STAGE_JUDGE, route=route)
            if status == kernels.READ_JUDGED:  # the send stage goes on from a read judged whole, as the relay does
                judged = (messages_, forwarded)
                status, messages_, forwarded, start, short, _, _ = path.forward(
                    *call, kernels.STAGE_SEND, judged, route
                )
        else:
            status, messages_, forwarded, start, short, _, _ = path.forward(*call, route=route)
        if not whole:
            assert status == kernels.READ_NOT_TAKEN and [drain(p) for p in peers] == [b""] * len(peers)
            return
        assert (status, messages_, forwarded, short) == (kernels.READ_FORWARDED, len(whole), used, 0)
        model.commit(used, len(whole), 3)
        assert log_facts(log) == log_facts(model)
        wanted = [b"".join(m for m in whole if g < 0 or selects(filters[g], m)) for g in target_group]
        assert [drain(p) for p in peers] == wanted
        assert route.due(len(target_group), used).tolist() == [len(w) for w in wanted]
    finally:
        for pair in made:
            for sock in pair:
                sock.close()


def test_a_read_whose_groups_runs_do_not_fit_is_not_taken_until_they_do(pairs: list) -> None:
    """Every other message to the one group: more runs than a small route holds. Nothing changes; grown, it goes."""
    log = new_log(1 << 16, 1 << 12)
    fan = kernels.FanOut()
    peers = targets(fan, pairs, 2)
    counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
    messages = [routed_message(n, [1 + n % 2], 0) for n in range(40)]
    read = b"".join(messages)
    at = land(log, read)
    small = kernels.RouteBuffers(1 << 12, 1)
    small.runs = np.zeros(8, dtype=np.int64)  # four runs; the group has twenty
    route = route_for([(frozenset({1}), None)], [0, -1], 1 << 12, small)
    before = log_facts(log)
    status, *_ = path_for(log).forward(at, at + len(read), counts, 1, fan, 2, -1, route=route)
    assert status == kernels.READ_NOT_TAKEN and log_facts(log) == before and not counts.any()
    assert [drain(p) for p in peers] == [b"", b""]
    route = route_for([(frozenset({1}), None)], [0, -1], 1 << 12)
    status, messages_, *_ = path_for(log).forward(at, at + len(read), counts, 1, fan, 2, -1, route=route)
    assert (status, messages_) == (kernels.READ_FORWARDED, 40)
    odd = b"".join(messages[0::2])
    assert [drain(p) for p in peers] == [odd, read]
    assert route.due(2, len(read)).tolist() == [len(odd), len(read)]


def test_a_route_is_checked_against_its_groups_and_targets() -> None:
    with pytest.raises(ValueError, match="target groups"):
        route_for([(frozenset({1}), None)], [0, 1], 1 << 12)
    with pytest.raises(ValueError, match="target groups"):
        route_for([], [0], 1 << 12)
    log = new_log(1 << 16, 1 << 12)
    counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
    route = route_for([(frozenset({1}), None)], [0], 1 << 12)
    with pytest.raises(ValueError, match="fewer than 2 targets"):
        path_for(log).forward(0, 10, counts, 1, kernels.FanOut(), 2, -1, route=route)


def test_a_read_that_would_evict_what_a_cursor_still_needs_is_not_taken(pairs: list) -> None:
    """``LOG_KEEP``: the oldest offset a cursor behind needs. A commit that would evict it is left to the relay."""
    size, reserve = 4096, 1024
    log = new_log(size, reserve)
    for length in (1500, 1500):  # two batches: the next read of 1,000 bytes evicts the first
        filler = np.frombuffer(message(0, length - protocol.HEADER_SIZE - 2), dtype=np.uint8)
        log.append(filler, np.array([0, length], dtype=np.int64), 1, length, 1, 1)
    fan = kernels.FanOut()
    peers = targets(fan, pairs, 1)
    counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
    read = b"".join(message(k, 66) for k in range(10))
    at = land(log, read)
    assert log.tail_after(len(read)) == 1500
    log.state[LOG_KEEP] = 1499  # a cursor still needs the last byte of the first batch
    before = log_facts(log)
    status, *_ = path_for(log).forward(at, at + len(read), counts, 1, fan, 1, -1)
    assert status == kernels.READ_NOT_TAKEN and log_facts(log) == before and not counts.any()
    assert drain(peers[0]) == b""
    log.state[LOG_KEEP] = 1500  # it has read the first batch
    status, *_ = path_for(log).forward(at, at + len(read), counts, 1, fan, 1, -1)
    assert status == kernels.READ_FORWARDED and log.tail == 1500 and drain(peers[0]) == read


@pytest.mark.parametrize(
    ("mode", "group", "position", "taken"),
    [
        (CURSOR_BEHIND, -1, 1499, False),  # an unfiltered cursor behind still needs the first batch's last byte
        (CURSOR_BEHIND, -1, 1500, True),  # it has read the first batch
        (CURSOR_BEHIND, 0, 0, True),  # a filtered one: its owed ranges are the relay's to keep (``LOG_KEEP``)
        (CURSOR_BEHIND - 1, -1, 0, True),  # a cursor keeping up holds nothing in the log
        (CURSOR_BEHIND + 1, -1, 0, True),  # nor does one replaying the journal
    ],
)
def test_the_read_loop_keeps_what_an_unfiltered_cursor_behind_in_the_table_has_not_read(
    pairs: list, mode: int, group: int, position: int, taken: bool
) -> None:
    """The cursor table's arrays, read by the loop itself: the same rule as ``LOG_KEEP`` for the cursors it covers."""
    size, reserve = 4096, 1024
    log = new_log(size, reserve)
    for length in (1500, 1500):
        filler = np.frombuffer(message(0, length - protocol.HEADER_SIZE - 2), dtype=np.uint8)
        log.append(filler, np.array([0, length], dtype=np.int64), 1, length, 1, 1)
    path = path_for(log)
    modes = np.zeros(8, dtype=np.int8)  # slot 5 is the cursor; the others are free
    positions, groups = np.zeros(8, dtype=np.int64), np.full(8, -1, dtype=np.int64)
    modes[5], groups[5], positions[5] = mode, group, position
    counts = np.bincount(modes, minlength=8).astype(np.int64)
    path.watch_cursors(modes, positions, groups, counts)
    fan = kernels.FanOut()
    peers = targets(fan, pairs, 1)
    counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
    read = b"".join(message(k, 66) for k in range(10))
    at = land(log, read)
    before = log_facts(log)
    status, *_ = path.forward(at, at + len(read), counts, 1, fan, 1, -1)
    if taken:
        assert status == kernels.READ_FORWARDED and log.tail == 1500 and drain(peers[0]) == read
    else:
        assert status == kernels.READ_NOT_TAKEN and log_facts(log) == before and drain(peers[0]) == b""


def test_the_cursor_tables_arrays_are_checked_once_when_bound() -> None:
    path = path_for(new_log(1 << 12, 1 << 10))
    ints = np.zeros(4, dtype=np.int64)
    with pytest.raises(TypeError):
        path.watch_cursors(ints, ints, ints, ints)
    with pytest.raises(ValueError, match="differ in length"):
        path.watch_cursors(np.zeros(4, dtype=np.int8), np.zeros(3, dtype=np.int64), ints, ints)
    with pytest.raises(ValueError, match="every mode"):
        path.watch_cursors(np.zeros(4, dtype=np.int8), ints, ints, np.zeros(CURSOR_BEHIND, dtype=np.int64))


def test_a_committed_read_is_published_to_the_mapped_log_and_wakes_its_sleeping_readers(pairs: list) -> None:
    """The header gets the log's new extent, then one futex wake reaches every reader asleep on its word."""
    log = new_log(1 << 16, 1 << 12)
    path = path_for(log)
    header = np.zeros(shared_log.WORDS, dtype=np.int64)
    header[shared_log.W_WAKE] = 0xFFFFFFFF  # the word wraps at 32 bits, as the Python side's does
    path.publish_to(header)
    fan = kernels.FanOut()
    peers = targets(fan, pairs, 1)
    word = header.ctypes.data + 8 * shared_log.W_WAKE
    woken: list[bool] = []
    sleepers = [threading.Thread(target=lambda: woken.append(futex.Waiter(word)(0xFFFFFFFF, 30.0))) for _ in range(3)]
    for sleeper in sleepers:
        sleeper.start()
    time.sleep(0.2)  # asleep on the word, or about to find it moved: either way they return
    read = b"".join(message(k, 40) for k in range(5))
    at = land(log, read)
    status, *_ = path.forward(at, at + len(read), np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64), 3, fan, 1, -1)
    assert status == kernels.READ_FORWARDED
    for sleeper in sleepers:
        sleeper.join(10)
    assert woken == [True, True, True]
    assert shared_log.snapshot(header) == shared_log.Snapshot(len(read), 5, 0, 0)
    assert header[shared_log.W_WAKE] == 0
    assert drain(peers[0]) == read

    path.publish_to(None)  # no reader maps the log any more: the header stays as it was
    again = message(5, 40)
    at = land(log, again)
    path.forward(at, at + len(again), np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64), 3, fan, 1, -1)
    assert shared_log.snapshot(header).head == len(read) and log.head == len(read) + len(again)


def test_only_a_writable_header_of_the_mapped_log_is_published_to() -> None:
    path = path_for(new_log(1 << 12, 1 << 10))
    with pytest.raises(ValueError, match="too short"):
        path.publish_to(np.zeros(shared_log.W_WAKE, dtype=np.int64))
    read_only = np.zeros(shared_log.WORDS, dtype=np.int64)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        path.publish_to(read_only)
    with pytest.raises(TypeError):
        path.publish_to(np.zeros(shared_log.WORDS, dtype=np.int32))
