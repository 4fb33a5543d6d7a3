"""``jitrelay soak``: the stream checks every subscriber runs, the relay figures it reads, and a short real run.

The checks are fed exact bytes built from PROTOCOL.md (``reference``), so each
kind of failure the soak can report is shown to be detected. The 60 s run
asserts what must hold on any machine: no failure, no gap, nothing missing for
subscribers that stayed, and flat memory; never a speed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.reference import message, standard_record
from support.relays import RelayProcess, StartRelay

from jitrelay.cli import main
from jitrelay.core import protocol
from jitrelay.core.config import parse_byte_count
from jitrelay.core.domains import logic_for
from jitrelay.core.units import MiB
from jitrelay.server.figures import read_figures
from jitrelay.tools import soak
from jitrelay.tools.soak import (
    ECHO_FLAGS,
    SoakOptions,
    StreamVerifier,
    pick_sources,
    relay_summary,
)

MARKET_DATA = 1
MAX_PAYLOAD = 1 << 20


def stream(key: int, sequences: range | list[int], value: bytes = b"tick") -> list[bytes]:
    """Messages of stream ``key`` (source = low byte, flags = high byte) with these sequence numbers."""
    source, flags = key & 0xFF, key >> 8
    return [
        message(MARKET_DATA, standard_record(1, value + bytes([n % 256])), source=source, flags=flags, sequence=n)
        for n in sequences
    ]


def verifier(**kwargs: object) -> StreamVerifier:
    return StreamVerifier(MARKET_DATA, MAX_PAYLOAD, **kwargs)


def echo(sequence: int) -> bytes:
    """The controller's answer to a subscriber's beacon: source 0, echo flags, the beacon's sequence."""
    return message(MARKET_DATA, standard_record(1, b"echo"), source=0, flags=ECHO_FLAGS, sequence=sequence)


def subscribed(sources: set[int], **kwargs: object) -> StreamVerifier:
    """A verifier whose subscription to ``sources`` is in force (its echo has come back)."""
    v = verifier(**kwargs)
    v.subscribe(frozenset(sources), echo=1)
    v.feed(echo(1))
    assert not v.switching
    return v


def test_interleaved_streams_verify_byte_by_byte() -> None:
    a, b = stream(1, range(5)), stream(0x1203, range(7, 12), b"longer value")
    data = b"".join(x for pair in zip(a, b, strict=True) for x in pair)
    v = verifier()
    for i in range(len(data)):  # every read boundary, inside headers and payloads
        v.feed(data[i : i + 1])
    assert v.verified == 10
    assert not v.failures and v.tail == 0
    assert v.last == {1: 4, 0x1203: 11}


def test_gap_repeat_and_reorder_are_sequence_failures() -> None:
    msgs = stream(7, [0, 1, 3, 3, 2])
    v = verifier()
    v.feed(b"".join(msgs))
    assert v.failures == {"sequence": 3}
    assert [(d["expected"], d["got"]) for d in v.details] == [(2, 3), (4, 3), (4, 2)]
    assert v.verified == 5


def test_corrupted_byte_is_a_crc_failure() -> None:
    msgs = stream(2, range(3))
    bad = bytearray(msgs[1])
    bad[-1] ^= 0x01
    v = verifier()
    v.feed(msgs[0] + bytes(bad) + msgs[2])
    assert v.failures == {"crc": 1, "sequence": 1}  # the corrupt message does not count, so 2 follows 0
    assert v.details[0] == {"kind": "crc", "message": 1, "key": 2, "seq": 1, "size": len(msgs[1])}
    assert v.verified == 2


def test_message_torn_in_its_payload_is_caught() -> None:
    """Part of a message followed by the next one: the relay must never forward that."""
    msgs = stream(3, range(3))
    v = verifier()
    v.feed(msgs[0] + msgs[1][:36] + msgs[2])
    # The torn header claims 7 payload bytes: 4 of its own and 3 of the next message, whose rest has no magic.
    assert v.failures == {"crc": 1, "framing": 1} and v.broken
    assert v.verified == 1


def test_message_torn_in_its_header_leaves_a_tail() -> None:
    """A torn header borrows its size from the next message; the bytes left over at a clean end give it away."""
    msgs = stream(3, range(3))
    v = verifier()
    v.feed(msgs[0] + msgs[1][:20] + msgs[2])
    assert not v.failures and v.verified == 1
    assert v.tail == 20 + len(msgs[2])  # the soak fails a subscriber that ends with a tail


