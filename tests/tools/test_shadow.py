"""``jitrelay shadow`` beside a Torq stand-in: real processes, real sockets, every byte accounted for.

Each test runs a jitrelay relay, the Torq stand-in (``jitrelay.testing.torq_relay``,
which sends raw read chunks to every connection), ``jitrelay shadow`` reading
the stand-in and republishing into the relay, and a publisher process that
writes a known mix of messages into the stand-in in awkward pieces. Stopping
the stand-in ends the shadow's source, and the shadow exits with its final
report; the test reads that report from ``--json`` and checks it against the
mix, message for message.

Valid messages use header version 2 and TLV types every domain's ranges keep
(market_data 1–19, signal 20–39); rejects use values no relay accepts.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.relays import StartRelay

from jitrelay.client import Publisher
from jitrelay.core import protocol
from jitrelay.testing.relay import ChildProcess, relay_environ
from jitrelay.tools.shadow import ShadowReport, StreamComparison, Tally, format_report

MARKET_DATA, SIGNAL, EXECUTION = 1, 2, 3
SAMPLE_BYTES = 64
# Write sizes of the publisher process, cycled: splitting headers, records and whole runs of messages.
PIECES = (1, 5, 31, 33, 2, 100, 7, 4096, 3, 65, 1000, 17, 70000)

# Writes argv[2]'s bytes to the socket argv[1] in pieces of argv[3] (comma-separated sizes, cycled), each
# write on its own; then ends its side and reads away what the relay echoes until the relay closes.
_PUBLISHER = """
import itertools, socket, sys, time
data = open(sys.argv[2], "rb").read()
sizes = itertools.cycle(int(s) for s in sys.argv[3].split(","))
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.setblocking(False)
at = 0
while at < len(data):
    piece = data[at : at + next(sizes)]
    sock.setblocking(True)
    sock.sendall(piece)
    at += len(piece)
    time.sleep(0.001)
    sock.setblocking(False)
    try:
        while sock.recv(1 << 20):
            pass
    except BlockingIOError:
        pass
sock.setblocking(True)
sock.shutdown(socket.SHUT_WR)
while sock.recv(1 << 20):
    pass
