"""Subscriptions against a real relay: each subscriber receives exactly what its filter selects.

Control messages (domain 255, records 100/101/102) set what a connection
receives; the relay consumes them and decides, in the same kernel pass for all
groups, which subscriber gets which message. Every check here compares whole
messages, byte for byte and in order, against ``reference.selects``.

Barriers use the relay's own ordering: a connection's messages are handled in
the order it sent them, so a marker a subscriber publishes after its control
message reaches a witness only once the subscription is in force.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import reference as ref
from support import strategies as gen
from support.peers import MARK, WAIT, Peer, is_marker, marker, publish_all, settle
from support.relays import RelayProcess, StartRelay

from jitrelay.client import AsyncSubscriber, Subscriber
from jitrelay.core import protocol as p


@pytest.fixture
def signal_relay(start_relay: StartRelay) -> RelayProcess:
    """A signal relay (checksums verified): shared by every hypothesis example of a test."""
    return start_relay("signal")


@st.composite
def control_sequence(draw: st.DrawFn) -> tuple[bytes, p.Filter]:
    """One to three control messages and the selection they leave."""
    selection: p.Filter = p.EVERYTHING
    sent = []
    for _ in range(draw(st.integers(1, 3))):
        message = ref.message(ref.CONTROL_DOMAIN, draw(gen.control_payload(ref.SUBSCRIPTION_RECORDS)))
        selection = ref.apply_control(selection, message)
        sent.append(message)
    return b"".join(sent), selection


def subscription(tlv_types: set[int] | None, sources: set[int] | None) -> tuple[bytes, p.Filter]:
    selection = (None if tlv_types is None else frozenset(tlv_types), None if sources is None else frozenset(sources))
    return p.subscribe_message(tlv_types, sources), selection


def signal_message(records: list[bytes], source: int) -> bytes:
    return ref.message(p.SIGNAL, b"".join(records), source=source)


# Signal messages from four sources with types 20..23, mixed with every kind of reject and control message.
signal_stream = st.lists(
    st.one_of(
        st.builds(
            signal_message,
            st.lists(st.builds(ref.standard_record, st.integers(20, 23), st.binary(max_size=6)), max_size=3),
            st.integers(0, 3),
        ),
        gen.any_message(ref.DOMAINS["signal"]),
        control_sequence().map(lambda pair: pair[0]),
    ),
    max_size=40,
).map(lambda messages: [m for m in messages if not is_marker(m)])

# What a subscriber asks for: the outcome of random control messages, or a plain subscription.
picks = st.one_of(
    control_sequence(),
    st.tuples(
        st.none() | st.sets(st.integers(19, 24), max_size=3),
        st.none() | st.sets(st.integers(0, 4), max_size=3),
    )
    .filter(lambda sets: sets != (None, None))
    .map(lambda sets: subscription(*sets)),
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream=signal_stream, chosen=st.lists(picks, min_size=1, max_size=4), rng=st.randoms(use_true_random=False))
def test_each_subscriber_receives_exactly_what_its_filter_selects(
    signal_relay: RelayProcess, stream: list[bytes], chosen: list[tuple[bytes, p.Filter]], rng: random.Random
) -> None:
    check_round(signal_relay, stream, chosen, rng)


_rounds = iter(range(1, 1 << 30))


def check_round(
    relay: RelayProcess, stream: list[bytes], chosen: list[tuple[bytes, p.Filter]], rng: random.Random
) -> None:
    """Subscribe, publish ``stream``, unsubscribe, fence: each subscriber got exactly its selection."""
    round_ = next(_rounds)
    data = b"".join(stream)
    spec = ref.DOMAINS[relay.domain]
    judged, _, _ = ref.reference_scan(data, spec.ident, spec.max_payload, spec.checksum, spec.ranges)
    forwarded = [data[o : o + n] for o, n, v in judged if v == p.FORWARD]
    witness = Peer(relay)
    subscribers = [Peer(relay) for _ in chosen]
    try:
        settle(witness, subscribers, [control for control, _ in chosen], 2 * round_)
        publish_all(relay, data, rng)
        settle(witness, subscribers, [p.unsubscribe_message()] * len(chosen), 2 * round_ + 1)
        fence = marker(round_, flags=MARK + 1)
        witness.send(fence)
        for k, (peer, (_, selection)) in enumerate(zip(subscribers, chosen, strict=True)):
            want = [m for m in forwarded if ref.selects(selection, m)]
            assert peer.wait_for(fence) == want, f"subscriber {k} with {p.describe_filter(selection)}"
    finally:
        witness.close()
        for peer in subscribers:
            peer.close()


# --- a subscription changed mid-stream -------------------------------------------------


def numbered(sequence: int) -> bytes:
    """Market data message ``sequence``: type 1..4 and source 0..2 in turn."""
    return ref.message(
        1, ref.standard_record(1 + sequence % 4, b"q" * (sequence % 9)), source=sequence % 3, sequence=sequence
    )


def stopped_line(relay: RelayProcess) -> str:
    """Stop ``relay`` with SIGTERM, see it exit cleanly, and return the ``relay stopped:`` line it logged."""
    mark = len(relay.lines)
    relay.send_signal(signal.SIGTERM)
    assert relay.wait_exit(15) == 0
    stopped = relay.find_line("relay stopped:", start=mark)
    assert stopped is not None, relay.stderr
    return stopped


def test_changing_a_subscription_mid_stream_switches_at_a_message_boundary(start_relay: StartRelay) -> None:
    relay = start_relay("market_data")
    published = [numbered(i) for i in range(30_000)]
    phases: list[p.Filter] = [
        (frozenset({1}), None),
        (frozenset({2}), None),
        (frozenset({3}), frozenset({1})),
        p.EVERYTHING,
    ]
    witness, sub = Peer(relay), Peer(relay)
    try:
        settle(witness, [sub], [p.subscribe_message(tlv_types=[1])], 1, domain=p.MARKET_DATA)
        publisher = threading.Thread(target=publish_paced, args=(relay, published))
        publisher.start()
        for control in (p.subscribe_message(tlv_types=[2]), p.subscribe_message([3], [1]), p.unsubscribe_message()):
            sub.wait_count(len(sub.messages) + 200)
            sub.send(control)
        publisher.join(60)
        assert not publisher.is_alive()
        settle(witness, [sub], [b""], 2, domain=p.MARKET_DATA)
        fence = marker(9, flags=MARK + 1, domain=p.MARKET_DATA)
        witness.send(fence)
        got = sub.wait_for(fence)
    finally:
        witness.close()
        sub.close()
    sequences = [int.from_bytes(m[8:16], "little") for m in got]
    assert all(m == published[s] for m, s in zip(got, sequences, strict=True)), "a message arrived altered"
    assert sequences == sorted(set(sequences)), "a message arrived twice or out of order"
    # Cut the deliveries into one segment per phase, each as long as its filter allows.
    cut = 0
    for k, selection in enumerate(phases):
        end = cut
        while end < len(got) and (k == len(phases) - 1 or ref.selects(selection, got[end])):
            end += 1
        segment = sequences[cut:end]
        assert segment, f"nothing delivered under phase {k}: {p.describe_filter(selection)}"
        wanted = [s for s in range(segment[0], segment[-1] + 1) if ref.selects(selection, published[s])]
        assert segment == wanted, f"phase {k} ({p.describe_filter(selection)}) lost messages"
        cut = end
    assert sequences[-1] == len(published) - 1


def publish_paced(relay: RelayProcess, messages: list[bytes]) -> None:
    """Publish in batches of 50 with short pauses, so the subscription changes land mid-stream; close gracefully."""
    with relay.connect(WAIT) as sock:
        for k in range(0, len(messages), 50):
            sock.sendall(b"".join(messages[k : k + 50]))
            time.sleep(0.0005)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 16):
            pass


# --- control messages are consumed, malformed ones rejected ------------------------------


def test_control_messages_are_never_forwarded_and_malformed_ones_are_rejected(start_relay: StartRelay) -> None:
    relay = start_relay("market_data")
    first = ref.message(1, ref.standard_record(1, b"a"), sequence=1)
    second = ref.message(1, ref.standard_record(2, b"b"), sequence=2)
    malformed = [
        ref.message(ref.CONTROL_DOMAIN, ref.standard_record(100, bytes(31))),  # bitmap one byte short
        ref.message(ref.CONTROL_DOMAIN, ref.standard_record(119, b"")),  # not a control record
        ref.message(ref.CONTROL_DOMAIN, b""),  # says nothing
        ref.message(ref.CONTROL_DOMAIN, ref.standard_record(102, b"x")),  # unsubscribe carries no value
    ]
    witness, publisher = Peer(relay), Peer(relay)
    try:
        settle(witness, [publisher], [b""], 1, domain=p.MARKET_DATA)
        fence = marker(5, flags=MARK + 1, domain=p.MARKET_DATA)
        publisher.send(first + p.subscribe_message(tlv_types=[9]) + b"".join(malformed) + second + fence)
        assert witness.wait_for(fence) == [first, second]
    finally:
        witness.close()
        publisher.close()
    stopped = stopped_line(relay)
    assert "'malformed_tlv': 4" in stopped and "control messages 1," in stopped, stopped
    assert relay.find_line("subscribes to types 9; sources any")


# --- the client library and the command line ---------------------------------------------


def test_client_subscribers_subscribe_change_and_unsubscribe(start_relay: StartRelay) -> None:
    relay = start_relay("market_data")
    path = relay.socket_path
    messages = [numbered(i) for i in range(24)]
    witness = Peer(relay)  # keeps the relay's fan-out busy with an unfiltered subscriber too
    try:
        with Subscriber("market_data", path, tlv_types=[2, 3], sources=[1]) as picky:
            relay.wait_line("subscribes to types 2,3; sources 1")
            publish_all(relay, b"".join(messages), random.Random(3))
            want = [m for m in messages if m[6] == 1 and m[32] in (2, 3)]
            assert receive(picky, len(want)) == want
            picky.subscribe(sources=[2])  # keeps types 2, 3
            relay.wait_line("subscribes to types 2,3; sources 2")
            picky.unsubscribe()
            picky.subscribe(tlv_types=[4])
            relay.wait_line("subscribes to types 4; sources any")
            publish_all(relay, b"".join(messages), random.Random(4))
            want = [m for m in messages if m[32] == 4]
            assert receive(picky, len(want)) == want
    finally:
        witness.close()


def receive(subscriber: Subscriber, count: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < count:
        batch = subscriber.recv_batch(timeout=WAIT)
        assert batch is not None, f"received {len(got)} of {count} messages"
        got += [m.raw for m in p.decode_messages(batch)]
    assert subscriber.recv_batch(timeout=0.3) is None, "more than the subscription selects"
    return got


def test_async_subscriber_subscribes_on_connect_and_live(start_relay: StartRelay) -> None:
    relay = start_relay("market_data")
    messages = [numbered(i) for i in range(24)]

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        async with AsyncSubscriber("market_data", relay.socket_path, sources=[0]) as sub:
            await asyncio.to_thread(relay.wait_line, "subscribes to types any; sources 0")
            await asyncio.to_thread(publish_all, relay, b"".join(messages), random.Random(5))
            first = await receive_async(sub, 8)
            await sub.subscribe(tlv_types=[1])
            await asyncio.to_thread(relay.wait_line, "subscribes to types 1; sources 0")
            await asyncio.to_thread(publish_all, relay, b"".join(messages), random.Random(6))
            second = await receive_async(sub, 2)
            return first, second

    first, second = asyncio.run(scenario())
    assert first == [m for m in messages if m[6] == 0]
    assert second == [m for m in messages if m[6] == 0 and m[32] == 1]


async def receive_async(subscriber: AsyncSubscriber, count: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < count:
        batch = await subscriber.recv_batch(timeout=WAIT)
        assert batch is not None, f"received {len(got)} of {count} messages"
        got += [m.raw for m in p.decode_messages(batch)]
    assert await subscriber.recv_batch(timeout=0.3) is None, "more than the subscription selects"
    return got


def test_jitrelay_sub_subscribes_at_the_relay(start_relay: StartRelay) -> None:
    relay = start_relay("market_data")
    messages = [numbered(i) for i in range(24)]
    want = [m for m in messages if m[32] in (2, 3) and m[6] == 1]
    tap = subprocess.Popen(
        [sys.executable, "-m", "jitrelay", "sub", "market_data", "--socket", str(relay.socket_path)]
        + ["--types", "2,3", "--sources", "1", "--json", "--count", str(len(want))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        relay.wait_line("subscribes to types 2,3; sources 1")
        publish_all(relay, b"".join(messages), random.Random(7))
        out, err = tap.communicate(timeout=WAIT)
    finally:
        tap.kill()
    assert tap.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["sequence"] for line in lines] == [int.from_bytes(m[8:16], "little") for m in want]


# --- publish-only connections ------------------------------------------------------------


def test_publish_only_connection_receives_nothing_and_is_never_slow(start_relay: StartRelay) -> None:
    """A publish-only connection that never reads: not dropped, nothing sent to it, its messages reach everyone.

    Without the declaration it would be sent about 1 MiB, sixteen times its
    pending limit: the relay would pause the publishers for it and drop it
    (after the slow timeout, long enough for the reading peers never to be
    dropped) before reading its messages again.
    """
    options = ("--slow-policy", "disconnect", "--pending-limit", "65536", "--slow-timeout", "2")
    relay = start_relay("market_data", *options)
    witness, other = Peer(relay), Peer(relay)
    # Connected last: the relay accepts in order, so both peers are in before it reads a byte of this one.
    quiet = relay.connect(WAIT)  # declares publish-only, then publishes and never reads
    try:
        first = marker(1, domain=p.MARKET_DATA)
        quiet.sendall(p.publish_only_message() + first)  # the declaration is in force from the marker on
        assert witness.wait_for(first) == [] and other.wait_for(first) == []
        theirs = [ref.message(1, ref.standard_record(1, bytes(200)), sequence=i) for i in range(4000)]
        second = marker(2, domain=p.MARKET_DATA)
        for k in range(0, len(theirs), 100):
            other.send(b"".join(theirs[k : k + 100]))
        other.send(second)
        assert witness.wait_for(second) == theirs
        mine = [ref.message(1, ref.standard_record(2, b"q"), sequence=i) for i in range(50)]
        third = marker(3, domain=p.MARKET_DATA)
        quiet.sendall(b"".join(mine) + third)
        assert witness.wait_for(third) == mine
        assert other.wait_for(third) == mine
        quiet.setblocking(False)
        with pytest.raises(BlockingIOError):
            quiet.recv(1)  # still connected, and never sent a byte
    finally:
        witness.close()
        other.close()
    quiet.setblocking(True)
    quiet.shutdown(socket.SHUT_WR)
    quiet.settimeout(WAIT)
    assert quiet.recv(1) == b"", "the relay sent a publish-only connection bytes"
    quiet.close()
    stopped = stopped_line(relay)
    assert "slow subscribers dropped 0" in stopped and "control messages 1," in stopped, stopped
    assert relay.find_line("publishes only; it receives nothing")