def test_bad_magic_breaks_the_stream() -> None:
    msgs = stream(4, range(2))
    v = verifier()
    v.feed(msgs[0] + b"\x00" * 32 + msgs[1])
    assert v.failures == {"framing": 1} and v.broken
    assert v.verified == 1
    v.feed(msgs[1])  # nothing after a lost framing is trusted
    assert v.verified == 1


def test_wrong_domain_is_a_framing_failure() -> None:
    v = verifier()
    v.feed(message(2, standard_record(20, b"signal"), source=5))
    assert v.failures == {"framing": 1} and not v.broken and v.verified == 0


def test_first_message_must_be_zero_only_from_the_start() -> None:
    late = verifier()
    late.feed(b"".join(stream(9, range(5, 8))))
    assert not late.failures and late.verified == 3
    early = verifier(from_start=True)
    early.feed(b"".join(stream(9, range(5, 8)) + stream(10, range(3))))
    assert early.failures == {"head": 1} and early.details[0]["seq"] == 5


def test_probes_and_partial_tail() -> None:
    probes = stream(0, range(2))
    msgs = stream(1, range(2))
    seen = []
    v = verifier(on_failure=seen.append)
    v.feed(b"".join(probes + msgs) + msgs[0][:33])
    assert (v.probes, v.verified, v.tail) == (2, 2, 33)
    assert not seen


def test_failure_details_reach_the_callback() -> None:
    seen: list[dict] = []
    v = verifier(on_failure=seen.append)
    v.feed(b"".join(stream(1, [0, 2])))
    assert seen == [{"kind": "sequence", "message": 1, "key": 1, "expected": 1, "got": 2}]


def test_message_outside_the_subscription_fails() -> None:
    v = verifier()
    v.subscribe(frozenset({0, 1}), echo=7)
    v.feed(b"".join(stream(2, [0])))  # before the echo the relay may still send everything
    v.feed(echo(7))
    v.feed(b"".join(stream(2, [1]) + stream(1, range(3))))
    assert v.failures == {"subscription": 1}
    assert v.details == [{"kind": "subscription", "message": 2, "key": 2, "seq": 1, "allowed": [0, 1]}]
    assert (v.verified, v.filtered_verified, v.markers) == (4, 3, 1)
    assert (v.closed_by_echo, v.closed_by_message) == (1, 0)


def test_switch_window_allows_old_or_new_until_a_message_only_the_new_set_allows() -> None:
    v = subscribed({0, 1, 2})
    v.subscribe(frozenset({0, 2, 3}), echo=9)
    a1, a2, a3 = stream(1, range(10)), stream(2, range(10)), stream(3, range(10))
    v.feed(a1[0] + a2[0] + a1[1] + a2[1])  # old and kept sources: the relay has not read the change yet
    assert not v.failures and v.switching
    v.feed(a3[0])  # only the new set allows source 3: the change is in force
    assert not v.switching and v.closed_by_message == 1
    v.feed(a2[2] + a1[2] + a3[1] + echo(9))  # source 1 now comes too late; the echo changes nothing
    assert v.failures == {"subscription": 1}
    assert v.details[0] == {"kind": "subscription", "message": 7, "key": 1, "seq": 2, "allowed": [0, 2, 3]}
    assert v.verified == 7 and v.closed_by_echo == 1  # the first subscription's, from ``subscribed``


def test_narrowing_change_closes_at_its_own_echo() -> None:
    """From {1, 2} to {1}: no message is allowed by the new set only, so the echo closes the window."""
    v = subscribed({0, 1, 2})
    v.subscribe(frozenset({0, 1}), echo=5 << 32 | 2)
    v.feed(b"".join(stream(2, range(3)) + stream(1, range(3))))
    v.feed(echo(6 << 32 | 2))  # another subscriber's echo
    v.feed(b"".join(stream(2, [3])))
    assert not v.failures and v.switching
    v.feed(echo(5 << 32 | 2) + b"".join(stream(1, [3]) + stream(2, [4])))
    assert v.failures == {"subscription": 1} and v.details[0]["key"] == 2
    assert v.closed_by_echo == 2 and v.markers == 3