"""


def publish_in_pieces(socket_path: Path, data: bytes, folder: Path) -> None:
    """Write ``data`` into the relay at ``socket_path`` from a process of its own, in ``PIECES``."""
    stream = folder / "stream.bin"
    stream.write_bytes(data)
    pieces = ",".join(map(str, PIECES))
    subprocess.run([sys.executable, "-c", _PUBLISHER, str(socket_path), str(stream), pieces], check=True, timeout=60)


# (domain id, valid types, the reason a message with a wrong non-zero checksum gets: None where not verified)
DOMAINS = {
    "market_data": (MARKET_DATA, (1, 2, 5, 7, 19), None),
    "signal": (SIGNAL, (20, 21, 22, 39, 30), "bad_checksum"),
}


def message_mix(domain: str, rounds: int = 3, seed: int = 7) -> list[tuple[bytes, str | None]]:
    """Messages for the ``domain`` relay, each with the reject reason it must get (None: forwarded)."""
    ident, types, checksum_reason = DOMAINS[domain]
    big = 30_000 if domain == "signal" else 200_000
    other_domain = EXECUTION if ident != EXECUTION else SIGNAL
    mix: list[tuple[bytes, str | None]] = []
    sequence = 0

    def build(records: list[tuple[int, bytes]] = (), **fields: object) -> bytes:
        nonlocal sequence
        sequence += 1
        fields.setdefault("domain", ident)
        domain_id = fields.pop("domain")
        return protocol.build_message(domain_id, records, source=3, sequence=sequence, **fields)  # type: ignore[arg-type]

    for _ in range(rounds):
        t = types
        valid = [
            build([]),  # a heartbeat: no records
            build([(t[0], b"\x01\xab")]),
            build([(t[1], bytes(range(200))), (t[2], b"")]),
            build([(t[3], bytes(255))]),
            build(payload=protocol.encode_record(t[0], b"ext", extended=True)),  # a short extended record
            build([(t[4], bytes(300)), (t[1], b"q")]),  # 300 bytes: extended
            build([(t[2], bytes([k % 251 for k in range(min(big, 65_535))]))] * (big // 65_535 or 1)),
        ]
        if checksum_reason is None:  # (a verifying relay takes 0, "not computed", only from the checksum change on)
            valid.append(build([(t[0], b"x" * 40)], checksum=0))
        mix += [(raw, None) for raw in valid]
        mix += [
            (build([(t[0], b"v")], version=7), "bad_version"),
            (build([(t[0], b"d")], domain=other_domain), "wrong_domain"),
            (build(payload=bytes([t[0], 5, 0x61, 0x62])), "malformed_tlv"),  # the record overruns the payload
            (build(payload=bytes([0, 1, 0x61])), "malformed_tlv"),  # type 0
            (build([(t[0], b"a"), (150, b"out")]), "tlv_out_of_range"),
            (build([(t[1], b"c" * 50)], checksum=0x12345678), checksum_reason),
        ]
    random.Random(seed).shuffle(mix)
    return mix


def start_stand_in(path: Path) -> ChildProcess:
    stand_in = ChildProcess(
        [sys.executable, "-m", "jitrelay.testing.torq_relay", str(path)],
        ready_marker=f"torq stand-in relay listening on {path}",
        env=relay_environ(),
    )
    stand_in.wait_ready(20)
    return stand_in


def start_shadow(domain: str, source: Path, local: Path, report: Path, *options: str) -> ChildProcess:
    args = [sys.executable, "-m", "jitrelay", "shadow", domain, "--source", str(source), "--socket", str(local)]
    shadow = ChildProcess(
        [*args, "--json", str(report), "--report-every", "0.5", *options],
        ready_marker="republishing into the local relay",
        env=relay_environ(),
    )
    shadow.wait_ready(60)
    return shadow


def shadowed_run(
    start_relay: StartRelay, short_dir: Path, domain: str, data: bytes, *relay_options: str, before=None
) -> tuple[int, dict, ChildProcess]:
    """Relay, stand-in and shadow up; ``data`` published into the stand-in; the stand-in stopped; the report."""
    relay = start_relay(domain, *relay_options)
    source = short_dir / "torq.sock"
    stand_in = start_stand_in(source)
    report_file = short_dir / "shadow.json"
    shadow = start_shadow(domain, source, relay.socket_path, report_file)
    try:
        if before is not None:
            before(relay)
        publish_in_pieces(source, data, short_dir)
        assert stand_in.stop() == 0, stand_in.stderr
        code = shadow.wait_exit(60)
    finally:
        shadow.kill()
        stand_in.kill()
    return code, json.loads(report_file.read_text()), shadow


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_shadow_reports_every_message_and_reject_and_identical_streams(
    start_relay: StartRelay, short_dir: Path, domain: str
) -> None:
    mix = message_mix(domain)
    data = b"".join(raw for raw, _ in mix)
    forwarded = [raw for raw, reason in mix if reason is None]
    code, report, shadow = shadowed_run(start_relay, short_dir, domain, data)

    assert code == 0, shadow.stderr
    assert report["final"] is True and report["ended"] == "source closed"
    assert report["source"] == {"messages": len(mix), "bytes": len(data)}
    expected_side = {"messages": len(forwarded), "bytes": sum(map(len, forwarded))}
    assert report["should_forward"] == expected_side
    assert report["local"] == expected_side
    reasons = [reason for _, reason in mix]
    named = {name for name in protocol.REJECT_NAMES if name in reasons}
    assert named == set(protocol.REJECT_NAMES) - ({"bad_checksum"} if DOMAINS[domain][2] is None else set())
    for name in protocol.REJECT_NAMES:
        entry = report["rejects"][name]
        assert entry["count"] == reasons.count(name), name
        if name not in named:
            assert entry["sample"] is None
            continue
        first = reasons.index(name)
        raw = mix[first][0]
        head = protocol.Header.unpack(raw)
        assert entry["sample"] == {
            "message_index": first,
            "header": {field: getattr(head, field) for field in protocol.HEADER_DTYPE.names},
            "head_hex": raw[:SAMPLE_BYTES].hex(),
        }
    assert report["controls"] == 0 and report["source_fault"] is None and report["local_error"] is None
    assert report["identical"] is True and report["diverged_at"] is None
    assert report["digest"]["should_forward"] == report["digest"]["local"] == digest(b"".join(forwarded))
    assert report["source_unfinished_bytes"] == 0


def test_a_local_relay_with_a_smaller_max_payload_is_reported_as_differing(
    start_relay: StartRelay, short_dir: Path
) -> None:
    mix = message_mix("signal", rounds=1)
    data = b"".join(raw for raw, _ in mix)
    forwarded = [raw for raw, reason in mix if reason is None]
    limit = 64
    first_big = next(k for k, raw in enumerate(forwarded) if len(raw) - protocol.HEADER_SIZE > limit)
    code, report, shadow = shadowed_run(start_relay, short_dir, "signal", data, "--max-payload", str(limit))

    assert code == 1, shadow.stderr
    assert report["identical"] is False
    assert report["diverged_at"] == first_big  # the relay closed the shadow's connection at that message
    assert report["local"]["messages"] == first_big
    assert report["local"]["bytes"] == sum(map(len, forwarded[:first_big]))
    assert report["digest"]["local"] == digest(b"".join(forwarded[:first_big]))


def test_a_message_the_source_never_sent_is_where_the_streams_diverge(start_relay: StartRelay, short_dir: Path) -> None:
    mix = message_mix("market_data", rounds=1)
    data = b"".join(raw for raw, _ in mix)
    forwarded = [raw for raw, reason in mix if reason is None]
    stray = protocol.build_message(MARKET_DATA, [(1, b"not from the source")], source=99)

    def publish_stray(relay) -> None:  # straight into the local relay, as a service still pointed at it would
        with Publisher("market_data", relay.socket_path) as publisher:
            publisher.publish_raw(stray)

    code, report, shadow = shadowed_run(start_relay, short_dir, "market_data", data, before=publish_stray)
    assert code == 1, shadow.stderr
    assert report["identical"] is False and report["diverged_at"] == 0
    assert report["should_forward"]["messages"] == len(forwarded)
    assert report["local"] == {"messages": len(forwarded) + 1, "bytes": len(stray) + sum(map(len, forwarded))}
    assert report["digest"]["local"] == digest(stray + b"".join(forwarded))


def test_a_broken_source_stream_stops_the_source_side_with_its_fault(start_relay: StartRelay, short_dir: Path) -> None:
    good = [protocol.build_message(MARKET_DATA, [(1, bytes([k]) * k)], sequence=k) for k in range(1, 6)]
    garbage = b"\x00\x01\x02\x03" + bytes(60)
    data = b"".join(good) + garbage + good[0]
    code, report, shadow = shadowed_run(start_relay, short_dir, "market_data", data)

    assert code == 1, shadow.stderr
    assert report["ended"] == "source fault"
    assert report["source_fault"] == {
        "reason": "bad_magic",
        "message_index": len(good),
        "stream_offset": sum(map(len, good)),
        "head_hex": garbage[: protocol.HEADER_SIZE].hex(),
    }
    assert report["source"] == {"messages": len(good), "bytes": sum(map(len, good))}
    assert report["identical"] is True  # what came before the fault went through unchanged
    assert report["digest"]["local"] == digest(b"".join(good))
    assert "bad_magic" in shadow.stderr


# The comparison and the report, without processes.


def judged(messages: list[bytes], verdicts: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = b"".join(messages)
    starts = np.cumsum([0] + [len(m) for m in messages[:-1]]).astype(np.int64)
    return np.frombuffer(data, dtype=np.uint8), starts, np.array(verdicts, dtype=np.uint8)


def test_comparison_finds_the_first_differing_message_within_a_batch() -> None:
    messages = [protocol.build_message(MARKET_DATA, [(1, bytes([k]) * k)], sequence=k) for k in range(1, 6)]
    comparison = StreamComparison()
    comparison.expect(b"".join(messages), len(messages))
    comparison.received(b"".join(messages[:2]))
    assert comparison.diverged_at is None and comparison.behind == sum(map(len, messages[2:]))
    changed = messages[3][:-1] + b"\xff"
    comparison.received(messages[2] + changed + messages[4])
    assert comparison.diverged_at == 3 and not comparison.identical
    assert comparison.local_messages == 5 and comparison.expected_messages == 5


def test_comparison_counts_a_message_never_forwarded_as_the_divergence() -> None:
    messages = [protocol.build_message(MARKET_DATA, [(1, b"m")], sequence=k) for k in range(3)]
    comparison = StreamComparison()
    comparison.expect(b"".join(messages), 3)
    comparison.received(b"".join(messages[:2]))
    assert comparison.identical is False and comparison.diverged_at is None  # still owed one
    comparison.finish()
    assert comparison.diverged_at == 2


def test_format_report_lays_out_both_sides_rejects_and_the_verdict() -> None:
    good = protocol.build_message(MARKET_DATA, [(1, b"ok")], sequence=1)
    old = protocol.build_message(MARKET_DATA, [(1, b"v")], sequence=2, version=7)
    tally, comparison = Tally(), StreamComparison()
    tally.add_source(*judged([good, old, good], [protocol.FORWARD, protocol.BAD_VERSION, protocol.FORWARD]))
    comparison.expect(good + good, 2)
    comparison.received(good + good)
    report = ShadowReport("market_data", "/tmp/torq.sock", "/tmp/jr.sock", 2.0, tally, comparison, final=True)
    text = format_report(report)
    assert "jitrelay shadow market_data (final, 2.0 s)" in text
    assert re.search(r"messages\s+3\s+2\n", text) and re.search(rf"bytes\s+{2 * len(good) + len(old)}\s+", text)
    assert re.search(r"\n  bad_version +1  #1 domain=1 version=7 source=0 seq=2 payload=3 ", text)
    assert old[:SAMPLE_BYTES].hex() in text
    assert "streams: identical (2 messages" in text
    assert report.clean and report.as_json()["rejects"]["bad_version"]["count"] == 1
