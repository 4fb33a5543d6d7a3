"""Shared-memory subscribers on real relays: the mapped log gives the same stream as the socket, or says why not.

A subscriber that asks for shared memory is caught up over its socket, then
reads the relay's log from a memory file the relay hands it. For the same
publishes it must receive what a socket subscriber receives, byte for byte,
filtered or not. A reader the log overwrites never returns a torn or
overwritten message: it is cut off (counted once) or, with positions, told
of the exact gap. Under ``block`` a stopped reader holds the publishers back
and nothing is lost. Nothing of the memory outlives the processes, however
they die, and a refused peer never maps it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import reference as ref
from support import strategies as gen
from support.clients import Clients, NumberedStream, Reader, StreamCheck, publish_while_stopped, sync
from support.mapped import MappedReaderProcess, drain, memfd_descriptors, memfd_mappings, receive, shm_entries
from support.peers import MARK, Peer, is_marker, marker, publish_all, settle
from support.relays import RelayProcess, StartRelay

from jitrelay.client import AsyncSubscriber, RelayConnectionError, Subscriber
from jitrelay.core import protocol as p
from jitrelay.core.domains import stats_socket_path
from jitrelay.core.units import MiB
from jitrelay.tools.stats import Reading, parse_reading, read_socket

GRANTED = "reads the log from shared memory"
LOG = 8 * MiB  # the smallest log a relay keeps: twice its read buffer


# --- the same stream as the socket ---------------------------------------------------------

TYPES = {"market_data": (1, 4), "signal": (20, 23)}


@pytest.fixture(params=["market_data", "signal"])
def any_relay(request: pytest.FixtureRequest, start_relay: StartRelay) -> RelayProcess:
    """A relay of each domain that forwards to subscribers (one per test, shared by its hypothesis examples)."""
    return start_relay(request.param)


@st.composite
def streams(draw: st.DrawFn, domain: str) -> list[bytes]:
    """Messages of every verdict kind, and many a filter selects: types and sources from small sets."""
    spec = ref.DOMAINS[domain]
    lo, hi = TYPES[domain]
    selectable = st.builds(
        lambda records, source: ref.message(spec.ident, b"".join(records), source=source),
        st.lists(st.builds(ref.standard_record, st.integers(lo, hi), st.binary(max_size=6)), max_size=3),
        st.integers(0, 3),
    )
    kinds = st.sampled_from(gen.KINDS).flatmap(lambda kind: gen.judged_message(spec, kind))
    messages = draw(st.lists(st.one_of(selectable, kinds, gen.any_message(spec)), max_size=60))
    return [m for m in messages if not is_marker(m)]


def filters(domain: str) -> st.SearchStrategy[tuple[set[int] | None, set[int] | None]]:
    lo, hi = TYPES[domain]
    return st.tuples(
        st.none() | st.sets(st.integers(lo - 1, hi + 1), max_size=3),
        st.none() | st.sets(st.integers(0, 4), max_size=3),
    ).filter(lambda chosen: chosen != (None, None))


_rounds = iter(range(1, 1 << 30))


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data(), rng=st.randoms(use_true_random=False))
def test_a_mapped_subscriber_receives_what_a_socket_subscriber_does(
    any_relay: RelayProcess, data: st.DataObject, rng: random.Random
) -> None:
    relay, domain = any_relay, any_relay.domain
    spec = ref.DOMAINS[domain]
    stream = data.draw(streams(domain), label="stream")
    chosen = [(None, None), *data.draw(st.lists(filters(domain), max_size=2), label="filters")]
    sent = b"".join(stream)
    judged, _, _ = ref.reference_scan(sent, spec.ident, spec.max_payload, spec.checksum, spec.ranges)
    forwarded = [sent[o : o + n] for o, n, v in judged if v == p.FORWARD]

    round_ = next(_rounds)
    witness = Peer(relay)
    peers = [Peer(relay) for _ in chosen]
    mapped: list[Subscriber] = []
    try:
        controls = [b"" if f == (None, None) else p.subscribe_message(*f) for f in chosen]
        settle(witness, peers, controls, 2 * round_, spec.ident)
        # Each blocks until the relay has handed it the log: from then on it reads every append.
        mapped = [Subscriber(domain, relay.socket_path, shared_memory=True, tlv_types=t, sources=s) for t, s in chosen]
        publish_all(relay, sent, rng)
        got_mapped = [drain(sub) for sub in mapped]  # the log holds the whole stream once publish_all returns
        settle(witness, peers, [p.unsubscribe_message()] * len(peers), 2 * round_ + 1, spec.ident)
        fence = marker(round_, flags=MARK + 1, domain=spec.ident)
        witness.send(fence)
        for k, (peer, selection, got) in enumerate(zip(peers, chosen, got_mapped, strict=True)):
            wanted = (
                None if selection[0] is None else frozenset(selection[0]),
                None if selection[1] is None else frozenset(selection[1]),
            )
            on_socket = peer.wait_for(fence)
            assert on_socket == [m for m in forwarded if ref.selects(wanted, m)], f"socket subscriber {k}"
            assert got == b"".join(on_socket), f"mapped subscriber {k} ({p.describe_filter(wanted)}) differs"
    finally:
        for sub in mapped:
            sub.close()
        witness.close()
        for peer in peers:
            peer.close()


def test_an_async_mapped_subscriber_receives_what_a_socket_subscriber_does(start_relay: StartRelay) -> None:
    relay = start_relay("market_data")
    rng = random.Random(7)
    stream = [
        ref.message(1, ref.standard_record(1 + i % 4, rng.randbytes(i % 40)), source=i % 3, sequence=i)
        for i in range(5000)
    ]
    witness, peer = Peer(relay), Peer(relay)
    settle(witness, [peer], [b""], 1, 1)

    async def run() -> tuple[bytes, bytes]:
        async with (
            AsyncSubscriber("market_data", relay.socket_path, shared_memory=True) as every,
            AsyncSubscriber(
                "market_data", relay.socket_path, shared_memory=True, tlv_types=[2, 3], sources=[1]
            ) as some,
        ):
            await asyncio.get_running_loop().run_in_executor(None, publish_all, relay, b"".join(stream), rng)
            got_every, views = bytearray(), bytearray()
            while (batch := await every.recv_batch(timeout=0)) is not None:
                got_every += batch.tobytes()
            async for view in some:  # iteration, as the blocking subscriber's
                views += view.raw
                if len(views) >= len(wanted_some):
                    break
            while (batch := await some.recv_batch(timeout=0)) is not None:  # nothing more than that
                views += batch.tobytes()
            return bytes(got_every), bytes(views)

    wanted_some = b"".join(m for m in stream if ref.selects((frozenset({2, 3}), frozenset({1})), m))
    try:
        got_every, got_some = asyncio.run(run())
        fence = marker(2, flags=MARK + 1, domain=1)
        witness.send(fence)
        on_socket = b"".join(peer.wait_for(fence))
    finally:
        witness.close()
        peer.close()
    assert on_socket == b"".join(stream)
    assert got_every == on_socket
    assert got_some == wanted_some


# --- a reader the log overwrites -------------------------------------------------------------


def numbered(domain_id: int, chunks: int) -> NumberedStream:
    """About ``chunks`` x 70 KiB of equal messages numbered from 0."""
    if domain_id == p.EXECUTION:
        return NumberedStream(domain_id, [(40, b"x" * 400)], chunk_messages=160, chunks=chunks)
    return NumberedStream(domain_id, [(1, b"q" * 37)], chunk_messages=1024, chunks=chunks)


def wait_received(reader: MappedReaderProcess, nbytes: int, timeout: float = 30.0) -> None:
    """Until the reader process has written ``nbytes`` to its file (it writes as it reads)."""
    deadline = time.monotonic() + timeout
    while len(reader.received()) < nbytes:
        assert reader.proc.poll() is None, "the mapped reader ended early"
        assert time.monotonic() < deadline, f"the mapped reader did not receive {nbytes} bytes"
        time.sleep(0.02)


def stall_while_publishing(
    relay: RelayProcess, clients: Clients, stream: NumberedStream, reader: MappedReaderProcess
) -> None:
    """The reader reads the first chunk, is stopped while the rest (many times the log) is published, then goes on."""
    publisher = clients.connect(relay)
    publisher.settimeout(60)
    publisher.sendall(stream.chunk(0))
    wait_received(reader, stream.chunk_size)
    os.kill(reader.pid, signal.SIGSTOP)
    try:
        for i in range(1, stream.chunks):
            publisher.sendall(stream.chunk(i))
        publisher.shutdown(socket.SHUT_WR)
        while publisher.recv(1 << 16):  # the relay has appended everything
            pass
    finally:
        os.kill(reader.pid, signal.SIGCONT)


def test_a_lapped_mapped_reader_is_cut_off_once_and_never_returns_an_overwritten_message(
    start_relay: StartRelay, clients: Clients, short_dir: Path
) -> None:
    summary = short_dir / "figures.json"
    relay = start_relay("market_data", "--log-size", str(LOG), "--summary-file", str(summary))
    stream = numbered(p.MARKET_DATA, 400)  # ~28 MiB: more than three times the log
    reader = MappedReaderProcess("market_data", relay.socket_path, short_dir)
    reader.wait_granted()
    relay.wait_line(GRANTED, f"pid={reader.pid}")
    stall_while_publishing(relay, clients, stream, reader)
    assert reader.wait_exit() == 0
    assert reader.summary()["ended"] == "eof"  # the iteration ended: cut off, as a slow socket subscriber is
    line = relay.wait_line("disconnecting slow subscriber", f"pid={reader.pid}", "lapped in shared memory")
    assert f"log {LOG}" in line, line
    got = reader.received()
    assert stream.chunk_size <= len(got) < stream.total
    assert got == stream.prefix(len(got)), "the cut-off reader's bytes are not an exact prefix of the stream"
    relay.kill()
    figures = json.loads(summary.read_text())
    assert figures["slow_actions"] == {"hold": 0, "disconnect": 1, "gap_notice": 0}
    assert figures["slow_disconnected_pids"] == [reader.pid]
    assert figures["log_size"] == LOG


def publish_paced(relay: RelayProcess, clients: Clients, stream: NumberedStream, pause: float) -> None:
    """A chunk, then a pause: a publisher that outruns a slow reader for a while rather than at once."""
    publisher = clients.connect(relay)
    publisher.settimeout(60)
    for i in range(stream.chunks):
        publisher.sendall(stream.chunk(i))
        time.sleep(pause)
    publisher.close()


@pytest.mark.parametrize("slowed", ["stopped", "paced"])
def test_a_lapped_positioned_mapped_reader_hears_of_exact_gaps_and_reads_on(
    start_relay: StartRelay, clients: Clients, short_dir: Path, slowed: str
) -> None:
    summary = short_dir / "figures.json"
    relay = start_relay("market_data", "--log-size", str(LOG), "--summary-file", str(summary))
    stream = numbered(p.MARKET_DATA, 400)
    total = stream.chunks * stream.chunk_messages
    pace = {"stopped": 0, "paced": 20}[slowed]
    reader = MappedReaderProcess("market_data", relay.socket_path, short_dir, positions=True, last=total - 1, pace=pace)
    reader.wait_granted()
    relay.wait_line(GRANTED, f"pid={reader.pid}")
    if slowed == "stopped":
        stall_while_publishing(relay, clients, stream, reader)
    else:  # lapped again and again, reading from the tail as the log overwrites it: copies race the writes
        publish_paced(relay, clients, stream, 0.005)
    assert reader.wait_exit() == 0
    result = reader.summary()
    assert result["ended"] == "last", result
    gaps = [p.Gap(*gap) for gap in result["gaps"]]
    assert gaps and all(gap.reason == p.GAP_LEFT_LOG for gap in gaps)
    relay.wait_line("fell out of the log in shared memory", f"pid={reader.pid}")
    got = reader.messages()
    sequences = [int.from_bytes(m[8:16], "little") for m in got]
    whole = stream.prefix(stream.total)
    size = stream.message_size
    assert all(m == whole[s * size : (s + 1) * size] for m, s in zip(got, sequences, strict=True)), "a torn message"
    assert sequences == sorted(set(sequences)), "reordered or doubled"
    assert len(got) + sum(gap.messages for gap in gaps) == total, "a loss the gaps do not account for"
    assert sum(len(m) for m in got) + sum(gap.bytes for gap in gaps) == stream.total
    assert p.Position.parse(result["position"]).offset == stream.total
    relay.kill()
    figures = json.loads(summary.read_text())
    assert figures["slow_actions"] == {"hold": 0, "disconnect": 0, "gap_notice": len(gaps)}


# --- processes that die -----------------------------------------------------------------------


def test_a_killed_mapped_subscriber_leaves_nothing_behind_and_the_others_go_on(
    start_relay: StartRelay, short_dir: Path
) -> None:
    shm_before = shm_entries()
    relay = start_relay("market_data")
    relay_fds = sorted(os.listdir(f"/proc/{relay.pid}/fd"))
    relay_memory = memfd_descriptors(relay.pid)  # the log, its read-only twin, the slots (and the mappings' own)
    victim = MappedReaderProcess("market_data", relay.socket_path, short_dir)
    victim.wait_granted()
    relay.wait_line(GRANTED, f"pid={victim.pid}")
    assert any("memfd:jitrelay-log" in line for line in memfd_mappings(victim.pid))
    victim.proc.send_signal(signal.SIGKILL)
    victim.wait_exit()
    relay.wait_line("disconnected", f"pid={victim.pid}")
    assert sorted(os.listdir(f"/proc/{relay.pid}/fd")) == relay_fds
    assert memfd_descriptors(relay.pid) == relay_memory

    stream = numbered(p.MARKET_DATA, 30)
    witness, peer = Peer(relay), Peer(relay)
    settle(witness, [peer], [b""], 1, p.MARKET_DATA)
    try:
        with Subscriber("market_data", relay.socket_path, shared_memory=True) as other:
            publish_all(relay, stream.prefix(stream.total), random.Random(3))
            assert drain(other) == stream.prefix(stream.total)
        fence = marker(1, flags=MARK + 1, domain=p.MARKET_DATA)
        witness.send(fence)
        assert b"".join(peer.wait_for(fence)) == stream.prefix(stream.total)
    finally:
        witness.close()
        peer.close()
    relay.kill()
    assert shm_entries() == shm_before


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_without_reconnecting_a_mapped_subscriber_drains_the_log_then_ends_when_the_relay_goes(
    start_relay: StartRelay, how: signal.Signals
) -> None:
    shm_before = shm_entries()
    relay = start_relay("market_data")
    stream = numbered(p.MARKET_DATA, 20)
    mapped = memfd_mappings()
    with Subscriber("market_data", relay.socket_path, shared_memory=True, reconnect=False) as sub:
        assert len(memfd_mappings()) == len(mapped) + 2  # the log and the reader slots
        publish_all(relay, stream.prefix(stream.total), random.Random(5))
        relay.proc.send_signal(how)
        relay.proc.wait(10)
        got = b"".join(batch.tobytes() for batch in sub.batches())  # ends at EOF
        with pytest.raises(EOFError):
            sub.recv_batch(timeout=1.0)
    assert got == stream.prefix(stream.total)
    assert shm_entries() == shm_before
    assert memfd_mappings() == mapped, "the closed subscriber still maps the relay's memory"


# --- who may map the log ----------------------------------------------------------------------


def test_a_refused_peer_never_maps_the_log(start_relay: StartRelay) -> None:
    relay = start_relay("market_data", "--allow-uid", "65534")  # nobody: not this test's uid
    assert os.getuid() != 65534
    mapped, descriptors = memfd_mappings(), memfd_descriptors()
    with pytest.raises(RelayConnectionError):
        Subscriber("market_data", relay.socket_path, shared_memory=True)
    line = relay.wait_line("refusing", f"pid={os.getpid()}")
    assert "not allowed" in line, line
    assert memfd_mappings() == mapped, "the refused subscriber mapped the relay's memory"
    assert not [line for line in memfd_mappings() if "memfd:jitrelay-log" in line and line not in mapped]
    assert memfd_descriptors() == descriptors, "the refused subscriber was passed the relay's memory"
    assert relay.find_line(GRANTED) is None


# --- block --------------------------------------------------------------------------------------


def beside_a_mapped_reader(
    relay: RelayProcess, clients: Clients, short_dir: Path, stream: NumberedStream, **options: object
) -> tuple[MappedReaderProcess, StreamCheck, Reader, socket.socket]:
    """An execution relay's mapped reader, granted; a socket reader checking ``stream``; a publisher, in step."""
    mapped = MappedReaderProcess("execution", relay.socket_path, short_dir, **options)
    mapped.wait_granted()
    relay.wait_line(GRANTED, f"pid={mapped.pid}")
    check = StreamCheck(stream)
    other = clients.reader(relay, sink=check)
    publisher = clients.connect(relay)
    sync(publisher, [other], p.EXECUTION)
    return mapped, check, other, publisher


