"""``jitrelay bridge --jetstream``: two "hosts" joined through a JetStream stream on a real three-node cluster.

Every check is on exact bytes: what a subscriber on host B reads must be
every stream message published on host A, once each, in order, byte for
byte, through a NATS node killed under the sending bridge, the receiving
bridge SIGKILLed and restarted, and the sending bridge SIGKILLed and
restarted (it then resumes from the relay's journal). A stream that is full
holds the sending relay back under ``block`` and is a counted gap on a lossy
domain.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.bridges import (
    GAP_FROM,
    GAP_TO,
    WAIT,
    BridgeProcess,
    Host,
    StartHosts,
    Stream,
    numbered,
    order,
    stream_sequences,
)
from support.clients import Clients, sync
from support.commands import stats, tables, total
from support.processes import killed_at_teardown

from jitrelay.testing.nats_cluster import NatsCluster, nats_server_path

if nats_server_path() is None:
    raise RuntimeError("the bridge tests need nats-server: apt-get install nats-server")

ORDER_SIZE = len(order(0))


@pytest.fixture
def js_cluster() -> Iterator[NatsCluster]:
    with NatsCluster(3, jetstream=True) as nats:
        yield nats


@pytest.fixture
def restarted() -> Iterator[list[BridgeProcess]]:
    """Bridges a test starts again after killing one; killed at teardown."""
    yield from killed_at_teardown()


def restart(host: Host, cluster: NatsCluster, restarted: list[BridgeProcess]) -> BridgeProcess:
    """SIGKILL a host's bridge and start it again with the same options (same host name, same state)."""
    old = host.bridge
    old.send_signal(signal.SIGKILL)
    old.wait_exit(WAIT)
    options = tuple(old.args[old.args.index("--metrics-port") + 2 :])
    host.bridge = BridgeProcess(old.domain, old.socket_path, cluster.servers, options)
    restarted.append(host.bridge)
    host.bridge.wait_ready()
    return host.bridge


def wait_for_all(reader: object, sent: int, size: int, timeout: float = WAIT) -> None:
    """Until the reader holds every stream message's bytes, then until it has been quiet for a moment."""
    assert reader.wait_for(lambda: reader.received >= sent * size, timeout), f"{reader.received} bytes"  # type: ignore[attr-defined]
    time.sleep(0.5)  # room for a duplicate that should not come


@pytest.mark.parametrize("case", ["node", "receiver", "sender"])
def test_execution_crosses_exactly_once_through_kills(
    js_cluster: NatsCluster, start_hosts: StartHosts, clients: Clients, restarted: list[BridgeProcess], case: str
) -> None:
    a, b = start_hosts(js_cluster, "execution")
    assert a.bridge.find_line("JetStream stream JITRELAY_EXECUTION as host host0")
    sub_a, sub_b = clients.reader(a.relay), clients.reader(b.relay)
    publisher = clients.connect(a.relay)
    sync(publisher, [sub_a, sub_b], 3, timeout=WAIT)
    stream = Stream(publisher, order)
    assert sub_b.wait_for(lambda: len(stream_sequences(bytes(sub_b.data), order)) >= 500, WAIT)
    if case == "node":
        mark = len(a.bridge.lines)
        js_cluster.kill(a.bridge.nats_node(js_cluster))
        a.bridge.wait_line("reconnected to NATS at", timeout=WAIT, start=mark)
    elif case == "receiver":
        restart(b, js_cluster, restarted)
    else:
        restart(a, js_cluster, restarted)
        assert a.bridge.find_line("sending from journal")
    resumed_at = stream.sent
    assert sub_b.wait_for(lambda: sub_b.received > (resumed_at + 500) * ORDER_SIZE, WAIT), "the stream did not go on"
    sent = stream.stop()
    try:
        wait_for_all(sub_b, sent, ORDER_SIZE)
    except AssertionError:
        got = stream_sequences(bytes(sub_b.data), order)
        missing = sorted(set(range(sent)) - set(got))
        raise AssertionError(
            f"missing {len(missing)}: {missing[:5]}..{missing[-5:]}; {b.bridge.stderr[-3000:]}"
        ) from None

    assert stream_sequences(bytes(sub_a.data), order) == list(range(sent)), "the local subscriber lost messages"
    got = stream_sequences(bytes(sub_b.data), order)
    assert got == list(range(sent)), f"host B: {len(got)} of {sent}, {len(got) - len(set(got))} twice"
    for bridge in (a.bridge, b.bridge):
        assert bridge.gap("to_nats") == (0, 0) and bridge.gap("from_nats") == (0, 0)
        assert bridge.gap_lines(GAP_FROM) == (0, 0) and bridge.gap_lines(GAP_TO) == (0, 0)
    # Nothing came back from B: its bridge read A's messages in its own journal and skipped them.
    assert b.bridge.figure("messages_total", direction="to_nats") == 0
    assert b.bridge.figure("js_echoes_total") > 0


