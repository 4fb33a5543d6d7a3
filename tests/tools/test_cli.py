"""The ``jitrelay`` command line: exit codes, ``pub`` and ``sub`` against a real relay."""

from __future__ import annotations

import json
import signal
import zlib
from pathlib import Path

import pytest
from support import torq
from support.commands import SubProcess, jitrelay, receive, stop
from support.reference import extended_record, message, standard_record
from support.relays import RelayProcess, StartRelay

from jitrelay.cli import main
from jitrelay.client import Publisher, Subscriber
from jitrelay.core import protocol

MARKET_DATA, SIGNAL = 1, 2


# --- the command line itself ---------------------------------------------------------------------------------------


def test_help() -> None:
    result = jitrelay("--help")
    assert result.returncode == 0
    for command in ("run", "pub", "sub"):
        assert command in result.stdout
    result = jitrelay("run", "--help")
    assert result.returncode == 0 and "--slow-policy" in result.stdout and "market_data" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["bogus"],
        ["run", "bogus"],
        ["sub", "fx"],
        ["pub", "market_data", "--count", "-1"],
        ["pub", "market_data", "--count", "many"],
        ["pub", "market_data", "--rate", "fast"],
        ["pub", "market_data", "--rate", "-5"],
        ["pub", "market_data", "--source", "256"],
        ["run", "market_data", "--slow-policy", "sometimes"],
        ["run", "market_data", "--pending-limit", "ten"],
        ["run", "market_data", "--no-such-option"],
    ],
)
def test_bad_command_lines_exit_2(args: list[str]) -> None:
    result = jitrelay(*args)
    assert result.returncode == 2
    assert "usage: jitrelay" in result.stderr and "error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: jitrelay" in capsys.readouterr().err


def test_run_rejects_impossible_limits(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "market_data", "--pending-limit", "0", "--socket", "/tmp/unused.sock"]) == 2
    assert "pending_low" in capsys.readouterr().err