def test_under_block_a_stopped_mapped_reader_holds_the_publisher_and_nobody_loses_anything(
    start_relay: StartRelay, clients: Clients, short_dir: Path
) -> None:
    summary = short_dir / "figures.json"
    relay = start_relay("execution", "--log-size", str(LOG), "--summary-file", str(summary))
    stream = numbered(p.EXECUTION, 350)  # ~24 MiB of 435-byte messages: three times the log
    total = stream.chunks * stream.chunk_messages
    stopped, check, other, publisher = beside_a_mapped_reader(relay, clients, short_dir, stream, last=total - 1)
    publish_while_stopped(relay, publisher, stream, stopped.pid, other)
    assert check.mismatch is None and check.offset == stream.total, check.verdict()
    assert stopped.wait_exit() == 0
    result = stopped.summary()
    assert (result["ended"], result["gaps"]) == ("last", []), result
    assert b"".join(stopped.messages()) == stream.prefix(stream.total)
    publisher.close()
    relay.kill()
    figures = json.loads(summary.read_text())
    assert figures["slow_actions"]["hold"] > 0
    assert figures["slow_actions"]["disconnect"] == 0 and figures["slow_actions"]["gap_notice"] == 0
    assert relay.find_line("disconnecting slow subscriber") is None
    assert figures["reads_polled"] > 0  # the relay's own reads went on beside the mapped reader, which they woke


