"""``jitrelay bridge`` end to end: two "hosts" joined through a real three-node NATS cluster.

A host here is a relay in its own socket folder with its own bridge; the
cluster is three nats-server processes on loopback ports
(``jitrelay.nats_cluster``), started and stopped by each test. Clients are
the raw-socket ones of ``test_relay.py``, and every check is on exact bytes
and exact counts: what a subscriber on the far host reads must be exactly the
valid messages published, in order; where NATS loses messages (a node killed
mid-stream), what is missing must be exactly what the bridges report as gaps,
in their log lines and in their metrics.
"""

from __future__ import annotations

import asyncio
import json
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.bridges import (
    GAP_FROM,
    GAP_SUMMARY,
    GAP_TO,
    RECONNECTED,
    WAIT,
    StartHosts,
    Stream,
    end_markers,
    split_stream,
)
from support.clients import DOMAINS, Clients, assert_stream, mixed_messages, sync
from support.relays import relay_environ
from support.streams import send_chunked

from jitrelay.bridge.bridge import HEADER_ROOM
from jitrelay.core.protocol import CONTROL_DOMAIN, SYSTEM, build_message, decode_messages
from jitrelay.testing.nats_cluster import NatsCluster, nats_server_path

if nats_server_path() is None:  # CI installs it (.ci/run); say so loudly rather than skip
    raise RuntimeError("the bridge tests need nats-server: apt-get install nats-server")


# -- streams ---------------------------------------------------------------------------


# -- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_publisher_on_one_host_reaches_subscribers_on_both_exactly(
    cluster: NatsCluster, start_hosts: StartHosts, clients: Clients, domain: str
) -> None:
    a, b = start_hosts(cluster, domain)
    domain_id = DOMAINS[domain][0]
    sub_a = clients.reader(a.relay)
    sub_b = clients.reader(b.relay)
    publisher = clients.connect(a.relay)
    echo = clients.reader(a.relay, publisher)  # the publisher reads too: nothing may come back to it
    sync(publisher, [sub_a, sub_b], domain_id, timeout=WAIT)

    rng = random.Random(f"two hosts {domain}")
    messages = mixed_messages(rng, domain, 800)
    expected = b"".join(m for m, forwarded in messages if forwarded)
    assert 0 < len(expected) < sum(len(m) for m, _ in messages)
    send_chunked(publisher, b"".join(m for m, _ in messages), rng, (1, 3, 32, 100, 700, 4096, 65536))
    for reader in (sub_a, sub_b):
        assert reader.wait_received(len(expected), WAIT), f"{reader.received} of {len(expected)} bytes"
    time.sleep(0.5)  # room for anything that should not come
    assert_stream(sub_a.data, expected, "subscriber on host A")
    assert_stream(sub_b.data, expected, "subscriber on host B")
    assert echo.received == 0 and echo.last_probe == -1, "a message came back to its publisher"

    figures_a, figures_b = a.bridge.metrics(), b.bridge.metrics()
    to_nats = figures_a["jitrelay_bridge_messages_total", (("direction", "to_nats"),)]
    assert to_nats == figures_b["jitrelay_bridge_messages_total", (("direction", "from_nats"),)] > 0
    assert (
        figures_a["jitrelay_bridge_bytes_total", (("direction", "to_nats"),)]
        == (figures_b["jitrelay_bridge_bytes_total", (("direction", "from_nats"),)])
    )
    for figures in (figures_a, figures_b):
        assert figures["jitrelay_bridge_gap_messages_total", (("direction", "to_nats"),)] == 0
        assert figures["jitrelay_bridge_gap_messages_total", (("direction", "from_nats"),)] == 0
        assert figures["jitrelay_bridge_refused_total", ()] == 0
    # No loops: B's bridge sent nothing to NATS and A's got nothing from it.
    assert figures_b["jitrelay_bridge_messages_total", (("direction", "to_nats"),)] == 0
    assert figures_a["jitrelay_bridge_messages_total", (("direction", "from_nats"),)] == 0

    # Invalid messages never crossed: relay B judged only valid ones.
    b.relay.send_signal(signal.SIGTERM)
    assert b.relay.wait_exit(WAIT) == 0
    assert b.relay.find_line("relay stopped:", "rejected 0,"), b.relay.stderr
    a.bridge.send_signal(signal.SIGTERM)
    assert a.bridge.wait_exit(WAIT) == 0
    assert a.bridge.find_line(f"bridge {domain} stopped: to NATS {int(to_nats)} messages")