def test_subscription_from_everything_is_checked_only_after_its_echo() -> None:
    v = verifier()
    v.subscribe(frozenset({1}), echo=3)
    v.feed(b"".join(stream(2, range(5))))  # the change may not be in force yet: all of these are fine
    assert not v.failures and v.filtered_verified == 0
    v.feed(echo(3) + b"".join(stream(2, [5])))
    assert v.failures == {"subscription": 1}


def test_gap_in_a_selected_source_fails() -> None:
    v = subscribed({0, 1, 2})
    v.feed(b"".join(stream(1, [0, 1, 3])))
    assert v.failures == {"sequence": 1}
    assert v.details[0] == {"kind": "sequence", "message": 3, "key": 1, "expected": 2, "got": 3}


def test_a_change_lets_a_kept_source_skip_ahead_once_never_back() -> None:
    """The relay restarts a subscriber it sends to from behind in the log at the head when its filter changes.

    So across a change each stream may skip ahead once; a repeat, a step back or a later gap still fails.
    """
    v = subscribed({0, 1, 2})
    v.feed(b"".join(stream(1, [0, 1]) + stream(2, [0, 1])))
    v.subscribe(frozenset({0, 1, 3}), echo=2)
    v.feed(echo(2) + b"".join(stream(1, [5, 6, 8])))
    assert v.failures == {"sequence": 1} and v.details[0]["expected"] == 7 and v.skipped_ahead == 1
    v.subscribe(frozenset({0, 1, 2}), echo=3)
    v.feed(echo(3) + b"".join(stream(1, [8])))
    assert v.failures == {"sequence": 2} and v.details[1]["expected"] == 9


def test_added_source_starts_its_streams_afresh() -> None:
    v = subscribed({0, 1, 2}, from_start=True)
    v.feed(b"".join(stream(2, [0, 1]) + stream(1, [0])))
    v.subscribe(frozenset({0, 1}), echo=2)
    v.feed(echo(2))
    v.subscribe(frozenset({0, 1, 2}), echo=3)
    v.feed(b"".join(stream(2, [40, 41]) + stream(1, [1])))  # source 2 is back: its stream goes on from where it is
    assert not v.failures
    v.feed(b"".join(stream(0x101, [5])))  # after a change the relay may have restarted it at the head: no head check
    assert not v.failures
    fresh = subscribed({0, 1}, from_start=True)  # a subscription at connect, before any message: streams start at 0
    fresh.feed(b"".join(stream(0x101, [5])))
    assert fresh.failures == {"head": 1} and fresh.details[0]["key"] == 0x101


def test_unsubscribe_closes_at_the_first_message_of_another_source() -> None:
    v = subscribed({1})
    v.subscribe(None, echo=2)
    v.feed(b"".join(stream(1, range(2))))
    assert v.switching
    v.feed(b"".join(stream(7, range(2))))
    assert not v.switching and v.closed_by_message == 1 and v.allowed is None
    assert not v.failures and v.verified == 4


def notice(position: protocol.Position | protocol.Gap) -> bytes:
    if isinstance(position, protocol.Gap):
        return protocol.gap_notice(position)
    return protocol.position_notice(position)


def positioned(**kwargs: object) -> tuple[StreamVerifier, list[dict]]:
    gaps: list[dict] = []
    return verifier(positioned=True, on_gap=gaps.append, **kwargs), gaps


def test_positioned_stream_follows_its_notices() -> None:
    msgs = stream(1, range(4))
    v, gaps = positioned()
    v.feed(msgs[0] + notice(protocol.Position(7, 1000, 50)) + b"".join(msgs[1:3]))
    assert v.position == (7, 1000 + len(msgs[1]) + len(msgs[2]), 52) and v.notices == 1
    v.feed(notice(protocol.Position(7, 1000 + len(msgs[1]) + len(msgs[2]), 52)) + msgs[3])  # where it stands: fine
    assert not v.failures and v.verified == 4 and not gaps
    v.feed(notice(protocol.Position(7, 5, 5)))
    assert v.failures == {"position": 1} and v.details[0]["why"] == "notice elsewhere"


