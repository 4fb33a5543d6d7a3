"""``jitrelay stats --url`` against live bridges: the bridge's table, exact counts both ways, gaps, NATS client
drops, --watch rates.

Two "hosts" joined through a real three-node NATS cluster, with the fixtures
of ``conftest.py`` here; each bridge serves its figures with ``--metrics-port 0``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.bridges import MARK_SOURCE, WAIT, BridgeProcess, StartHosts, end_markers
from support.clients import Clients, sync
from support.commands import stats, tables, total
from support.relays import StartRelay

from jitrelay.core.protocol import build_message, decode_messages
from jitrelay.testing.nats_cluster import NatsCluster
from jitrelay.tools.stats import Reading, format_table

PROBE_SIZE = 32  # a sync probe is a bare header


def endpoint(bridge: BridgeProcess) -> str:
    line = bridge.wait_line("metrics on http://")
    return re.search(r"metrics on (http://\S+)", line).group(1)  # type: ignore[union-attr]


def bridge_table(bridge: BridgeProcess, domain: str = "market_data") -> dict[str, list[str]]:
    url = endpoint(bridge)
    result = stats(domain, "--url", url)
    assert result.returncode == 0, result.stderr
    (table,) = tables(result.stdout)
    assert table["title"] == [f"jitrelay {domain} bridge ({url})"]
    return table


def wait_for_total(bridge: BridgeProcess, row: str, value: int) -> dict[str, list[str]]:
    """The bridge's table once ``row`` has reached ``value`` (its counters move a moment after delivery)."""
    deadline = time.monotonic() + WAIT
    while True:
        table = bridge_table(bridge)
        if total(table, row) >= value:
            return table
        assert time.monotonic() < deadline, f"{row}: {total(table, row)} of {value}"
        time.sleep(0.1)


def test_bridge_table_shows_exact_traffic_and_gaps_both_ways(start_hosts: StartHosts, clients: Clients) -> None:
    with NatsCluster(3, max_payload=4096) as cluster:
        a, b = start_hosts(cluster, "market_data")
        sub_b = clients.reader(b.relay)
        publisher = clients.connect(a.relay)
        sync(publisher, [sub_b], 1, timeout=WAIT)
        probes = sub_b.last_probe + 1
        before_b = bridge_table(b.bridge)  # every probe B will ever see has been counted: they arrive in order

        sizes = [0, 1, 37, 300, 1000, 1500] * 50
        messages = [build_message(1, [(2, bytes([n % 251]) * n)], sequence=i) for i, n in enumerate(sizes)]
        too_big = build_message(1, [(3, b"x" * 5000)], sequence=9999)  # more than a 4096-byte NATS message holds
        publisher.sendall(b"".join(messages[:100]) + too_big + b"".join(messages[100:]))
        sent = b"".join(messages)
        assert sub_b.wait_received(len(sent), WAIT), f"{sub_b.received} of {len(sent)} bytes"

        table_a = wait_for_total(a.bridge, "messages to NATS", probes + len(messages))
        table_b = wait_for_total(b.bridge, "messages from NATS", total(before_b, "messages from NATS") + len(messages))
        assert total(table_a, "messages to NATS") == probes + len(messages)
        assert total(table_a, "bytes to NATS") == probes * PROBE_SIZE + len(sent)
        assert total(table_a, "gap to NATS messages") == 1
        assert total(table_a, "gap to NATS bytes") == len(too_big) == 5037
        assert total(table_a, "gaps to NATS") == 1
        assert total(table_a, "messages from NATS") == total(table_a, "bytes from NATS") == 0
        assert total(table_a, "NATS messages received") == 0

        def grew(row: str) -> int:
            return total(table_b, row) - total(before_b, row)

        assert grew("messages from NATS") == len(messages)
        assert grew("bytes from NATS") == len(sent)
        assert total(table_b, "NATS messages received") == total(table_a, "NATS messages sent")
        assert total(table_a, "NATS messages sent") >= len(sent) // 4096
        assert grew("gap from NATS messages") == 1 and grew("gap from NATS bytes") == 5037
        assert total(table_b, "gaps from NATS") == 1
        assert total(table_b, "messages to NATS") == total(table_b, "gap to NATS messages") == 0
        for table in (table_a, table_b):
            assert total(table, "NATS messages refused") == 0
            assert total(table, "reconnects") == 0
            assert table["seconds disconnected"] == ["0"]
            assert total(table, "connected to NATS") == 1
            assert total(table, "resident memory bytes") > 0

        summary = stats("market_data", "--url", endpoint(a.bridge)).stdout.splitlines()[-1]
        share = 100 / (probes + len(messages) + 1)
        sent_size = round(total(table_a, "bytes to NATS") / total(table_a, "NATS messages sent"))
        assert summary.startswith(f"to NATS {share:.2f}% of messages lost, {sent_size:,}")
        assert summary.endswith("; from NATS 0.00% of messages lost, 0 bytes per NATS message")

        wrong_domain = stats("signal", "--url", endpoint(a.bridge))
        assert wrong_domain.returncode == 1
        assert "no jitrelay figures for the signal domain" in wrong_domain.stderr


