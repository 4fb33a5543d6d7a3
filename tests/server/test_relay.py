"""End-to-end: a real relay process, real Unix sockets, raw-socket clients.

The clients here are written from PROTOCOL.md with plain sockets; only
``build_message`` and ``build_batch`` come from the project, to encode.
Every check is on exact bytes: what each subscriber reads must be the
concatenation of the messages it should get, in order, nothing else.

A relay forwards only to connections it has already accepted, so before a
test publishes it "syncs": the publisher sends heartbeat probes (source and
flags 0xEE, which no test message uses) until every reader has seen the last
probe sent. Readers drop those leading probes, so what they keep is exactly
what the test published afterwards.
"""

from __future__ import annotations

import os
import random
import re
import signal
import struct
import threading
import time

import pytest
from support.clients import (
    DOMAINS,
    Clients,
    NumberedStream,
    Reader,
    StreamCheck,
    assert_each_got_the_stream,
    assert_stream,
    checked_readers,
    publisher_messages,
    sync,
)
from support.reference import extended_record, standard_record
from support.relays import StartRelay
from support.streams import send_chunked

from jitrelay.core.protocol import build_message, decode_messages
from jitrelay.core.units import KiB, MiB

# -- clients -----------------------------------------------------------------


# -- message generators --------------------------------------------------------


# -- forwarding ------------------------------------------------------------------


def test_two_publishers_interleave_only_whole_messages(start_relay: StartRelay, clients: Clients) -> None:
    relay = start_relay("market_data")
    subscribers = [clients.reader(relay) for _ in range(3)]
    publishers = [clients.connect(relay) for _ in range(2)]
    # Each publisher is also a subscriber of the other one's messages.
    echoes = [clients.reader(relay, sock) for sock in publishers]
    sync(publishers[0], [*subscribers, echoes[1]], 1)
    sync(publishers[1], [*subscribers, echoes[0]], 1)

    sent = [publisher_messages(random.Random(f"publisher {k}"), k + 1, 2500) for k in range(2)]
    streams = [b"".join(msgs) for msgs in sent]
    errors: list[BaseException] = []

    def publish(k: int) -> None:
        try:
            send_chunked(publishers[k], streams[k], random.Random(k), (1, 3, 32, 77, 500, 4096, 65536))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors

    total = sum(map(len, streams))
    for sub in subscribers:
        sub.wait_received(total)
    echoes[0].wait_received(len(streams[1]))
    echoes[1].wait_received(len(streams[0]))
    time.sleep(0.2)

    for i, sub in enumerate(subscribers):
        got = list(decode_messages(bytes(sub.data)))  # raises unless the stream is whole messages only
        for k in range(2):
            mine = [m.raw for m in got if m.header.source == k + 1]
            assert mine == sent[k], f"subscriber {i}: publisher {k}'s messages missing, altered or out of order"
        assert len(got) == sum(map(len, sent)), f"subscriber {i} got messages nobody sent"
    assert_stream(echoes[0].data, streams[1], "publisher 0 reading publisher 1")
    assert_stream(echoes[1].data, streams[0], "publisher 1 reading publisher 0")


# Types at the edges of the execution and signal ranges, each in a record with an empty value: (case, type, forwarded).
EDGE_TYPES: dict[str, list[tuple[str, int, bool]]] = {
    "execution": [
        ("type 40", 40, True),
        ("type 59", 59, True),
        ("type 60 (signal)", 60, False),
        ("type 79", 79, False),
    ],
    "signal": [("type 60", 60, True), ("type 79", 79, True), ("type 80", 80, False)],
}