def test_gap_notice_must_match_the_positions_around_it() -> None:
    a, b = stream(1, range(20)), stream(0x102, range(20))
    v, gaps = positioned(from_start=True)
    v.feed(notice(protocol.Position(7, 0, 0)) + a[0] + b[0] + a[1])
    at = v.position
    missed = a[2:5] + b[1:3]  # 5 messages the log left: the stream goes on at a[5]
    v.feed(notice(protocol.Gap(protocol.GAP_LEFT_LOG, 5, sum(map(len, missed)))))
    v.feed(notice(protocol.Position(7, at[1] + sum(map(len, missed)), at[2] + 5)) + a[5] + b[3] + a[6] + b[4])
    assert not v.failures and v.gaps == 1 and v.gap_messages == 5 and v.verified == 7
    assert gaps == [
        {"gap": 1, "count": 5, "bytes": sum(map(len, missed)), "p": 3, "q": 8},
        {"gap": 1, "key": 1, "before": 1, "first": 5},
        {"gap": 1, "key": 0x102, "before": 0, "first": 3},
    ]
    v.feed(notice(protocol.Gap(protocol.GAP_LEFT_LOG, 2, 10)) + notice(protocol.Position(7, 1, 99)))
    assert v.failures == {"position": 1} and v.details[0]["why"] == "gap notice"


def test_resumed_stream_goes_on_exactly_after_its_position() -> None:
    msgs = stream(1, range(10))
    start = protocol.Position(7, 500, 40)
    v, _ = positioned(resume=(start, {1: 4}))
    v.feed(msgs[8] + msgs[9])  # sent before the relay read the resume: set aside, it comes again
    v.feed(notice(start) + b"".join(msgs[5:10]))
    assert not v.failures and v.before_notice == 2 and v.verified == 5 and v.last == {1: 9}
    doubled, _ = positioned(resume=(start, {1: 4}))
    doubled.feed(notice(start) + msgs[4] + msgs[5])
    assert doubled.failures == {"sequence": 1}
    elsewhere, _ = positioned(resume=(start, {1: 4}))
    elsewhere.feed(notice(protocol.Position(7, 600, 41)))
    assert elsewhere.failures == {"position": 1}


def test_a_change_waits_for_the_previous_window() -> None:
    v = verifier()
    v.subscribe(frozenset({1}), echo=1)
    with pytest.raises(ValueError, match="switch window"):
        v.subscribe(frozenset({2}), echo=2)


def test_picked_sources_are_a_proper_subset_with_the_soak_source() -> None:
    rng = random.Random(3)
    picks = {pick_sources(rng, [0, 4, 5, 6]) for _ in range(200)}
    assert all(0 in p and 2 <= len(p) <= 3 and p <= {0, 4, 5, 6} for p in picks)
    assert len(picks) == 6  # every subset of one or two of the three publishers
    assert pick_sources(rng, [9]) == {0, 9}


def test_publisher_slots_keep_distinct_sources(tmp_path: Path) -> None:
    """Replacements take their slot's source with the next flags; after 256 starts the slot moves to a free byte."""
    run = soak.Soak(SoakOptions(publishers=3, socket_dir=tmp_path))
    keys = [run._stream_key(0) for _ in range(258)]
    assert keys[:3] == [0x001, 0x101, 0x201] and keys[255] == 0xFF01
    assert keys[256:] == [0x004, 0x104]  # 2 and 3 are held by slots 1 and 2
    assert list(run.ctrl[1:]) == [4, 2, 3]
    assert run._stream_key(1) == 0x002
    assert len(set(keys)) == len(keys)


def drain(sock: socket.socket) -> None:
    """Send nothing more and read until the relay closes its side: by then it has judged all this connection sent."""
    sock.settimeout(10)
    sock.shutdown(socket.SHUT_WR)
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(1 << 16):
            pass
    sock.close()


