"""``jitrelay sub`` as a tap (names, JSON, filters) and ``jitrelay run --log-format json``, against a real relay."""

from __future__ import annotations

import json
import re
import signal
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest
from support.commands import SubProcess, stop
from support.reference import extended_record, message, standard_record
from support.relays import StartRelay

from jitrelay.cli import main
from jitrelay.client import Publisher

MARKET_DATA, SIGNAL, EXECUTION = 1, 2, 3
STAMP_NS = 1_700_000_000_000_000_005
STAMP_TEXT = "2023-11-14T22:13:20.000000005Z"


def tap_message(sequence: int, source: int, *records: tuple[int, bytes], domain: int = MARKET_DATA) -> bytes:
    payload = b"".join(standard_record(t, v) for t, v in records)
    return message(domain, payload, source=source, sequence=sequence, timestamp_ns=STAMP_NS)


def test_text_line_names_known_types_and_shows_values_in_hex(start_relay: StartRelay) -> None:
    relay = start_relay("market_data")
    sub = SubProcess(relay, "--count", "2")
    with Publisher("market_data", relay.socket_path) as pub:
        pub.publish_raw(tap_message(9, 4, (1, b"\x01\xab"), (2, b""), (17, b"\xff\x00")))
        pub.publish_raw(message(MARKET_DATA, extended_record(7, bytes(300)), source=5, timestamp_ns=STAMP_NS))
    assert sub.wait() == 0
    assert sub.rest() == [
        f"{STAMP_TEXT} market_data source=4 seq=9 size=42 trade:01ab quote: quote_update:ff00",
        f"{STAMP_TEXT} market_data source=5 seq=0 size=337 l2_reset:{'00' * 300}",
    ]


@pytest.mark.parametrize(
    ("domain", "types", "names"),
    [
        ("market_data", range(1, 8), "trade quote order_book instrument_meta l2_snapshot l2_delta l2_reset"),
        ("signal", range(31, 35), "performance_metrics arbitrage_signal type33 type34"),
        ("signal", range(71, 75), "circuit_breaker strategy_registration type73 type74"),
        ("execution", range(46, 52), "portfolio position balance trade_confirmation type50 type51"),
        ("system", (100, 103, 104, 109, 112), "heartbeat config_update service_discovery type109 sequence_sync"),
        (
            "market_data",
            range(200, 206),
            "pool_info pool_cache_header proprietary_data custom_metrics experimental_signal type205",
        ),
    ],
)
def test_every_domain_has_its_type_names(
    start_relay: StartRelay, domain: str, types: Sequence[int], names: str
) -> None:
    relay = start_relay(domain)
    sub = SubProcess(relay, "--count", "1")
    records = [(t, bytes((t,))) for t in types]
    with Publisher(domain, relay.socket_path, source=1) as pub:
        pub.publish(records, sequence=3, timestamp_ns=STAMP_NS)
    assert sub.wait() == 0
    shown = " ".join(f"{name}:{t:02x}" for name, t in zip(names.split(), types, strict=True))
    size = 32 + 3 * len(types)
    assert sub.rest() == [f"{STAMP_TEXT} {domain} source=1 seq=3 size={size} {shown}"]


def test_json_lines_hold_the_header_and_records(start_relay: StartRelay) -> None:
    relay = start_relay("execution")
    sub = SubProcess(relay, "--json", "--count", "2")
    sent = [
        tap_message(11, 7, (40, b"\x01\x02"), (45, b"\xfe"), domain=EXECUTION),
        tap_message(12, 8, (50, b""), domain=EXECUTION),
    ]
    with Publisher("execution", relay.socket_path) as pub:
        for raw in sent:
            pub.publish_raw(raw)
    assert sub.wait() == 0
    lines = [json.loads(line) for line in sub.rest()]
    common = {"magic": 0xDEADBEEF, "relay_domain": EXECUTION, "domain": "execution", "version": 2, "flags": 0}
    common |= {"timestamp_ns": STAMP_NS, "time": STAMP_TEXT, "checksum_ok": True}
    assert lines == [
        common
        | {
            "source": 7,
            "sequence": 11,
            "payload_size": 7,
            "checksum": zlib.crc32(sent[0][:28] + sent[0][32:]),
            "records": [
                {"type": 40, "name": "order_request", "value_hex": "0102"},
                {"type": 45, "name": "execution_report", "value_hex": "fe"},
            ],
        },
        common
        | {
            "source": 8,
            "sequence": 12,
            "payload_size": 2,
            "checksum": zlib.crc32(sent[1][:28] + sent[1][32:]),
            "records": [{"type": 50, "name": "type50", "value_hex": ""}],
        },
    ]