@pytest.mark.parametrize("size", [0, 33, 290, 292, 65573])
def test_pub_refuses_sizes_one_record_cannot_make(size: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pub", "market_data", "--size", str(size), "--socket", "/tmp/unused.sock"]) == 2
    err = capsys.readouterr().err
    assert f"cannot make a {size}-byte message" in err and "34 to 289" in err and "293 to 65572" in err


def test_pub_and_sub_without_a_relay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.sock"
    for command in ("pub", "sub"):
        assert main([command, "execution", "--socket", str(missing)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("jitrelay: no execution relay at ") and "jitrelay run execution" in err


# --- jitrelay run --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_refuses_a_second_relay_and_stops_cleanly(start_relay: StartRelay, signum: int) -> None:
    relay = start_relay("signal", "--log-level", "debug", "--max-payload", "64KiB")
    second = jitrelay("run", "signal", "--socket", str(relay.socket_path))
    assert second.returncode == 1
    assert second.stderr.startswith("jitrelay: ") and str(relay.socket_path) in second.stderr
    assert "Traceback" not in second.stderr
    # The first relay still works, with its overridden limit: a 40 KiB payload passes.
    with Subscriber("signal", relay.socket_path) as sub, Publisher("signal", relay.socket_path) as pub:
        pub.publish([(20, bytes(40000))])
        assert len(receive(sub, 32 + 5 + 40000)) == 40037
    assert stop(relay, signum) == 0
    assert not relay.socket_path.exists()
    assert "DEBUG jitrelay.relay: " in relay.stderr


def test_run_reports_a_socket_it_cannot_create() -> None:
    result = jitrelay("run", "market_data", "--socket", "/proc/no-such-folder/market_data.sock")
    assert result.returncode == 1
    assert "jitrelay: cannot run the market_data relay on /proc/no-such-folder/market_data.sock: " in result.stderr
    assert "Traceback" not in result.stderr


# --- jitrelay pub --------------------------------------------------------------------------------------------------


def test_pub_sends_exactly_what_was_asked(market_relay: RelayProcess, capsys: pytest.CaptureFixture[str]) -> None:
    with Subscriber("market_data", market_relay.socket_path) as sub:
        argv = ["pub", "market_data", "--socket", str(market_relay.socket_path), "--count", "50", "--source", "9"]
        assert main([*argv, "--batch", "7"]) == 0
        got = list(protocol.decode_messages(receive(sub, 50 * 71)))
        assert sub.recv_batch(timeout=0.2) is None
    assert "jitrelay pub market_data: 50 messages of 71 bytes in " in capsys.readouterr().err
    value = bytes(i % 251 for i in range(37))
    assert [m.raw for m in got] == [
        message(MARKET_DATA, standard_record(1, value), source=9, sequence=i, timestamp_ns=m.header.timestamp_ns)
        for i, m in enumerate(got)
    ]


def test_pub_extended_records_pass_a_verifying_relay(start_relay: StartRelay) -> None:
    relay = start_relay("signal")
    with Subscriber("signal", relay.socket_path) as sub:
        argv = ["pub", "signal", "--socket", str(relay.socket_path), "--count", "20", "--size", "300", "--rate", "2000"]
        result = jitrelay(*argv, "--batch", "3")
        assert result.returncode == 0, result.stderr
        assert "20 messages of 300 bytes" in result.stderr
        got = list(protocol.decode_messages(receive(sub, 20 * 300)))
    value = bytes(i % 251 for i in range(263))
    assert [m.raw for m in got] == [
        message(SIGNAL, extended_record(20, value), sequence=i, timestamp_ns=m.header.timestamp_ns)
        for i, m in enumerate(got)
    ]
    assert all(zlib.crc32(m.raw[:28] + m.raw[32:]) == m.header.checksum for m in got)


# --- jitrelay sub --------------------------------------------------------------------------------------------------


def test_sub_prints_one_line_per_message_and_stops_at_count(market_relay: RelayProcess) -> None:
    sub = SubProcess(market_relay, "--count", "3")
    with Publisher("market_data", market_relay.socket_path, source=3) as pub:
        for seq in range(5):
            pub.publish(
                [(1, bytes([seq, 0xAB])), (19, b"")], sequence=100 + seq, timestamp_ns=1_700_000_000_000_000_005
            )
    assert sub.wait() == 0
    assert sub.rest() == [
        f"2023-11-14T22:13:20.000000005Z market_data source=3 seq={100 + seq} size=38 trade:{seq:02x}ab "
        "state_invalidation_reason:"
        for seq in range(3)
    ]


def test_sub_shm_prints_what_it_reads_from_the_mapped_log(market_relay: RelayProcess) -> None:
    sub = SubProcess(market_relay, "--shm", "--count", "3")
    assert any("reading its log from shared memory" in line for line in sub.stderr)
    market_relay.wait_line("reads the log from shared memory", timeout=10)
    with Publisher("market_data", market_relay.socket_path, source=5) as pub:
        for seq in range(4):
            pub.publish([(2, bytes([seq]))], sequence=seq, timestamp_ns=1_700_000_000_000_000_005)
    assert sub.wait() == 0
    assert sub.rest() == [
        f"2023-11-14T22:13:20.000000005Z market_data source=5 seq={seq} size=35 quote:{seq:02x}" for seq in range(3)
    ]


def test_sub_count_only(market_relay: RelayProcess) -> None:
    sub = SubProcess(market_relay, "--count-only", "--count", "1000")
    with Publisher("market_data", market_relay.socket_path) as pub:
        pub.publish_batch(protocol.build_batch(MARKET_DATA, 1500, [(1, bytes(37))]))
    assert sub.wait() == 0
    assert sub.rest() == ["1000"]


def test_sub_stops_quietly_on_sigint_and_on_relay_shutdown(start_relay: StartRelay) -> None:
    relay = start_relay("execution")
    printing = SubProcess(relay, "--count", "0")
    counting = SubProcess(relay, "--count-only")
    with Subscriber("execution", relay.socket_path) as witness, Publisher("execution", relay.socket_path) as pub:
        for _ in range(4):
            pub.publish([(40, b"fill")])
        receive(witness, 4 * 38)  # forwarded to every subscriber by now
    assert len(printing.lines(4)) == 4
    printing.proc.send_signal(signal.SIGINT)
    assert printing.wait() == 0
    assert "Traceback" not in "".join(printing.stderr)
    assert stop(relay) == 0
    assert counting.wait() == 0
    assert counting.rest() == ["4"]


def test_sub_from_a_position_prints_what_follows_it_and_where_it_stopped(market_relay: RelayProcess) -> None:
    with Subscriber("market_data", market_relay.socket_path, positions=True) as probe:
        probe.recv_batch(timeout=0.5)  # only the relay's first notice: where the stream stands now
        start = probe.position
    assert start is not None
    with Publisher("market_data", market_relay.socket_path, source=4) as pub:
        for seq in range(5):
            pub.publish([(1, bytes([seq]))], sequence=seq, timestamp_ns=1_700_000_000_000_000_005)
    first = SubProcess(market_relay, "--from", str(start), "--count", "2")
    assert first.wait() == 0
    assert [line.split()[3] for line in first.rest()] == ["seq=0", "seq=1"]
    (told,) = [line for line in first.stderr if "position" in line]
    middle = protocol.Position.parse(told.split()[3])
    assert (middle.epoch, middle.message) == (start.epoch, start.message + 2)
    second = SubProcess(market_relay, "--from", str(middle), "--count", "3")
    assert second.wait() == 0
    assert [line.split()[3] for line in second.rest()] == ["seq=2", "seq=3", "seq=4"]


def test_sub_rejects_a_position_that_is_not_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sub", "market_data", "--from", "not-a-position"]) == 2
    assert "not a position" in capsys.readouterr().err


def test_sub_with_reconnect_goes_on_across_a_relay_restart_and_says_what_it_means(start_relay: StartRelay) -> None:
    relay = start_relay("market_data")
    sub = SubProcess(relay, "--reconnect", "--positions", "--count", "2", "--json")
    with Publisher("market_data", relay.socket_path, source=3) as pub:
        pub.publish([(1, b"before")], sequence=1)
        assert json.loads(sub.lines(1)[0])["sequence"] == 1
        relay.proc.kill()
        relay.proc.wait(10)
        start_relay("market_data")
        pub.publish([(1, b"after")], sequence=2)  # waits for the new relay, then goes out
    assert sub.wait() == 0
    assert [json.loads(line)["sequence"] for line in sub.rest()] == [2]
    assert any("the relay has restarted since that position" in line for line in sub.stderr), "".join(sub.stderr)


def test_sub_json_prints_a_torq_trade_field_by_field(market_relay: RelayProcess) -> None:
    """A trade as Torq's kraken adapter builds it (support.torq): every field by Torq's name, exact integers."""
    sub = SubProcess(market_relay, "--json", "--count", "1")
    with Publisher("market_data", market_relay.socket_path) as pub:
        pub.publish_raw(torq.trade_direct())
    assert sub.wait() == 0
    (line,) = sub.rest()
    (record,) = json.loads(line)["records"]
    assert record == {
        "type": 1,
        "name": "trade",
        "fields": {
            "asset_id": torq.BTC,
            "price": 5_734_210_000_000,
            "volume": 2_500_000,
            "execution_timestamp_ns": torq.T0 - 350_000,
            "venue_id": torq.VENUE_KRAKEN,
            "asset_type": torq.ASSET_COIN,
            "reserved": 0,
            "side": 1,
            "_padding": "0x000000",
        },
        "value_hex": torq.trade_value().hex(),
    }


def test_sub_prints_a_torq_trade_by_field(market_relay: RelayProcess) -> None:
    sub = SubProcess(market_relay, "--count", "1")
    with Publisher("market_data", market_relay.socket_path) as pub:
        pub.publish_raw(torq.trade_direct())
    assert sub.wait() == 0
    assert sub.rest() == [
        "2024-09-10T09:20:00.123456789Z market_data source=2 seq=1042 size=74 trade asset=BTC price=57342.10000000 "
        f"volume=0.02500000 execution_timestamp_ns={torq.T0 - 350_000} venue=Kraken asset_type=Coin side=sell"
    ]