@pytest.mark.timeout(120)
def test_summary_file_holds_exactly_what_the_relay_saw(start_relay: StartRelay, short_dir: Path) -> None:
    """The figures the soak reads (its summary file, not its log) count exactly what this test sent.

    A subscriber that never reads is dropped as slow (by this process's pid);
    three messages are rejected, one is a control message, two connections
    close mid-message and one sends bad magic.
    """
    summary = short_dir / "figures.json"
    options = ("--summary-file", str(summary), "--slow-policy", "disconnect", "--pending-limit", "64KiB")
    relay = start_relay("market_data", *options, "--slow-timeout", "0.2")
    slow = relay.connect()
    batch = protocol.build_batch(MARKET_DATA, 10_000, [(1, b"v" * 37)]).tobytes()
    rejected = [
        message(2, standard_record(20, b"signal")),  # wrong_domain
        message(MARKET_DATA, standard_record(120, b"out of range")),  # tlv_out_of_range
        message(MARKET_DATA, b"\x01\x05ab"),  # malformed_tlv: five bytes promised, two given
    ]
    with relay.connect(timeout=30) as publisher:
        for _ in range(16):  # 11 MB: far more than the slow subscriber's limit and socket buffers hold
            publisher.sendall(batch)
        publisher.sendall(b"".join(rejected))
        relay.wait_line("disconnecting slow subscriber", f"pid={os.getpid()}", timeout=30)
        drain(publisher)
    slow.close()
    control = relay.connect()
    control.sendall(protocol.subscribe_message(sources=[1]))
    drain(control)
    whole = message(MARKET_DATA, standard_record(1, b"torn"))
    for cut in (20, len(whole) - 1):  # in the header, in the payload
        torn = relay.connect()
        torn.sendall(whole[:cut])
        drain(torn)
    faulty = relay.connect()
    faulty.sendall(b"\x00" * 40)
    drain(faulty)
    relay.send_signal(signal.SIGTERM)
    assert relay.wait_exit(15) == 0
    figures = read_figures(summary)
    forwarded = 16 * 10_000
    assert relay_summary(figures) == {
        "received": forwarded + 4,
        "forwarded": forwarded,
        "rejected": {"wrong_domain": 1, "malformed_tlv": 1, "tlv_out_of_range": 1},
        "faults": {"bad_magic": 1},
        "control": 1,
        "slow_dropped": 1,
        "connections": 6,
        "torn_messages": 2,
    }
    assert figures["slow_disconnected_pids"] == [os.getpid()]
    assert figures["verdicts"]["bad_checksum"] == figures["verdicts"]["bad_version"] == 0
    assert figures["bytes_forwarded"] == forwarded * 71
    assert figures["connections_open"] == 0
    assert relay_summary(None) is None  # a relay that wrote no file: the soak reports it as died


def probe_until_attached(relay: RelayProcess, stats: list[int]) -> None:
    """Until the subscriber hears a probe, the relay may not have it yet."""
    with relay.connect() as probe:
        deadline = time.monotonic() + 10
        while not stats[soak.PROBES]:
            assert time.monotonic() < deadline, "the subscriber never attached"
            probe.sendall(message(MARKET_DATA, standard_record(1, b"probe")))
            time.sleep(0.02)
        probe.shutdown(socket.SHUT_WR)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def client_config(
    relay: RelayProcess, *, publisher_rate: float, max_size: int, stall_prob: float, stall_max: float
) -> soak.ClientConfig:
    """What the soak's client roles need to talk to ``relay``, a market_data relay."""
    return soak.ClientConfig(
        socket_path=str(relay.socket_path),
        domain="market_data",
        domain_id=MARKET_DATA,
        max_payload=MAX_PAYLOAD,
        publisher_rate=publisher_rate,
        max_size=max_size,
        stall_prob=stall_prob,
        stall_max=stall_max,
    )


def test_publisher_and_subscriber_roles(start_relay: StartRelay) -> None:
    """The soak's two client roles, in threads: writes cut mid-message arrive whole, every one, after stalls."""
    relay = start_relay("market_data")
    config = client_config(relay, publisher_rate=3000.0, max_size=700, stall_prob=1.0, stall_max=0.2)
    ctrl = [soak.RUNNING]
    sub_stats, pub_stats = [0] * soak.STATS_LEN, [0] * soak.STATS_LEN
    details = io.StringIO()
    role = soak.SubscriberRole(0, from_start=True)
    subscriber = threading.Thread(
        target=soak.run_subscriber, args=(config, sub_stats, ctrl, random.Random(1), role, details)
    )
    subscriber.start()
    probe_until_attached(relay, sub_stats)
    publisher = threading.Thread(target=soak.run_publisher, args=(config, pub_stats, ctrl, random.Random(2), 0x0102))
    publisher.start()
    time.sleep(1.6)
    ctrl[0] = soak.ENDING
    publisher.join(10)
    deadline = time.monotonic() + 10
    while sub_stats[soak.VERIFIED] < pub_stats[soak.PUBLISHED] and time.monotonic() < deadline:
        time.sleep(0.02)
    ctrl[0] = soak.STOPPING
    relay.kill()  # SIGTERM: the relay closes the subscriber between messages
    subscriber.join(10)
    assert not publisher.is_alive() and not subscriber.is_alive()
    assert pub_stats[soak.STATE] == soak.ENDED and sub_stats[soak.STATE] == soak.ENDED
    assert pub_stats[soak.PUBLISHED] > 1000
    assert sub_stats[soak.VERIFIED] == pub_stats[soak.PUBLISHED]
    assert sub_stats[soak.STREAMS] == 1 and sub_stats[soak.TAIL] == 0
    assert sub_stats[soak.STALLS] >= 1
    assert [sub_stats[slot] for slot in soak.FAILURE_SLOTS.values()] == [0] * 5, details.getvalue()
    assert details.getvalue() == ""