@pytest.mark.parametrize("side", ["publisher", "subscriber"])
def test_killed_node_mid_stream_reconnects_and_reports_the_gap_exactly(
    cluster: NatsCluster, start_hosts: StartHosts, clients: Clients, side: str
) -> None:
    a, b = start_hosts(cluster, "market_data")
    sub_a, sub_b = clients.reader(a.relay), clients.reader(b.relay)
    publisher = clients.connect(a.relay)
    sync(publisher, [sub_a, sub_b], 1, timeout=WAIT)
    probes = sub_a.last_probe + 1

    stream = Stream(publisher)
    assert sub_b.wait_received(200 * 71, WAIT), "the stream did not reach host B"
    victim = a.bridge if side == "publisher" else b.bridge
    mark = len(victim.lines)
    cluster.kill(victim.nats_node(cluster))
    reconnected = victim.wait_line("reconnected to NATS at", timeout=WAIT, start=mark)
    outage = float(RECONNECTED.search(reconnected).group(1))
    assert outage <= 2.0, f"reconnecting took {outage} s"
    resumed_at = stream.sent
    assert sub_b.wait_for(lambda: sub_b.received > (resumed_at + 500) * 71, WAIT), "the stream did not continue"
    sent = stream.stop()
    markers = end_markers(publisher, [sub_a, sub_b])

    got_a, markers_a = split_stream(bytes(sub_a.data))
    assert got_a == list(range(sent)) and markers_a == markers, "the local subscriber lost messages"
    got_b, markers_b = split_stream(bytes(sub_b.data))
    assert got_b[-1] > resumed_at
    missing = (sent - len(got_b)) + (markers - markers_b)
    gap = b.bridge.gap("from_nats")
    assert gap == (missing, 71 * missing), f"{missing} messages missing on host B, its bridge reports {gap}"
    assert b.bridge.gap_lines(GAP_FROM) == gap
    # What the publishing bridge could not send, it logged and counted; the rest it handed to NATS.
    lost_a = a.bridge.gap("to_nats")
    assert a.bridge.gap_lines(GAP_TO) == lost_a
    handed = a.bridge.figure("messages_total", direction="to_nats")
    assert handed + lost_a[0] == probes + sent + markers
    assert victim.figure("reconnects_total") == 1


def test_reconnect_buffer_overflow_is_a_counted_logged_gap(start_hosts: StartHosts, clients: Clients) -> None:
    """With the only node down, the publishing bridge buffers what it can and counts the rest; nothing is silent."""
    with NatsCluster(1) as single:
        a, b = start_hosts(single, "market_data", 2, "--reconnect-buffer", "64KiB")
        sub_a, sub_b = clients.reader(a.relay), clients.reader(b.relay)
        publisher = clients.connect(a.relay)
        sync(publisher, [sub_a, sub_b], 1, timeout=WAIT)
        probes = sub_a.last_probe + 1
        stream = Stream(publisher)
        assert sub_b.wait_received(200 * 71, WAIT)
        mark = len(a.bridge.lines)
        single.kill(0)
        a.bridge.wait_line("disconnected from NATS", timeout=WAIT, start=mark)
        time.sleep(1.0)  # ~1.7 MB published while NATS is away: far more than the 64 KiB buffer
        single.restart(0)
        a.bridge.wait_line("reconnected to NATS", timeout=WAIT, start=mark)
        b.bridge.wait_line("reconnected to NATS", timeout=WAIT, start=0)
        resumed_at = stream.sent
        assert sub_b.wait_for(lambda: sub_b.received > (resumed_at + 500) * 71, WAIT)
        sent = stream.stop()
        markers = end_markers(publisher, [sub_b])

        lost = a.bridge.gap("to_nats")
        assert lost[0] > 0 and lost[1] == 71 * lost[0]
        assert a.bridge.gap_lines(GAP_TO) == lost
        assert a.bridge.find_line("gap to NATS", "65536-byte reconnect buffer is full")
        handed = a.bridge.figure("messages_total", direction="to_nats")
        assert handed + lost[0] == probes + sent + markers
        got_b, markers_b = split_stream(bytes(sub_b.data))
        missing = (sent - len(got_b)) + (markers - markers_b)
        assert missing >= lost[0]
        gap = b.bridge.gap("from_nats")
        assert gap == (missing, 71 * missing)
        assert b.bridge.gap_lines(GAP_FROM) == gap