# --- resume -------------------------------------------------------------------------------------


def take_messages(sub: Subscriber, count: int) -> bytes:
    """The next ``count`` messages, iterating: ``position`` moves past each as it is handed out."""
    got = bytearray()
    for n, view in enumerate(sub, 1):
        got += view.raw
        if n == count:
            return bytes(got)
    raise AssertionError("the stream ended early")


@pytest.mark.parametrize("reading", ["batches", "messages"])
def test_a_mapped_subscriber_resumes_from_its_position_with_exactly_the_rest(
    start_relay: StartRelay, reading: str
) -> None:
    relay = start_relay("market_data")
    stream = numbered(p.MARKET_DATA, 64)  # ~4.4 MiB, all of it kept in the log
    whole = stream.prefix(stream.total)
    with Subscriber("market_data", relay.socket_path, shared_memory=True, positions=True) as first:
        publish_all(relay, whole, random.Random(11))
        # Iterating, it stops between two messages of a batch.
        half = stream.total // 2
        got = receive(first, half) if reading == "batches" else take_messages(first, half // stream.message_size + 7)
        position = first.position
    assert position is not None and len(got) < stream.total
    assert (position.offset, position.message) == (len(got), len(got) // stream.message_size)
    mark = len(relay.lines)
    with Subscriber("market_data", relay.socket_path, shared_memory=True, resume_from=position) as second:
        relay.wait_line(GRANTED, start=mark)
        rest = receive(second, stream.total - len(got))
        assert drain(second) == b""  # nothing after the end, nothing twice
        assert second.gaps == []
        end = second.position
    assert got + rest == whole, "lost, doubled or changed bytes"
    assert end == p.Position(position.epoch, stream.total, stream.total // stream.message_size)


def test_a_mapped_subscriber_resuming_far_back_is_caught_up_over_its_socket_first(
    start_relay: StartRelay, clients: Clients
) -> None:
    relay = start_relay("market_data")
    with Subscriber("market_data", relay.socket_path, positions=True) as first:
        first.recv_batch(timeout=0.2)  # nothing yet: the relay's first notice says where the stream starts
        start = first.position
    assert start is not None
    stream = numbered(p.MARKET_DATA, 340)  # ~24 MiB, all in the log
    publish_all(relay, stream.prefix(stream.total), random.Random(13))
    with Subscriber("market_data", relay.socket_path, shared_memory=True, resume_from=start) as sub:
        line = relay.wait_line(GRANTED)
        assert line.endswith(f"from offset {start.offset + stream.total}"), line  # all of it came on the socket
        got = receive(sub, stream.total)
        assert drain(sub) == b"" and sub.gaps == []
        assert sub.position == p.Position(start.epoch, start.offset + stream.total, start.message + 340 * 1024)
    assert got == stream.prefix(stream.total)


# --- what the relay's figures say of mapped readers ---------------------------------------------


def stats(relay: RelayProcess) -> Reading:
    return parse_reading(read_socket(stats_socket_path(relay.socket_path)), relay.domain, time.time())


def test_the_lag_figures_count_a_mapped_reader_by_its_slot(start_relay: StartRelay) -> None:
    relay = start_relay("market_data")
    stream = numbered(p.MARKET_DATA, 10)
    with Subscriber("market_data", relay.socket_path, shared_memory=True) as sub:
        peer = relay.wait_line(GRANTED).split("jitrelay.relay: ")[1].split(" reads the log")[0]
        publish_all(relay, stream.prefix(stream.total), random.Random(17))
        behind = stats(relay)
        assert behind.value("jitrelay_subscriber_lag_bytes", peer=peer) == stream.total
        assert behind.value("jitrelay_subscriber_lag_messages", peer=peer) == 10 * 1024
        assert behind.value("jitrelay_subscriber_pending_bytes_max") == stream.total
        assert drain(sub) == stream.prefix(stream.total)  # its slot says so as it reads
        caught_up = stats(relay)
        assert caught_up.value("jitrelay_subscriber_lag_bytes", peer=peer) == 0
        assert caught_up.value("jitrelay_subscriber_pending_bytes_max") == 0


def test_under_block_killing_the_mapped_reader_that_holds_the_publisher_lets_it_go_on(
    start_relay: StartRelay, clients: Clients, short_dir: Path
) -> None:
    relay = start_relay("execution", "--log-size", str(LOG))
    stream = numbered(p.EXECUTION, 350)
    stopped, check, other, publisher = beside_a_mapped_reader(relay, clients, short_dir, stream)
    os.kill(stopped.pid, signal.SIGSTOP)
    publisher.settimeout(60)
    thread = threading.Thread(target=lambda: [publisher.sendall(stream.chunk(i)) for i in range(stream.chunks)])
    thread.start()
    relay.wait_line("the log is full up to the slowest subscriber", "holding", timeout=30)
    assert thread.is_alive() and other.received < stream.total
    stopped.proc.send_signal(signal.SIGKILL)
    stopped.wait_exit()
    relay.wait_line("disconnected", f"pid={stopped.pid}")
    thread.join(60)
    assert not thread.is_alive()
    assert other.wait_received(stream.total, 30)
    assert check.mismatch is None and check.offset == stream.total, check.verdict()
    assert relay.find_line("disconnecting slow subscriber") is None


def test_a_mapped_subscriber_changes_its_subscription_on_the_live_connection(start_relay: StartRelay) -> None:
    relay = start_relay("market_data")
    rounds = [
        [
            ref.message(1, ref.standard_record(1 + i % 4, b"v" * (i % 5)), source=i % 3, sequence=i)
            for i in range(k, k + 400)
        ]
        for k in (0, 400, 800)
    ]
    picks = [(frozenset({1}), None), (frozenset({2, 3}), frozenset({1})), p.EVERYTHING]
    with Subscriber("market_data", relay.socket_path, shared_memory=True, tlv_types=[1]) as sub:
        for k, (messages, selection) in enumerate(zip(rounds, picks, strict=True)):
            if k == 1:
                sub.subscribe(tlv_types=[2, 3], sources=[1])
            elif k == 2:
                sub.unsubscribe()
            publish_all(relay, b"".join(messages), random.Random(k))
            wanted = b"".join(m for m in messages if ref.selects(selection, m))
            assert drain(sub) == wanted, f"round {k}: {p.describe_filter(selection)}"


@pytest.mark.parametrize("shared_memory", [False, True], ids=["socket", "mapped"])
def test_a_new_subscription_leaves_what_was_forwarded_before_it_as_it_was(
    start_relay: StartRelay, shared_memory: bool
) -> None:
    """Effective from the next message the relay forwards: unread messages keep the subscription they went under."""
    relay = start_relay("market_data")
    before = [ref.message(1, ref.standard_record(1 + i % 2, b"b"), sequence=i) for i in range(300)]
    after = [ref.message(1, ref.standard_record(1 + i % 2, b"a"), sequence=i) for i in range(300, 600)]
    witness, mark = Peer(relay), marker(1, domain=p.MARKET_DATA)
    with Subscriber("market_data", relay.socket_path, shared_memory=shared_memory, tlv_types=[1]) as sub:
        if not shared_memory:  # a mapped subscriber is in force once built; this one once its marker is through
            sub._sock.sendall(mark)
            witness.wait_for(mark)
        publish_all(relay, b"".join(before), random.Random(1))  # forwarded under types {1}, not read yet
        sub.subscribe(tlv_types=[2])
        if not shared_memory:
            sub._sock.sendall(mark)
            witness.wait_for(mark)
        publish_all(relay, b"".join(after), random.Random(2))
        wanted = b"".join(m for m in before if m[32] == 1) + b"".join(m for m in after if m[32] == 2)
        assert receive(sub, len(wanted)) == wanted
    witness.close()


def test_subscriptions_changed_twice_before_a_mapped_subscriber_reads_each_keep_their_share(
    start_relay: StartRelay,
) -> None:
    relay = start_relay("market_data")
    rounds = [
        [ref.message(1, ref.standard_record(1 + i % 3, b"r"), sequence=i) for i in range(k, k + 300)]
        for k in (0, 300, 600)
    ]
    with Subscriber("market_data", relay.socket_path, shared_memory=True, tlv_types=[1]) as sub:
        publish_all(relay, b"".join(rounds[0]), random.Random(1))
        sub.subscribe(tlv_types=[2])
        publish_all(relay, b"".join(rounds[1]), random.Random(2))
        sub.subscribe(tlv_types=[3])
        publish_all(relay, b"".join(rounds[2]), random.Random(3))
        sub.unsubscribe()  # nothing appended after it: nothing more to read
        got = drain(sub)
    wanted = b"".join(m for k, messages in enumerate(rounds) for m in messages if m[32] == k + 1)
    assert got == wanted