def test_filtered_subscriber_receives_exactly_its_sources(start_relay: StartRelay) -> None:
    """Two publishers, one subscriber to source 1 only and one to everything, all checked against a real relay.

    The filtered subscriber subscribes at connect and waits for its echo before
    the publishers start: from then on it must verify every message of
    publisher 1 and nothing of publisher 2, while the other verifies both
    streams, the beacon and the echo.
    """
    relay = start_relay("market_data")
    config = client_config(relay, publisher_rate=2000.0, max_size=300, stall_prob=0.0, stall_max=0.0)
    ctrl = [soak.RUNNING, 1, 2]  # the phase, then the publishers' sources
    echo_connection = soak.Echo(config)
    everything, one = [0] * soak.STATS_LEN, [0] * soak.STATS_LEN
    pubs = [[0] * soak.STATS_LEN, [0] * soak.STATS_LEN]
    details = io.StringIO()
    roles = [soak.SubscriberRole(3, from_start=True, witness=True), soak.SubscriberRole(4, sources=frozenset({0, 1}))]
    subscribers = [
        threading.Thread(target=soak.run_subscriber, args=(config, stats, ctrl, random.Random(i), role, details))
        for i, (stats, role) in enumerate(zip([everything, one], roles, strict=True))
    ]
    subscribers[0].start()
    probe_until_attached(relay, everything)
    subscribers[1].start()
    wait_for(lambda: one[soak.BY_ECHO] == 1, "the filtered subscriber's echo never came")
    publishers = [
        threading.Thread(target=soak.run_publisher, args=(config, stats, ctrl, random.Random(10 + key), key))
        for key, stats in zip([1, 2], pubs, strict=True)
    ]
    for thread in publishers:
        thread.start()
    time.sleep(1.5)
    ctrl[0] = soak.ENDING
    for thread in publishers:
        thread.join(10)
    published = [stats[soak.PUBLISHED] for stats in pubs]
    wait_for(lambda: everything[soak.VERIFIED] == sum(published), "the unfiltered subscriber fell short")
    wait_for(lambda: one[soak.VERIFIED] >= published[0], "the filtered subscriber fell short")
    echo_connection.close()
    ctrl[0] = soak.STOPPING
    relay.kill()
    for thread in subscribers:
        thread.join(10)
    assert not any(thread.is_alive() for thread in publishers + subscribers)
    assert details.getvalue() == ""
    assert min(published) > 500 and [stats[soak.STATE] for stats in pubs] == [soak.ENDED, soak.ENDED]
    assert one[soak.STATE] == everything[soak.STATE] == soak.ENDED
    assert (one[soak.VERIFIED], one[soak.FILTERED_VERIFIED], one[soak.STREAMS]) == (published[0], published[0], 1)
    assert (one[soak.SUBSCRIBED], one[soak.MARKERS], one[soak.BY_MESSAGE]) == (1, 1, 0)
    assert (everything[soak.VERIFIED], everything[soak.STREAMS], everything[soak.MARKERS]) == (sum(published), 2, 2)
    assert everything[soak.FILTERED_VERIFIED] == 0
    for stats in (one, everything):
        assert [stats[slot] for slot in soak.FAILURE_SLOTS.values()] == [0] * len(soak.FAILURE_SLOTS)
        assert stats[soak.TAIL] == 0
    assert (echo_connection.beacons, echo_connection.echoes, echo_connection.error) == (1, 1, None)