# (sequence, source, record types) of the messages the filter tests publish, in order.
MIXED = [
    (0, 4, (1,)),
    (1, 5, (2,)),
    (2, 7, (3, 1)),
    (3, 4, (5,)),
    (4, 9, (2, 3)),
    (5, 7, (6,)),
    (6, 4, (2,)),
    (7, 5, (1, 7)),
]


def publish_mixed(socket_path: Path | None) -> None:
    with Publisher("market_data", socket_path) as pub:
        for sequence, source, types in MIXED:
            pub.publish_raw(tap_message(sequence, source, *[(t, bytes((sequence,))) for t in types]))


@pytest.mark.parametrize(
    ("options", "sequences"),
    [
        (("--types", "2,3"), [1, 2, 4, 6]),
        (("--types", "7"), [7]),
        (("--sources", "4,7"), [0, 2, 3, 5, 6]),
        (("--sources", "5", "--types", "1"), [7]),
        (("--types", "1,5", "--sources", "4"), [0, 3]),
    ],
)
def test_filters_keep_exactly_the_matching_messages(
    start_relay: StartRelay, options: tuple[str, ...], sequences: list[int]
) -> None:
    relay = start_relay("market_data")
    shown = SubProcess(relay, "--json", "--count", str(len(sequences)), *options)
    counted = SubProcess(relay, "--count-only", *options)
    publish_mixed(relay.socket_path)
    assert shown.wait() == 0  # --count counts what passed the filters, so it stops after exactly these
    assert [json.loads(line)["sequence"] for line in shown.rest()] == sequences
    assert stop(relay) == 0
    assert counted.wait() == 0
    assert counted.rest() == [str(len(sequences))]


def test_count_stops_at_the_last_match_and_prints_nothing_else(start_relay: StartRelay) -> None:
    relay = start_relay("market_data")
    sub = SubProcess(relay, "--types", "2", "--count", "2")
    publish_mixed(relay.socket_path)
    assert sub.wait() == 0
    assert sub.rest() == [
        f"{STAMP_TEXT} market_data source=5 seq=1 size=35 quote:01",
        f"{STAMP_TEXT} market_data source=9 seq=4 size=38 quote:04 order_book:04",
    ]


@pytest.mark.parametrize("value", ["1,256", "a", "1,,2", "-1"])
def test_bad_filter_lists_exit_2(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sub", "market_data", "--types", value]) == 2
    assert main(["sub", "market_data", "--sources", value]) == 2
    assert "not a comma-separated list of bytes" in capsys.readouterr().err


ISO_MS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


def test_run_log_format_json(start_relay: StartRelay) -> None:
    relay = start_relay("signal", "--log-format", "json")
    with Publisher("signal", relay.socket_path):
        relay.wait_line('"message": "conn=')
    relay.send_signal(signal.SIGINT)
    assert relay.wait_exit(20) == 0
    entries = [json.loads(line) for line in relay.lines]
    assert all(set(e) == {"time", "level", "logger", "message", "domain"} for e in entries)
    assert all(ISO_MS.fullmatch(e["time"]) and e["domain"] == "signal" for e in entries)
    ready = [e for e in entries if e["message"] == f"jitrelay signal relay listening on {relay.socket_path}"]
    assert ready == [ready[0] | {"level": "INFO", "logger": "jitrelay.relay"}]
    assert any(e["message"].startswith("jitrelay signal relay stopped: ") for e in entries)


def test_run_log_format_text_is_the_default(start_relay: StartRelay) -> None:
    relay = start_relay("signal", "--log-format", "text")
    line = relay.wait_line("listening on")
    assert re.fullmatch(
        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} INFO jitrelay.relay: jitrelay signal relay listening on "
        rf"{re.escape(str(relay.socket_path))}",
        line,
    )