# 48 MB through a stream that holds 2 MiB for 1 s: a minute on this machine alone, more beside the rest of the suite.
@pytest.mark.timeout(300)
def test_full_stream_holds_the_relay_back_under_block(
    js_cluster: NatsCluster, start_hosts: StartHosts, clients: Clients
) -> None:
    """A stream of 2 MiB kept 1 s: a 24 MB burst waits in the relay (its publisher paused) and arrives whole."""
    a, b = start_hosts(
        js_cluster,
        "execution",
        2,
        "--max-bytes",
        "2MiB",
        "--max-age",
        "1",
        "--max-in-flight",
        "4",
        "--no-journal",
        relay_options=("--log-size", "8MiB"),  # the burst fills the log up to the bridge's cursor
    )
    sub_b = clients.reader(b.relay)
    publisher = clients.connect(a.relay)
    sync(publisher, [sub_b], 3, timeout=WAIT)
    count = 600_000  # ~48 MB: more than the bridge's socket, outbox and the 8 MiB log can absorb while it waits
    burst = b"".join(order(i) for i in range(count))
    publisher.settimeout(4 * WAIT)
    publisher.sendall(burst)  # returns once the relay has read it all: it holds its publisher meanwhile
    assert a.bridge.wait_line("the stream is full", timeout=WAIT)
    wait_for_all(sub_b, count, ORDER_SIZE, timeout=4 * WAIT)
    assert stream_sequences(bytes(sub_b.data), order) == list(range(count))
    assert a.relay.find_line("the log is full up to the slowest subscriber"), "the relay never held its publisher"
    assert a.bridge.find_line("the stream takes messages again")
    assert a.bridge.gap("to_nats") == (0, 0) and b.bridge.gap("from_nats") == (0, 0)
    assert a.bridge.figure("js_stream_full_total") > 0


def test_full_stream_is_a_counted_gap_on_a_lossy_domain(
    js_cluster: NatsCluster, start_hosts: StartHosts, clients: Clients
) -> None:
    """market_data (disconnect) over JetStream: what the full stream refused is exactly the gap, both ends."""
    a, b = start_hosts(js_cluster, "market_data", 2, "--jetstream", "--max-bytes", "256KiB", "--max-age", "1")
    sub_b = clients.reader(b.relay)
    publisher = clients.connect(a.relay)
    sync(publisher, [sub_b], 1, timeout=WAIT)
    count = 40_000
    publisher.sendall(b"".join(numbered(i) for i in range(count)))  # 2.8 MB: far more than the stream holds
    deadline = time.monotonic() + WAIT
    while a.bridge.figure("js_stream_full_total") == 0:
        assert time.monotonic() < deadline, "the stream never refused a publish"
        time.sleep(0.1)
    time.sleep(1.5)  # the stream empties with age
    tail = count + 100
    publisher.sendall(b"".join(numbered(i) for i in range(count, tail)))  # after the gap, so B sees where it ends
    assert "the stream is full" in a.bridge.wait_line("gap to NATS", timeout=WAIT)
    assert sub_b.wait_for(lambda: bytes(sub_b.data).endswith(numbered(tail - 1)), WAIT)
    got = stream_sequences(bytes(sub_b.data))
    assert got == sorted(set(got)) and got[-100:] == list(range(count, tail))
    missing = tail - len(got)
    assert missing > 0
    assert a.bridge.gap("to_nats") == (missing, 71 * missing) == a.bridge.gap_lines(GAP_TO)
    assert b.bridge.gap("from_nats") == (missing, 71 * missing) == b.bridge.gap_lines(GAP_FROM)