def test_shared_memory_subscribers_verify_and_account_for_every_lap(start_relay: StartRelay, short_dir: Path) -> None:
    """Two stalling shared-memory subscribers on a small log, beside a socket one that never stalls.

    The positioned one is lapped and hears of each lap as a gap: what it verified and what its gaps say it
    missed add up to exactly what was published, as the relay's gap notice count does to its laps. The other
    is cut off by its first lap, which the relay counts as a slow disconnect (this process's pid).
    """
    summary = short_dir / "figures.json"
    options = ("--summary-file", str(summary), "--slow-policy", "disconnect", "--log-size", "256KiB")
    relay = start_relay("market_data", *options)
    config = client_config(relay, publisher_rate=4000.0, max_size=4000, stall_prob=1.0, stall_max=2.0)
    ctrl = [soak.RUNNING]
    witness, positioned, plain, pub = ([0] * soak.STATS_LEN for _ in range(4))
    details = io.StringIO()
    roles = [
        soak.SubscriberRole(0, from_start=True, witness=True),
        soak.SubscriberRole(1, from_start=True, positioned=True, shm=True),
        soak.SubscriberRole(2, from_start=True, shm=True),
    ]
    subscribers = [
        threading.Thread(target=soak.run_subscriber, args=(config, stats, ctrl, random.Random(i), role, details))
        for i, (stats, role) in enumerate(zip([witness, positioned, plain], roles, strict=True))
    ]
    for thread in subscribers:
        thread.start()
    for stats in (witness, positioned, plain):
        probe_until_attached(relay, stats)
    publisher = threading.Thread(target=soak.run_publisher, args=(config, pub, ctrl, random.Random(9), 0x0001))
    publisher.start()
    wait_for(
        lambda: plain[soak.STATE] == soak.CLOSED_BY_RELAY and positioned[soak.SHM_LAPS] >= 1,
        "the shared-memory subscribers were never lapped",
        60,
    )
    ctrl[0] = soak.ENDING
    publisher.join(10)
    published = pub[soak.PUBLISHED]
    wait_for(lambda: witness[soak.VERIFIED] == published, "the socket subscriber fell short")
    # Every published message was verified or fell in a gap; a gap may also hold probes this one never read
    # (the witness read every probe; a probe sent before this one's grant is in neither its stream nor its gaps).
    unseen_probes = witness[soak.PROBES] - positioned[soak.PROBES]
    wait_for(
        lambda: positioned[soak.VERIFIED] + positioned[soak.GAP_MESSAGES] >= published,
        "the positioned shared-memory subscriber's messages and gaps do not add up to what was published",
    )
    assert positioned[soak.VERIFIED] + positioned[soak.GAP_MESSAGES] <= published + unseen_probes
    ctrl[0] = soak.STOPPING
    relay.send_signal(signal.SIGTERM)
    assert relay.wait_exit(15) == 0
    for thread in subscribers:
        thread.join(10)
    assert not publisher.is_alive() and not any(thread.is_alive() for thread in subscribers)
    assert details.getvalue() == ""
    assert (positioned[soak.SHM_GRANTED], plain[soak.SHM_GRANTED], witness[soak.SHM_GRANTED]) == (1, 1, 0)
    assert positioned[soak.STATE] == witness[soak.STATE] == soak.ENDED
    assert positioned[soak.GAP_NOTICES] == positioned[soak.SHM_LAPS] >= 1 and positioned[soak.SHM_CUT_OFF] == 0
    assert (plain[soak.STATE], plain[soak.SHM_CUT_OFF], plain[soak.SHM_LAPS]) == (soak.CLOSED_BY_RELAY, 1, 0)
    for stats in (witness, positioned, plain):
        assert [stats[slot] for slot in soak.FAILURE_SLOTS.values()] == [0] * len(soak.FAILURE_SLOTS)
        assert stats[soak.POSITION_FAILURES] == stats[soak.TAIL] == 0
    figures = read_figures(summary)
    assert figures["slow_actions"]["gap_notice"] == positioned[soak.SHM_LAPS]
    assert figures["slow_actions"]["disconnect"] == 1 and figures["slow_disconnected_pids"] == [os.getpid()]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--publishers", "0"], "at least one publisher"),
        (["--subscribers", "0"], "at least one publisher and one subscriber"),
        (["--rate", "0"], "must be positive"),
        (["--duration", "0"], "must be positive"),
        (["--stall-prob", "1.5"], "probability"),
        (["--max-size", "33"], "at least 34 bytes"),
        (["--churn", "1000", "--duration", "100"], "stream keys"),
        (["--filtered", "1.5"], "share of the subscribers"),
        (["--resubscribe", "2"], "probability per second"),
        (["--publishers", "256"], "at most 255 publishers"),
    ],
)
def test_impossible_soak_is_a_usage_error(args: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["soak", *args]) == 2
    assert error in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_soak_60s(tmp_path: Path) -> None:
    """60 s of load: a SIGKILL a second, SIGSTOP stalls, filtered, resuming and shared-memory subscribers, 2 MiB log.

    Every message checks out; killed positioned subscribers resume exactly where they recorded; every gap
    notice counts exactly what the witness saw go by; memory stays flat.
    """
    report_path = tmp_path / "soak.json"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_JIT"}  # the relay runs compiled
    args = ["--duration", "60", "--rate", "10000", "--churn", "1", "--seed", "1", "--quiet", "--json", str(report_path)]
    args += ["--filtered", "0.9", "--resubscribe", "0.2", "--resuming", "0.4", "--sigstop", "0.3", "--shm", "0.5"]
    args += ["--log-size", "2MiB", "--stall-max", "4"]
    done = subprocess.run(
        [sys.executable, "-m", "jitrelay", "soak", *args], capture_output=True, text=True, timeout=220, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    assert report["ok"] and not report["relay"]["died"]
    assert report["verification_failures"] == 0, report["failure_details"]
    assert report["gaps"] == 0
    assert report["messages_verified"] > 0
    assert report["faults"]["clients_killed"] >= 1
    # The witness at least stayed from first message to last: it verified exactly what the relay forwarded.
    missing = report["complete_subscribers"]["missing"]
    assert missing and set(missing.values()) == {0}
    # Filtered subscribers ran, changed their subscriptions, and every message they verified was one they asked for.
    subscriptions = report["subscriptions"]
    assert subscriptions["subscribed_at_connect"] >= 1 and subscriptions["changes"] >= 1, subscriptions
    assert subscriptions["messages_verified"] > 0
    assert subscriptions["windows_closed_by_echo"] >= 1
    assert report["failures"]["subscription"] == 0
    # Positioned subscribers were killed and resumed, SIGSTOP stalled subscribers, and every gap counted exactly.
    positions, faults = report["positions"], report["faults"]
    assert positions["resumes"] >= 1 and faults["sigstops"] >= 1, (positions, faults)
    assert report["failures"]["position"] == report["failures"]["gap_count"] == 0
    assert positions["gaps_unchecked"] == 0
    assert positions["gaps_checked"] <= positions["gap_notices"]
    assert positions["gap_notices"] <= positions["relay_gap_notices"]  # some went to subscribers killed unread
    # Shared-memory subscribers ran beside socket ones, were granted the log, and verified as much without a failure.
    kinds = report["kinds"]
    shm, sock = kinds["shm"], kinds["socket"]
    assert shm["subscribers"] >= 1 and shm["granted"] >= 1 and shm["messages_verified"] > 0, kinds
    assert shm["failures"] == sock["failures"] == 0 and report["failures"]["shm_cut_off"] == 0
    assert shm["gap_notices"] >= shm["laps"]  # and the relay's, before the grant, to one resuming from out of the log
    assert positions["gap_notices"] == shm["gap_notices"] + sock["gap_notices"]
    assert report["faults"]["subscribers_dropped_slow"] == shm["cut_off"] + sock["cut_off"]
    summary = report["relay"]["summary"]
    assert summary["rejected"] == {} and summary["faults"] == {}
    assert summary["control"] >= subscriptions["subscribed_at_connect"] + 1  # and the echo connection's own
    beacons = subscriptions["beacons_echoed"]
    soak_traffic = report["relay"]["probes"] + 2 * beacons  # each beacon and its echo
    assert report["complete_subscribers"]["expected_each"] == summary["forwarded"] - soak_traffic
    # After warm-up the relay may grow by a receive buffer per client connection and by the log as it
    # fills (its mirror included), and no more: subscribers hold no copies. A leak of that size in 60 s would show.
    rss, opts = report["rss"], report["options"]
    relay_options = opts["relay_options"]
    logic = logic_for("market_data")
    log_bytes = parse_byte_count(relay_options[relay_options.index("--log-size") + 1]) + logic.max_payload + 32
    clients = opts["publishers"] + opts["subscribers"]
    allowance = (clients * logic.buffer_size + log_bytes) / MiB
    assert rss["end_mib"] - rss["warmup_mib"] <= allowance, (allowance, rss)
    assert re.search(r"^  result +OK$", done.stdout, re.MULTILINE), done.stdout