def rule_cases(domain: str) -> list[tuple[str, bytes, bool]]:
    """(label, message, forwarded) pairs for the domain rules of PROTOCOL.md."""
    domain_id, lo, hi, verifies = DOMAINS[domain]
    seq = iter(range(1000))

    def msg(records: bytes, **kw: int) -> bytes:
        return build_message(domain_id, payload=records, sequence=next(seq), **kw)

    def corrupt_crc(m: bytes) -> bytes:
        return m[:28] + struct.pack("<I", struct.unpack_from("<I", m, 28)[0] ^ 0x80000000) + m[32:]

    cases = [
        ("lowest type", msg(standard_record(lo, b"lo")), True),
        ("highest type", msg(standard_record(hi, b"hi")), True),
        ("below range", msg(standard_record(lo - 1, b"x")), False),
        ("above range", msg(standard_record(hi + 1, b"x")), False),
        ("extended, highest type", msg(extended_record(hi, b"e" * 400)), True),
        ("extended, above range", msg(extended_record(hi + 1, b"e" * 400)), False),
        ("good checksum", msg(standard_record(lo, b"crc")), True),
        ("bad checksum", corrupt_crc(msg(standard_record(lo, b"crc"))), not verifies),
        ("bad checksum, heartbeat", corrupt_crc(msg(b"")), not verifies),
        ("good checksum again", msg(standard_record(hi, b"crc")), True),
    ]
    cases += [
        ("vendor type 200", msg(standard_record(200, b"vendor")), True),
        ("vendor type 254, extended", msg(extended_record(254, b"v" * 300)), True),
        ("type 199", msg(standard_record(199, b"")), False),
        ("type 100 (Torq system)", msg(standard_record(100, b"")), False),
    ]
    edges = EDGE_TYPES.get(domain, [])
    cases += [(name, msg(standard_record(type_, b"")), forwarded) for name, type_, forwarded in edges]
    if domain == "signal":
        cases += [("zero checksum: not computed", msg(standard_record(32, b"arb"), checksum=0), True)]
    if domain == "execution":
        cases += [("zero checksum: required", msg(standard_record(42, b"fill"), checksum=0), False)]
    return cases


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_domain_rules(start_relay: StartRelay, clients: Clients, domain: str) -> None:
    relay = start_relay(domain)
    subscriber = clients.reader(relay)
    publisher = clients.connect(relay)
    sync(publisher, [subscriber], DOMAINS[domain][0])

    cases = rule_cases(domain)
    publisher.sendall(b"".join(m for _, m, _ in cases))
    expected = b"".join(m for _, m, forwarded in cases if forwarded)
    subscriber.wait_received(len(expected))
    time.sleep(0.2)
    labels = {struct.unpack_from("<Q", m, 8)[0]: label for label, m, _ in cases}
    got = [labels.get(m.header.sequence, "?") for m in decode_messages(bytes(subscriber.data))]
    assert got == [label for label, _, forwarded in cases if forwarded]
    assert_stream(subscriber.data, expected)


# -- slow subscribers ----------------------------------------------------------------


def test_slow_subscriber_is_dropped_and_memory_stays_bounded(start_relay: StartRelay, clients: Clients) -> None:
    relay = start_relay("market_data", "--slow-policy", "disconnect", "--pending-limit", str(1 * MiB))
    stream = NumberedStream(1, [(1, b"w" * 37)], chunk_messages=1846, chunks=1600)  # 71-byte messages, ~200 MiB
    checks = [StreamCheck(stream) for _ in range(2)]
    fast = [clients.reader(relay, sink=check) for check in checks]
    slow = clients.reader(relay)
    publisher = clients.connect(relay)
    sync(publisher, [*fast, slow], 1)

    window = 2 * stream.chunk_size  # keep the fast readers well under the pending limit

    def send(index: int, readers: list[Reader]) -> None:
        for reader in readers:
            assert reader.wait_received(index * stream.chunk_size - window, 10), (
                f"a subscriber stalled: {reader.received} bytes; {relay.stderr[-2000:]}"
            )
        publisher.sendall(stream.chunk(index))

    warm_up = 64
    for i in range(warm_up):  # everyone reads: buffers reach their working size
        send(i, [*fast, slow])
    slow.wait_received(warm_up * stream.chunk_size)
    slow.pause()
    baseline = relay.rss_bytes()
    peak = baseline
    for i in range(warm_up, stream.chunks):
        send(i, fast)
        if i % 8 == 0:
            peak = max(peak, relay.rss_bytes())

    for reader, check in zip(fast, checks, strict=True):
        reader.wait_received(stream.total, 20)
        assert check.mismatch is None and check.offset == stream.total, check.verdict()
    peak = max(peak, relay.rss_bytes())
    assert peak - baseline < 64 * MiB, f"relay RSS grew from {baseline >> 20} MiB to {peak >> 20} MiB"
    relay.wait_line("slow subscriber", f"pid={os.getpid()}")

    slow.resume()
    assert slow.wait_closed(), "the dropped subscriber's connection is still open"
    assert slow.eof or isinstance(slow.error, ConnectionResetError), slow.error
    assert warm_up * stream.chunk_size <= len(slow.data) < stream.total
    assert_stream(slow.data, stream.prefix(len(slow.data)), "what the slow subscriber got before the drop")
    time.sleep(0.1)
    for check in checks:
        assert check.mismatch is None and check.offset == stream.total, check.verdict()