def big(sequence: int) -> bytes:
    """Stream message ``sequence``: 4,036 bytes, the bytes a function of the number alone."""
    return build_message(1, [(1, sequence.to_bytes(8, "little") * 500)], source=1, sequence=sequence, timestamp_ns=0)


def test_nats_client_drops_while_the_relay_is_behind_are_counted_exactly(
    cluster: NatsCluster, start_relay: StartRelay, clients: Clients, short_dir: Path
) -> None:
    """Host B's relay stalls (block policy, a subscriber that stops reading): its bridge's NATS client holds
    at most --nats-pending-limit and drops the rest; every drop shows in stats and in the gap, and nothing else
    is lost."""
    limit = 2 << 20
    relays = []
    for name, options in (("a", ()), ("b", ("--slow-policy", "block"))):
        (short_dir / name).mkdir()
        relays.append(start_relay("market_data", *options, socket_path=short_dir / name / "market_data.sock"))
    bridges = [
        BridgeProcess("market_data", relay.socket_path, cluster.servers, ("--nats-pending-limit", str(limit)))
        for relay in relays
    ]
    try:
        for bridge in bridges:
            bridge.wait_ready()
        bridge_a, bridge_b = bridges
        sub_b = clients.reader(relays[1])
        publisher = clients.connect(relays[0])
        sync(publisher, [sub_b], 1, timeout=WAIT)
        before_a, before_b = bridge_table(bridge_a), bridge_table(bridge_b)

        sub_b.pause()
        sent = 0
        deadline = time.monotonic() + WAIT

        def stalled() -> bool:
            """Bridge B has dropped, and NATS messages wait for its relay even with nothing more coming."""
            if not (bridge_b.figure("client_drops_total") and bridge_b.figure("nats_pending_bytes")):
                return False
            time.sleep(0.2)
            return bridge_b.figure("nats_pending_bytes") > 0

        while not stalled():
            publisher.sendall(b"".join(big(sent + k) for k in range(500)))  # 2 MB
            sent += 500
            assert time.monotonic() < deadline, f"no drop after {sent} messages"
        stalled_table = bridge_table(bridge_b)
        assert 0 < total(stalled_table, "NATS pending bytes") < limit
        sub_b.resume()
        markers = end_markers(publisher, [sub_b])

        got, got_markers = [], 0
        for message in decode_messages(bytes(sub_b.data)):
            if message.header.source == MARK_SOURCE:
                got_markers += 1
                continue
            assert message.raw == big(message.header.sequence), f"message {message.header.sequence} altered"
            got.append(message.header.sequence)
        assert got == sorted(set(got)) and set(got) <= set(range(sent)), "duplicated, out of order or unknown"
        missing, missing_markers = sent - len(got), markers - got_markers
        table_a, table_b = bridge_table(bridge_a), bridge_table(bridge_b)

        def grew(table: dict[str, list[str]], before: dict[str, list[str]], row: str) -> int:
            return total(table, row) - total(before, row)

        drops = total(table_b, "NATS messages dropped by the client")
        assert drops > 0 and missing > 0
        assert grew(table_b, before_b, "gap from NATS messages") == missing + missing_markers
        assert grew(table_b, before_b, "gap from NATS bytes") == missing * len(big(0)) + missing_markers * 71
        # Only the client dropped: the server kept the connection, and every NATS message sent was received or dropped.
        assert total(table_b, "reconnects") == 0
        assert (
            grew(table_a, before_a, "NATS messages sent") == grew(table_b, before_b, "NATS messages received") + drops
        )
        assert grew(table_a, before_a, "messages to NATS") == sent + markers
        assert total(table_a, "gap to NATS messages") == 0
        assert total(table_b, "NATS pending bytes") == 0
        assert bridge_b.find_line("NATS: the relay is behind and 2097152 bytes wait for it")
    finally:
        for bridge in bridges:
            bridge.kill()