class NatsTap:
    """A plain NATS subscriber on a thread: every message on ``subject`` as (headers, data)."""

    def __init__(self, url: str, subject: str) -> None:
        self.messages: queue.Queue[tuple[dict[str, str] | None, bytes]] = queue.Queue()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(url, subject),), daemon=True)
        self._thread.start()
        assert self._ready.wait(WAIT), "the NATS tap did not subscribe"

    async def _run(self, url: str, subject: str) -> None:
        import nats

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        nc = await nats.connect(url)

        async def keep(msg: object) -> None:
            self.messages.put((msg.headers, msg.data))  # type: ignore[attr-defined]

        await nc.subscribe(subject, cb=keep)
        await nc.flush()
        self._ready.set()
        await self._stop.wait()
        await nc.close()

    def close(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT)


def nats_publish(url: str, subject: str, payloads: list[bytes]) -> None:
    """Publish each payload as one NATS message, as a foreign client would."""

    async def publish() -> None:
        import nats

        nc = await nats.connect(url)
        for payload in payloads:
            await nc.publish(subject, payload)
        await nc.flush()
        await nc.close()

    asyncio.run(publish())


def test_nats_messages_hold_whole_messages_within_max_payload(start_hosts: StartHosts, clients: Clients) -> None:
    with NatsCluster(3, max_payload=4096) as small:
        a, b = start_hosts(small, "market_data")
        tap = NatsTap(small.urls[2], "jitrelay.market_data")
        try:
            sub_b = clients.reader(b.relay)
            publisher = clients.connect(a.relay)
            sync(publisher, [sub_b], 1, timeout=WAIT)
            rng = random.Random("max payload")
            sizes = [rng.choice((0, 1, 8, 37, 255, 300, 1000, 1500)) for _ in range(1500)]
            messages = [build_message(1, [(2, rng.randbytes(n))], sequence=i) for i, n in enumerate(sizes)]
            too_big = build_message(1, [(3, b"x" * 5000)], sequence=5000)
            publisher.sendall(b"".join(messages[:700]) + too_big + b"".join(messages[700:]))  # one write, ~650 KB
            expected = b"".join(messages)
            assert sub_b.wait_received(len(expected), WAIT), f"{sub_b.received} of {len(expected)} bytes"
            time.sleep(0.5)
            assert_stream(sub_b.data, expected, "subscriber on host B")

            seen = b""
            while len(seen) < len(expected) + 64:  # the probes came first
                headers, data = tap.messages.get(timeout=WAIT)
                assert len(data) <= 4096 - HEADER_ROOM
                assert headers is not None and "Jitrelay-Sequence" in headers
                assert b"".join(m.raw for m in decode_messages(data)) == data  # whole messages only
                seen += data
                if seen.endswith(messages[-1]):
                    break
            assert seen.endswith(expected)
            assert too_big not in seen
        finally:
            tap.close()
        line = a.bridge.wait_line("gap to NATS: 1 messages (5037 bytes)")
        assert "larger than NATS max_payload 4096" in line
        assert a.bridge.gap("to_nats") == (1, 5037)
        assert b.bridge.gap("from_nats") == (1, 5037)
        assert b.bridge.gap_lines(GAP_FROM) == (1, 5037)


