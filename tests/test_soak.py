"""``jitrelay soak``: the stream checks every subscriber runs, the relay log it parses, and a short real run.

The checks are fed exact bytes built from PROTOCOL.md (``reference``), so each
kind of failure the soak can report is shown to be detected. The short run
asserts what must hold on any machine: no failure, no gap, nothing missing for
subscribers that stayed, and flat memory; never a speed.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import StartRelay
from reference import message, standard_record

from jitrelay import soak
from jitrelay.cli import main
from jitrelay.soak import StreamVerifier, parse_stop_summary, slow_dropped_pids, torn_messages

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


STOP_LINE = (
    "2024-05-01 10:00:00,000 INFO jitrelay.relay: jitrelay market_data relay stopped: received 1200 messages, "
    "forwarded 1190 (84490 bytes in 31 batches), rejected {'bad_checksum': 7, 'malformed_tlv': 3}, faults 0, "
    "slow subscribers dropped 2, connections 9"
)


def test_parse_stop_summary() -> None:
    summary = parse_stop_summary(["noise", STOP_LINE, "jitrelay market_data relay forwarding time per batch: ..."])
    assert summary is not None
    del summary["line"]
    assert summary == {
        "received": 1200,
        "forwarded": 1190,
        "rejected": {"bad_checksum": 7, "malformed_tlv": 3},
        "faults": {},
        "slow_dropped": 2,
        "connections": 9,
    }
    assert parse_stop_summary(["jitrelay market_data relay listening on /tmp/x.sock"]) is None


def test_log_lines_for_drops_and_torn_messages() -> None:
    lines = [
        "WARNING jitrelay.relay: disconnecting slow subscriber conn=5 pid=81240 uid=1000: 9 bytes pending after 0.5 s",
        "INFO jitrelay.relay: conn=4 pid=81234 uid=1000 closed mid-message; discarded 17 bytes of an unfinished one",
        "INFO jitrelay.relay: conn=6 pid=81250 uid=1000 closed mid-message; discarded 3 bytes of an unfinished one",
        "INFO jitrelay.relay: conn=7 pid=81260 uid=1000 connected",
    ]
    assert slow_dropped_pids(lines) == {81240}
    assert torn_messages(lines) == 2


def test_publisher_and_subscriber_roles(start_relay: StartRelay) -> None:
    """The soak's two client roles, in threads: writes cut mid-message arrive whole, every one, after stalls."""
    relay = start_relay("market_data")
    config = soak.ClientConfig(
        socket_path=str(relay.socket_path),
        domain="market_data",
        domain_id=MARKET_DATA,
        max_payload=MAX_PAYLOAD,
        publisher_rate=3000.0,
        max_size=700,
        stall_prob=1.0,
        stall_max=0.2,
    )
    ctrl = [soak.RUNNING]
    sub_stats, pub_stats = [0] * soak.STATS_LEN, [0] * soak.STATS_LEN
    details = io.StringIO()
    from_start = 1
    subscriber = threading.Thread(
        target=soak.run_subscriber, args=(config, sub_stats, ctrl, random.Random(1), from_start, details)
    )
    subscriber.start()
    with relay.connect() as probe:  # until the subscriber hears a probe, the relay may not have it yet
        deadline = time.monotonic() + 10
        while not sub_stats[soak.PROBES]:
            assert time.monotonic() < deadline, "the subscriber never attached"
            probe.sendall(message(MARKET_DATA, standard_record(1, b"probe")))
            time.sleep(0.02)
        probe.shutdown(socket.SHUT_WR)
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
    assert [sub_stats[slot] for slot in soak.FAILURE_SLOTS.values()] == [0, 0, 0, 0], details.getvalue()
    assert details.getvalue() == ""


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
    ],
)
def test_impossible_soak_is_a_usage_error(args: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["soak", *args]) == 2
    assert error in capsys.readouterr().err


@pytest.mark.timeout(150)
def test_short_soak(tmp_path: Path) -> None:
    """20 s of load with a SIGKILL a second: every message checks out and memory stays flat."""
    report_path = tmp_path / "soak.json"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_JIT"}  # the relay runs compiled
    args = ["--duration", "20", "--rate", "5000", "--churn", "1", "--seed", "1", "--quiet", "--json", str(report_path)]
    done = subprocess.run(
        [sys.executable, "-m", "jitrelay", "soak", *args], capture_output=True, text=True, timeout=140, env=env
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
    summary = report["relay"]["summary"]
    assert summary["rejected"] == {} and summary["faults"] == {}
    assert report["complete_subscribers"]["expected_each"] == summary["forwarded"] - report["relay"]["probes"]
    rss = report["rss"]
    assert 0.8 <= rss["end_mib"] / rss["warmup_mib"] <= 1.2, rss
    assert re.search(r"^  result +OK$", done.stdout, re.MULTILINE), done.stdout