@pytest.fixture
def trickle() -> Iterator[threading.Event]:
    stop = threading.Event()
    yield stop
    stop.set()


def test_bridge_watch_shows_rates(start_hosts: StartHosts, clients: Clients, trickle: threading.Event) -> None:
    with NatsCluster(3) as cluster:
        a, b = start_hosts(cluster, "market_data")
        message = build_message(1, [(1, b"tick")])

        def publish() -> None:
            with a.relay.connect(WAIT) as publisher:
                while not trickle.is_set():
                    publisher.sendall(message)
                    time.sleep(0.01)

        threading.Thread(target=publish, daemon=True).start()
        wait_for_total(b.bridge, "messages from NATS", 1)
        result = stats("market_data", "--url", endpoint(b.bridge), "--watch", "--count", "2", "--interval", "0.5")
        assert result.returncode == 0, result.stderr
        first, second = tables(result.stdout)
        assert first[""] == ["total"] and second[""] == ["total", "change", "per second"]
        elapsed = float(re.search(r"over the last (\d+\.\d\d) s$", second["title"][0]).group(1))  # type: ignore[union-attr]
        before, after = total(first, "messages from NATS"), total(second, "messages from NATS")
        change, rate = second["messages from NATS"][1:]
        assert after > before and int(change.replace(",", "")) == after - before
        assert float(rate.replace(",", "")) == pytest.approx((after - before) / elapsed, rel=0.02, abs=0.1)
        assert total(second, "bytes from NATS") - total(first, "bytes from NATS") == (after - before) * len(message)
        assert second["messages to NATS"][1:] == ["+0", "0.0"]
        assert len(second["connected to NATS"]) == 1, "a gauge has no rate"


def test_format_bridge_table() -> None:
    def reading(taken: float, to_nats: float, lost: float) -> Reading:
        return Reading(
            "signal",
            taken,
            {
                ("jitrelay_bridge_messages_total", (("direction", "to_nats"),)): to_nats,
                ("jitrelay_bridge_bytes_total", (("direction", "to_nats"),)): to_nats * 100,
                ("jitrelay_bridge_nats_messages_total", (("direction", "to_nats"),)): to_nats / 10,
                ("jitrelay_bridge_gap_messages_total", (("direction", "from_nats"),)): lost,
                ("jitrelay_bridge_messages_total", (("direction", "from_nats"),)): 3 * lost,
                ("jitrelay_bridge_disconnected_seconds_total", ()): 0.25,
                ("jitrelay_bridge_connected", ()): 1.0,
            },
        )

    text = format_table(reading(12.0, 3000.0, 10.0), reading(10.0, 1000.0, 10.0), "here")
    lines = text.splitlines()
    assert lines[0] == "jitrelay signal bridge (here), over the last 2.00 s"
    rows = {re.split(r"\s{2,}", line.strip())[0]: re.split(r"\s{2,}", line.strip())[1:] for line in lines[1:-1]}
    assert rows["messages to NATS"] == ["3,000", "+2,000", "1,000.0"]
    assert rows["bytes to NATS"] == ["300,000", "+200,000", "100,000.0"]
    assert rows["gap from NATS messages"] == ["10", "+0", "0.0"]
    assert rows["seconds disconnected"] == ["0.25", "+0", "0.0"]
    assert rows["connected to NATS"] == ["1"]
    assert "messages received" not in rows
    assert lines[-1] == (
        "to NATS 0.00% of messages lost, 1,000 bytes per NATS message; "
        "from NATS 25.00% of messages lost, 0 bytes per NATS message"
    )


def test_nats_client_reads_are_widened() -> None:
    """The bridge's read size reaches nats-py only through a module constant its read loop looks up: fail loudly
    if a nats-py release stops reading it, since the receiving bridge's CPU per byte depends on it."""
    import inspect

    import nats.aio.client

    from jitrelay.bridge import bridge

    assert "DEFAULT_BUFFER_SIZE" in inspect.getsource(nats.aio.client.Client._read_loop)
    saved = nats.aio.client.DEFAULT_BUFFER_SIZE
    try:
        nats.aio.client.DEFAULT_BUFFER_SIZE = 32768
        bridge._widen_nats_reads()
        assert nats.aio.client.DEFAULT_BUFFER_SIZE == bridge.NATS_READ_SIZE == 1 << 20
    finally:
        nats.aio.client.DEFAULT_BUFFER_SIZE = saved