def test_blocked_subscriber_loses_nothing_under_block(start_relay: StartRelay, clients: Clients) -> None:
    relay = start_relay("execution", "--slow-policy", "block", "--log-size", str(8 * MiB))
    stream = NumberedStream(3, [(40, b"e" * 2000)], chunk_messages=64, chunks=512)  # ~64 MiB of 2037-byte messages
    (other, slow), checks, publisher = checked_readers(relay, clients, stream)
    slow.pause()

    publisher.settimeout(60)
    sent = [0]
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            for i in range(stream.chunks):
                publisher.sendall(stream.chunk(i))
                sent[0] += stream.chunk_size
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=publish)
    thread.start()
    # Wait for the publisher to stall: the relay stopped reading from it.
    last, still_since = -1, time.monotonic()
    deadline = time.monotonic() + 10
    while time.monotonic() - still_since < 0.5 and time.monotonic() < deadline:
        time.sleep(0.05)
        if sent[0] != last:
            last, still_since = sent[0], time.monotonic()
    stalled_at = sent[0]
    assert thread.is_alive() and stalled_at < stream.total // 2, (
        f"publisher not held back: {stalled_at} of {stream.total} bytes sent while a subscriber read nothing"
    )
    assert other.received < stream.total // 2

    slow.resume()
    thread.join(30)
    assert not thread.is_alive() and not errors
    assert_each_got_the_stream(relay, stream, [other, slow], checks, 20)


@pytest.mark.parametrize(
    "options",
    [
        ("--slow-policy", "block", "--pending-limit", str(256 * KiB)),
        ("--slow-policy", "disconnect", "--pending-limit", str(512 * MiB)),
    ],
    ids=["block", "disconnect-large-limit"],
)
def test_slow_reader_gets_exactly_the_bytes_sent(
    start_relay: StartRelay, clients: Clients, options: tuple[str, ...]
) -> None:
    relay = start_relay("market_data", *options)
    stream = NumberedStream(1, [(1, b"s" * 37)], chunk_messages=14768, chunks=24)  # ~24 MiB of 71-byte messages
    (fast, slow), checks, publisher = checked_readers(relay, clients, stream, pace=random.Random("slow"))

    publisher.settimeout(60)
    for i in range(stream.chunks):
        publisher.sendall(stream.chunk(i))
    assert_each_got_the_stream(relay, stream, [fast, slow], checks, 30)


