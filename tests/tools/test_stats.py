"""``jitrelay stats`` against live relays: exact counts in the table, --url, --watch rates, and no relay."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.commands import stats, tables, total
from support.relays import RelayProcess, StartRelay

from jitrelay.core import protocol
from jitrelay.core.protocol import build_message
from jitrelay.tools.stats import Reading, format_table, stats_socket_path

TIMEOUT = 10.0


def send_known_traffic(relay: RelayProcess) -> tuple[int, int, int]:
    """Three good messages and two of the wrong domain; (good, rejected, bytes sent) once the relay has judged all."""
    good = [build_message(protocol.MARKET_DATA, [(1, b"x" * n)], sequence=n) for n in (1, 50, 500)]
    wrong = [build_message(protocol.SIGNAL, [(20, b"s")]) for _ in range(2)]
    stream = good[0] + wrong[0] + good[1] + wrong[1] + good[2]
    with relay.connect(TIMEOUT) as subscriber, relay.connect(TIMEOUT) as publisher:
        subscriber.settimeout(TIMEOUT)
        wait_until_open(relay, 2)
        publisher.sendall(stream)
        expected = b"".join(good)
        got = subscriber.recv(len(expected), socket.MSG_WAITALL)
        assert got == expected
    return len(good), len(wrong), len(stream)


def wait_until_open(relay: RelayProcess, n: int) -> None:
    """Until the relay counts ``n`` connections (read from its stats socket)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        result = stats("market_data", "--socket", str(relay.socket_path))
        if result.returncode == 0 and total(tables(result.stdout)[0], "connections open") == n:
            return
        assert time.monotonic() < deadline, result.stdout + result.stderr
        time.sleep(0.05)


def test_table_shows_exact_counts(start_relay: StartRelay) -> None:
    relay = start_relay("market_data")
    good, wrong, sent = send_known_traffic(relay)
    result = stats("market_data", "--socket", str(relay.socket_path))
    assert result.returncode == 0, result.stderr
    (table,) = tables(result.stdout)
    assert table["title"] == [f"jitrelay market_data relay ({stats_socket_path(relay.socket_path)})"]
    assert total(table, "messages received") == good + wrong
    assert total(table, "messages forwarded") == good
    assert total(table, "messages rejected wrong_domain") == wrong
    assert total(table, "messages rejected tlv_out_of_range") == 0
    assert total(table, "bytes received") == sent
    assert total(table, "connections accepted") == 2
    assert total(table, "connection faults bad_magic") == 0
    assert "forwarding time per batch: mean " in result.stdout


def test_url_reads_the_http_endpoint(start_relay: StartRelay) -> None:
    relay = start_relay("market_data", "--metrics-port", "0")
    port = re.search(r"127\.0\.0\.1:(\d+)", relay.wait_line("metrics on http://")).group(1)  # type: ignore[union-attr]
    good, wrong, sent = send_known_traffic(relay)
    over_http = stats("market_data", "--url", f"127.0.0.1:{port}")
    over_socket = stats("market_data", "--socket", str(relay.socket_path))
    assert over_http.returncode == 0, over_http.stderr
    (table,) = tables(over_http.stdout)
    assert table["title"] == [f"jitrelay market_data relay (http://127.0.0.1:{port}/metrics)"]
    assert total(table, "messages received") == good + wrong and total(table, "bytes received") == sent
    # Both places serve the same figures (the process's own, such as its CPU time, move between reads).
    (by_socket,) = tables(over_socket.stdout)
    moving = {"title", "cpu seconds", "resident memory bytes"}
    assert {k: v for k, v in table.items() if k not in moving} == {
        k: v for k, v in by_socket.items() if k not in moving
    }
    wrong_domain = stats("signal", "--url", f"127.0.0.1:{port}")
    assert wrong_domain.returncode == 1
    assert "no jitrelay figures for the signal domain" in wrong_domain.stderr


@pytest.fixture
def trickle() -> Iterator[threading.Event]:
    """A publisher sending a message every 10 ms from a thread, from when the test sets the event to its end."""
    stop = threading.Event()
    yield stop
    stop.set()