def test_what_a_foreign_publisher_puts_on_the_subject_is_judged_again(
    cluster: NatsCluster, start_hosts: StartHosts, clients: Clients
) -> None:
    (b,) = start_hosts(cluster, "signal", 1)
    sub_b = clients.reader(b.relay)
    local = clients.connect(b.relay)
    sync(local, [sub_b], 2, timeout=WAIT)
    good = [build_message(2, [(20, b"good %d" % i)], sequence=i) for i in range(4)]
    bad_crc = build_message(2, [(20, b"bad crc")], checksum=1)
    wrong_domain = build_message(1, [(1, b"market data")])
    payloads = [
        good[0] + bad_crc + good[1],  # framed: the relay drops the bad one
        good[2][:-3],  # torn: refused whole
        b"\x00" * 8 + good[2],  # bad magic: refused whole
        build_message(CONTROL_DOMAIN, [(102, b"")]),  # a control message would change what the bridge receives
        wrong_domain + build_message(SYSTEM, [(100, bytes(16))]) + good[3],  # Torq's heartbeat: data, not control
        build_message(2, [(20, b"x" * 40000)]),  # above the signal domain's 32 KiB: refused whole
    ]
    nats_publish(cluster.urls[0], "jitrelay.signal", payloads)
    expected = good[0] + good[1] + good[3]
    assert sub_b.wait_received(len(expected), WAIT)
    time.sleep(0.5)
    assert_stream(sub_b.data, expected, "subscriber on host B")
    assert b.bridge.figure("refused_total") == 4
    for why in ("unfinished message", "bad_magic at byte 0", "control message", "oversize at byte 0"):
        assert b.bridge.find_line("refusing a NATS message", why), why
    # The relay judged the framed ones, and the bridge's connection to it never broke.
    assert b.relay.find_line("closing connection") is None
    b.relay.send_signal(signal.SIGTERM)
    assert b.relay.wait_exit(WAIT) == 0
    assert b.relay.find_line("relay stopped:", "'wrong_domain': 2", "'bad_checksum': 1"), b.relay.stderr


def test_bridge_logs_its_figures_and_stops_when_its_relay_goes(
    cluster: NatsCluster, start_hosts: StartHosts, clients: Clients
) -> None:
    (a,) = start_hosts(cluster, "execution", 1)
    mark = len(a.bridge.lines)
    a.bridge.send_signal(signal.SIGUSR1)
    a.bridge.wait_line("jitrelay bridge execution running: to NATS", start=mark)
    a.relay.send_signal(signal.SIGTERM)
    assert a.relay.wait_exit(WAIT) == 0
    assert a.bridge.wait_exit(WAIT) == 1
    assert a.bridge.find_line("ERROR", f"the execution relay at {a.relay.socket_path} closed the connection")
    assert a.bridge.find_line("jitrelay bridge execution stopped:")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--nats", "nats://127.0.0.1:1"], 1, "no market_data relay at"),
        (["--nats", "nats://127.0.0.1:1", "--subject", "jitrelay.*"], 2, "not a NATS subject"),
        ([], 2, "--nats"),
    ],
)
def test_bridge_command_line_errors(short_dir: Path, args: list[str], code: int, message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "jitrelay", "bridge", "market_data", "--socket", str(short_dir / "none.sock"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=relay_environ(),
    )
    assert done.returncode == code, done.stderr
    assert message in done.stderr


def test_bench_runs_w1_and_w2_through_the_bridges(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "jitrelay", "bench", "--no-progress", "--relays", "jitrelay,bridge",
            "--workloads", "w1,w2", "--subscribers", "1", "--duration", "0.5", "--rate", "500",
            "--startup-runs", "0", "--json", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**relay_environ(), "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    runs = {(r["relay"], r["workload"]): r for r in report["runs"]}
    for workload in ("w1", "w2"):
        run = runs["bridge", workload]
        sub = run["per_subscriber"][0]
        assert run["sent"] > 0 and sub["received"] > 0 and sub["bad_magic"] == 0 and sub["partial_bytes"] == 0, run
        # Core NATS may drop a subscriber that falls behind at full speed (W1): every loss is a reported gap.
        stopped = run["bridges"]["host B bridge"]
        gap = GAP_SUMMARY.search(stopped)
        assert gap and int(gap.group(1)) == run["lost_total"], (stopped, run["lost_total"])
    assert runs["bridge", "w2"]["lost_total"] == 0  # paced: nothing to drop
    bridged_w1, local_w1 = runs["bridge", "w1"], runs["jitrelay", "w1"]
    ratio = bridged_w1["ratio_to_local"]["delivered_msg_per_s"]
    assert ratio == bridged_w1["delivered_msg_per_s_mean"] / local_w1["delivered_msg_per_s_mean"]
    added = runs["bridge", "w2"]["latency_added_us"]
    local, bridged = runs["jitrelay", "w2"]["latency_us"], runs["bridge", "w2"]["latency_us"]
    assert added == {"p50": bridged["p50"] - local["p50"], "p99": bridged["p99"] - local["p99"]}
    assert "bridge" in done.stdout and "added by the bridge" in done.stdout