def test_stats_shows_the_stream_the_window_and_the_consumer_lag(
    js_cluster: NatsCluster, start_hosts: StartHosts, clients: Clients
) -> None:
    a, b = start_hosts(js_cluster, "execution")
    sub_b = clients.reader(b.relay)
    publisher = clients.connect(a.relay)
    sync(publisher, [sub_b], 3, timeout=WAIT)
    publisher.sendall(b"".join(order(i) for i in range(2000)))
    wait_for_all(sub_b, 2000, ORDER_SIZE)
    assert stream_sequences(bytes(sub_b.data), order) == list(range(2000))
    deadline = time.monotonic() + WAIT
    while True:  # the stream and consumer figures are refreshed once a second
        table_a, table_b = (bridge_table(bridge, "execution") for bridge in (a.bridge, b.bridge))
        settled = total(table_b, "messages from NATS") >= 2000 and total(table_b, "consumer unacknowledged") == 0
        settled = settled and total(table_a, "stream messages") == total(table_a, "NATS messages sent") > 0
        if settled and total(table_b, "consumer lag messages") == 0:
            break
        assert time.monotonic() < deadline, (table_a, table_b)
        time.sleep(0.2)
    assert total(table_a, "publishes awaiting ack") == 0
    assert total(table_a, "messages to NATS") == total(table_b, "messages from NATS")
    assert total(table_a, "stream bytes") > total(table_a, "bytes to NATS")  # with the headers
    for row in ("publishes refused: stream full", "redelivered, not written again", "held for the one before"):
        assert total(table_a, row) == total(table_b, row) == 0, row
    assert total(table_b, "journal echoes skipped") == total(table_b, "messages from NATS")
    assert total(table_b, "messages to NATS") == 0


def bridge_table(bridge: BridgeProcess, domain: str) -> dict[str, list[str]]:
    url = re.search(r"metrics on (http://\S+)", bridge.wait_line("metrics on http://")).group(1)  # type: ignore[union-attr]
    result = stats(domain, "--url", url)
    assert result.returncode == 0, result.stderr
    (table,) = tables(result.stdout)
    return table


def test_messages_aged_out_while_a_host_was_away_are_its_counted_gap(
    js_cluster: NatsCluster, start_hosts: StartHosts, clients: Clients, restarted: list[BridgeProcess]
) -> None:
    """The stream keeps messages 2 s; host B's bridge is away for longer: what aged out is B's gap, exactly."""
    a, b = start_hosts(js_cluster, "execution", 2, "--max-age", "2")
    sub_b = clients.reader(b.relay)
    publisher = clients.connect(a.relay)
    sync(publisher, [sub_b], 3, timeout=WAIT)
    b.bridge.send_signal(signal.SIGKILL)
    b.bridge.wait_exit(WAIT)
    publisher.sendall(b"".join(order(i) for i in range(3000)))
    a.bridge.wait_line("jitrelay bridge", timeout=1)  # (it is running)
    deadline = time.monotonic() + WAIT
    while a.bridge.figure("messages_total", direction="to_nats") < 3000:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(3)  # past the stream's max age
    publisher.sendall(b"".join(order(i) for i in range(3000, 3100)))
    restart(b, js_cluster, restarted)
    assert sub_b.wait_for(lambda: bytes(sub_b.data).endswith(order(3099)), WAIT)
    time.sleep(0.5)
    assert stream_sequences(bytes(sub_b.data), order) == list(range(3000, 3100))
    line = b.bridge.wait_line("gap from NATS", timeout=WAIT)
    assert "3000 messages (240000 bytes) of bridge host0 never arrived" in line
    assert b.bridge.gap("from_nats") == (3000, 240000) == b.bridge.gap_lines(GAP_FROM)
    assert a.bridge.gap("to_nats") == (0, 0)


def test_after_a_kill_mid_write_the_journal_says_what_the_relay_took(tmp_path: Path) -> None:
    """The state saved before a write names the batch; what the journal holds of it counts as written."""
    from jitrelay.bridge.jetstream.carrier import JetStreamCarrier as Bridge
    from jitrelay.bridge.jetstream.journal import JournalTail
    from jitrelay.bridge.jetstream.state import BridgeState
    from jitrelay.bridge.options import BridgeOptions

    journal = tmp_path / "journal"
    journal.mkdir()
    local = [order(i, source=9) for i in range(3)]
    remote = [order(100 + i) for i in range(4)]
    # The relay journaled a local message, the first two of the remote batch, then a local one; the rest never came.
    (journal / "execution-000001.journal").write_bytes(local[0] + remote[0] + remote[1] + local[1])
    options = BridgeOptions("execution", ("nats://127.0.0.1:1",), socket_path=tmp_path / "execution.sock", host="b")
    bridge = Bridge(options)
    bridge.state = BridgeState(tmp_path / "state")
    bridge.state.streams = {"a": (10, 800)}
    keys = [m[:32].hex() for m in remote]
    bridge.state.pending = [["a", 10, 800, keys[:3], [len(m) for m in remote[:3]]], ["c", 0, 0, keys[3:], [80]]]
    bridge._reconcile(JournalTail(journal, "execution"), None)
    assert bridge.state.streams == {"a": (12, 800 + len(remote[0]) + len(remote[1]))}
    assert bridge.state.pending == []