def test_watch_shows_rates(start_relay: StartRelay, trickle: threading.Event) -> None:
    relay = start_relay("market_data")
    message = build_message(protocol.MARKET_DATA, [(1, b"tick")])

    def publish() -> None:
        with relay.connect(TIMEOUT) as publisher:
            while not trickle.is_set():
                publisher.sendall(message)
                time.sleep(0.01)

    threading.Thread(target=publish, daemon=True).start()
    result = stats("market_data", "--socket", str(relay.socket_path), "--watch", "--count", "2")
    assert result.returncode == 0, result.stderr
    first, second = tables(result.stdout)
    assert first["title"][0].endswith(")") and first[""] == ["total"]
    match = re.search(r"over the last (\d+\.\d\d) s$", second["title"][0])
    assert match, second["title"]
    elapsed = float(match.group(1))
    assert second[""] == ["total", "change", "per second"]
    before, after = total(first, "messages received"), total(second, "messages received")
    change, rate = second["messages received"][1:]
    assert after > before and int(change.replace(",", "")) == after - before
    assert float(rate.replace(",", "")) == pytest.approx((after - before) / elapsed, rel=0.02, abs=0.1)
    assert total(second, "bytes received") - total(first, "bytes received") == (after - before) * len(message)
    assert len(second["connections open"]) == 1, "a gauge has no rate"


def test_no_relay(short_dir: Path) -> None:
    result = stats("market_data", "--socket", str(short_dir / "market_data.sock"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"jitrelay stats: no market_data relay is running at {short_dir}/market_data.sock")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = stats("market_data", "--url", f"http://127.0.0.1:{port}/metrics")
    assert result.returncode == 1
    assert f"jitrelay stats: cannot read http://127.0.0.1:{port}/metrics" in result.stderr


def test_stats_socket_admits_only_allowed_peers(start_relay: StartRelay) -> None:
    other_uid = 4242 if os.getuid() != 4242 else 4343
    relay = start_relay("execution", "--allow-uid", str(other_uid), "--no-journal")
    result = stats("execution", "--socket", str(relay.socket_path))
    assert result.returncode == 1
    assert "sent no figures" in result.stderr
    relay.wait_line("refusing stats reader", f"uid={os.getuid()}")


def test_stats_socket_is_removed_on_exit_and_replaced_after_a_kill(start_relay: StartRelay) -> None:
    first = start_relay("market_data")
    assert first.socket_path is not None
    path = stats_socket_path(first.socket_path)
    assert path.is_socket() and oct(path.stat().st_mode & 0o777) == "0o660"
    first.proc.kill()
    first.wait_exit(10)
    assert path.is_socket(), "SIGKILL leaves the stats socket behind"
    left_behind = stats("market_data", "--socket", str(first.socket_path))
    assert left_behind.returncode == 1 and "no market_data relay is running" in left_behind.stderr

    second = start_relay("market_data", socket_path=first.socket_path)
    result = stats("market_data", "--socket", str(second.socket_path))
    assert result.returncode == 0, result.stderr
    assert total(tables(result.stdout)[0], "messages received") == 0
    second.send_signal(signal.SIGTERM)
    assert second.wait_exit(10) == 0
    assert not path.exists() and not first.socket_path.exists()


def test_format_table_rates() -> None:
    def reading(taken: float, received: float, open_now: float) -> Reading:
        return Reading(
            "signal",
            taken,
            {
                ("jitrelay_messages_received_total", ()): received,
                ("jitrelay_connections_open", ()): open_now,
                ("jitrelay_messages_rejected_total", (("reason", "bad_checksum"),)): 2.0,
            },
        )

    text = format_table(reading(14.0, 2500.0, 3.0), reading(10.0, 500.0, 5.0), "here")
    lines = text.splitlines()
    assert lines[0] == "jitrelay signal relay (here), over the last 4.00 s"
    rows = {re.split(r"\s{2,}", line.strip())[0]: re.split(r"\s{2,}", line.strip())[1:] for line in lines[1:]}
    assert rows["messages received"] == ["2,500", "+2,000", "500.0"]
    assert rows["messages rejected bad_checksum"] == ["2", "+0", "0.0"]
    assert rows["connections open"] == ["3"]
    assert lines[-1] == "forwarding time per batch: no batches yet"