def test_publisher_that_exits_with_unread_data_loses_none_of_its_messages(
    start_relay: StartRelay, clients: Clients
) -> None:
    """A peer that closes with unread data makes the relay's next write to it fail.

    The messages it sent before closing are complete and must still be
    forwarded, even though the relay had not read them when the write failed.
    """
    relay = start_relay("execution", "--slow-policy", "block", "--log-size", str(8 * MiB))
    subscriber = clients.reader(relay)
    leaver = clients.connect(relay)  # publishes, never reads
    talker = clients.connect(relay)  # fills the leaver's socket and the log behind it
    sync(talker, [subscriber], 3)
    noise = [build_message(3, [(41, b"n" * 200)], source=2, sequence=i) for i in range(100000)]
    ours = [build_message(3, [(40, i.to_bytes(4, "little") * 8)], source=1, sequence=i) for i in range(300)]
    talker.settimeout(30)
    # ~23 MiB the leaver never reads, more than its socket and the log hold: the relay holds publishers until it goes.
    thread = threading.Thread(target=talker.sendall, args=(b"".join(noise),))
    thread.start()
    relay.wait_line("the log is full up to the slowest subscriber", timeout=20)
    leaver.sendall(b"".join(ours))
    leaver.close()  # unread data in its queue: the relay's pending write to it fails
    thread.join(30)
    total = sum(map(len, noise)) + sum(map(len, ours))
    assert subscriber.wait_received(total, 10), f"got {subscriber.received} of {total} bytes"
    by_source: dict[int, list[bytes]] = {1: [], 2: []}
    for message in decode_messages(bytes(subscriber.data)):
        by_source[message.header.source].append(message.raw)
    assert by_source[1] == ours
    assert by_source[2] == noise


def test_subscriber_behind_for_less_than_the_slow_timeout_loses_nothing(
    start_relay: StartRelay, clients: Clients
) -> None:
    """Under ``disconnect`` a subscriber that stalls briefly is waited for, not dropped."""
    relay = start_relay(
        "market_data", "--slow-policy", "disconnect", "--pending-limit", str(256 * KiB), "--slow-timeout", "5"
    )
    stream = NumberedStream(1, [(1, b"m" * 37)], chunk_messages=14000, chunks=16)  # ~16 MiB of 71-byte messages
    (fast, stalling), checks, publisher = checked_readers(relay, clients, stream)
    stalling.pause()
    thread = threading.Thread(target=lambda: [publisher.sendall(stream.chunk(i)) for i in range(stream.chunks)])
    thread.start()
    relay.wait_line("behind the head", f"pid={os.getpid()}", timeout=20)  # past its limit: the timeout runs
    assert fast.wait_received(stream.total, 20), "the stalled subscriber held back the other"
    time.sleep(1.0)  # well past a scheduler hiccup, well inside the timeout
    stalling.resume()
    thread.join(30)
    assert_each_got_the_stream(relay, stream, [fast, stalling], checks, 20)


def test_relay_reports_its_counters_and_forwarding_time_on_sigusr1_and_exit(
    start_relay: StartRelay, clients: Clients
) -> None:
    relay = start_relay("signal")
    subscriber = clients.reader(relay)
    publisher = clients.connect(relay)
    sync(publisher, [subscriber], 2)
    good = [build_message(2, [(20, b"s" * 10)], sequence=i) for i in range(50)]
    bad = build_message(2, [(20, b"s" * 10)], checksum=1)
    publisher.sendall(b"".join(good) + bad + bad)
    assert subscriber.wait_received(sum(map(len, good)))
    mark = len(relay.lines)
    relay.send_signal(signal.SIGUSR1)
    summary = relay.wait_line("relay running:", start=mark)
    assert "'bad_checksum': 2" in summary
    timing = relay.wait_line("forwarding time per batch", start=mark)
    match = re.search(
        r"p50 ([\d.]+) us, p99 ([\d.]+) us, p99\.9 ([\d.]+) us, max ([\d.]+) us over (\d+) batches", timing
    )
    assert match, timing
    p50, p99, p999, top = (float(x) for x in match.groups()[:4])
    assert 0 < p50 <= p99 <= p999 <= top and int(match.group(5)) >= 2
    relay.send_signal(signal.SIGTERM)
    assert relay.wait_exit(5) == 0
    assert relay.find_line("relay stopped:", "'bad_checksum': 2", start=mark)
    assert relay.find_line("relay forwarding time per batch", start=mark)
