"""The relay's Prometheus endpoint, scraped over real HTTP from a real relay process.

Every count is compared exactly with the traffic the test sent: messages and
bytes in and out, rejects and faults by reason, refusals, slow-subscriber
actions, and the forwarding-time histogram's shape.
"""

from __future__ import annotations

import itertools
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from support.relays import RelayProcess, StartRelay

from jitrelay.client import Publisher, Subscriber
from jitrelay.core import protocol
from jitrelay.core.histogram import Histogram
from jitrelay.core.protocol import build_message
from jitrelay.core.units import KiB
from jitrelay.server.exposition import cumulative_buckets
from jitrelay.server.metrics import FORWARDING_BUCKETS

TIMEOUT = 10.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_port(relay: RelayProcess) -> int:
    line = relay.wait_line("metrics on http://127.0.0.1:", timeout=TIMEOUT)
    match = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
    assert match, line
    return int(match.group(1))


def fetch(port: int) -> tuple[str, str]:
    """The exposition text and its content type, over HTTP."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as response:
        return response.read().decode(), response.headers["Content-Type"]


def parse(text: str) -> Samples:
    """Every sample line, by name and labels; a plain parser, so the test does not trust the library it checks."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        assert match, line
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        samples[match.group(1), labels] = float(match.group(3))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset({"domain": "market_data", **labels}.items())]


def scrape(port: int) -> Samples:
    return parse(fetch(port)[0])


def wait_for(port: int, check: Callable[[Samples], bool], what: str) -> Samples:
    deadline = time.monotonic() + TIMEOUT
    while True:
        samples = scrape(port)
        if check(samples):
            return samples
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.02)


def open_connections(port: int, n: int) -> Samples:
    return wait_for(port, lambda s: value(s, "jitrelay_connections_open") == n, f"{n} connections open")


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"closed after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


def reads_eof(sock: socket.socket) -> bool:
    """True once the relay has closed (or reset) ``sock``; everything it sent before is discarded."""
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    return True


def valid(n: int) -> bytes:
    return build_message(protocol.MARKET_DATA, [(1, bytes(range(n % 256)) * (1 + n // 256))], sequence=n)


def test_figures_match_the_traffic_exactly(start_relay: StartRelay) -> None:
    relay = start_relay("market_data", "--metrics-port", "0", "--max-connections", "3")
    port = metrics_port(relay)
    subscriber, publisher = relay.connect(TIMEOUT), relay.connect(TIMEOUT)
    open_connections(port, 2)

    good = [valid(n) for n in (3, 40, 300, 1000, 7)]
    rejects = {
        "wrong_domain": [build_message(protocol.SIGNAL, [(20, b"sig")]), build_message(protocol.EXECUTION, [])],
        "tlv_out_of_range": [build_message(protocol.MARKET_DATA, [(t, b"x")]) for t in (20, 40, 199)],
        "bad_version": [build_message(protocol.MARKET_DATA, [(1, b"v3")], version=3)],
        "malformed_tlv": [build_message(protocol.MARKET_DATA, payload=b"\x01\x09short")],
    }
    bad = [m for messages in rejects.values() for m in messages]
    good.append(valid(11))
    # Good and bad alternate, and a good message comes last: once the subscriber has it, all were judged.
    stream = b"".join(m for pair in itertools.zip_longest(good[:-1], bad, fillvalue=b"") for m in pair) + good[-1]
    publisher.sendall(stream)
    assert recv_exactly(subscriber, sum(map(len, good))) == b"".join(good)

    # A connection that sends two good messages and then a bad magic number is closed after forwarding them.
    faulty = relay.connect(TIMEOUT)
    faulty_good = [valid(5), valid(500)]
    faulty_stream = b"".join(faulty_good) + build_message(protocol.MARKET_DATA, [(1, b"x")], magic=0x0BADF00D)
    faulty.sendall(faulty_stream)
    assert recv_exactly(subscriber, sum(map(len, faulty_good))) == b"".join(faulty_good)
    assert reads_eof(faulty)
    faulty.close()
    open_connections(port, 2)

    # A third connection fills the limit of 3; a fourth is refused.
    third = relay.connect(TIMEOUT)
    open_connections(port, 3)
    fourth = relay.connect(TIMEOUT)
    assert reads_eof(fourth)
    fourth.close()
    samples = wait_for(
        port, lambda s: value(s, "jitrelay_connections_refused_total", reason="connection_limit") == 1, "refused"
    )

    forwarded = good + faulty_good
    assert value(samples, "jitrelay_messages_received_total") == len(forwarded) + len(bad)
    assert value(samples, "jitrelay_messages_forwarded_total") == len(forwarded)
    for reason in protocol.REJECT_NAMES:
        expected = len(rejects.get(reason, []))
        assert value(samples, "jitrelay_messages_rejected_total", reason=reason) == expected, reason
    assert value(samples, "jitrelay_bytes_received_total") == len(stream) + len(faulty_stream)
    assert value(samples, "jitrelay_bytes_forwarded_total") == sum(map(len, forwarded))
    assert value(samples, "jitrelay_connection_faults_total", reason="bad_magic") == 1
    assert value(samples, "jitrelay_connection_faults_total", reason="oversize") == 0
    assert value(samples, "jitrelay_connections_open") == 3
    assert value(samples, "jitrelay_connections_accepted_total") == 4
    assert value(samples, "jitrelay_connections_refused_total", reason="not_allowed") == 0
    assert value(samples, "jitrelay_subscriber_pending_bytes_max") == 0
    assert value(samples, "jitrelay_slow_subscriber_actions_total", action="hold") == 0
    assert value(samples, "jitrelay_slow_subscriber_actions_total", action="disconnect") == 0
    assert value(samples, "jitrelay_journal_errors_total") == 0

    # One forwarding time per batch that forwarded anything: at least one per write of the publishers.
    batches = value(samples, "jitrelay_forwarding_seconds_count")
    assert 2 <= batches <= len(forwarded)
    for family in (
        "jitrelay_forwarding_seconds",
        "jitrelay_forwarding_own_seconds",
        "jitrelay_forwarding_send_seconds",
    ):
        buckets = sorted(
            (float(dict(labels)["le"]), n) for (name, labels), n in samples.items() if name == f"{family}_bucket"
        )
        assert [bound for bound, _ in buckets] == [*FORWARDING_BUCKETS, float("inf")]
        counts = [n for _, n in buckets]
        assert counts == sorted(counts) and counts[-1] == value(samples, f"{family}_count")
    assert value(samples, "jitrelay_forwarding_seconds_sum") > 0
    # Every batch reached the subscriber through the send loop: the relay's own part and the send calls'
    # part were timed for each, and together they never exceed the whole.
    assert value(samples, "jitrelay_forwarding_own_seconds_count") == batches
    assert value(samples, "jitrelay_forwarding_send_seconds_count") == batches
    parts = value(samples, "jitrelay_forwarding_own_seconds_sum") + value(
        samples, "jitrelay_forwarding_send_seconds_sum"
    )
    assert 0 < parts <= value(samples, "jitrelay_forwarding_seconds_sum")
    for sock in (subscriber, publisher, third):
        sock.close()


def test_subscriptions_are_counted(start_relay: StartRelay) -> None:
    relay = start_relay("market_data", "--metrics-port", "0")
    port = metrics_port(relay)
    quotes, also_quotes, trades_from_4 = (relay.connect(TIMEOUT) for _ in range(3))
    quotes.sendall(protocol.subscribe_message(tlv_types=[2]))
    also_quotes.sendall(protocol.subscribe_message(tlv_types=[2]) + protocol.unsubscribe_message())
    also_quotes.sendall(protocol.subscribe_message(tlv_types=[2]))
    malformed = build_message(protocol.CONTROL_DOMAIN, [(protocol.SUBSCRIBE_SOURCES, bytes(8))])
    trades_from_4.sendall(malformed + protocol.subscribe_message([1], [4]))
    samples = wait_for(port, lambda s: value(s, "jitrelay_subscription_changes_total") == 5, "five changes applied")
    assert value(samples, "jitrelay_control_messages_total") == 5
    assert value(samples, "jitrelay_subscriber_groups") == 2  # types {2} twice, and types {1} from source 4
    assert value(samples, "jitrelay_messages_rejected_total", reason="malformed_tlv") == 1
    assert value(samples, "jitrelay_messages_forwarded_total") == 0
    trades_from_4.close()
    samples = wait_for(port, lambda s: value(s, "jitrelay_subscriber_groups") == 1, "one group left")
    for sock in (quotes, also_quotes):
        sock.close()


def test_exposition_format(start_relay: StartRelay) -> None:
    relay = start_relay("market_data", "--metrics-port", "0")
    text, content_type = fetch(metrics_port(relay))
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    helps = dict(re.findall(r"^# HELP (\S+) (.+)$", text, re.MULTILINE))
    expected = {
        "jitrelay_messages_received_total": "counter",
        "jitrelay_messages_forwarded_total": "counter",
        "jitrelay_messages_rejected_total": "counter",
        "jitrelay_bytes_received_total": "counter",
        "jitrelay_bytes_forwarded_total": "counter",
        "jitrelay_connection_faults_total": "counter",
        "jitrelay_connections_open": "gauge",
        "jitrelay_connections_accepted_total": "counter",
        "jitrelay_connections_refused_total": "counter",
        "jitrelay_subscriber_pending_bytes_max": "gauge",
        "jitrelay_slow_subscriber_actions_total": "counter",
        "jitrelay_never_reading_publishers_total": "counter",
        "jitrelay_never_reading_publishers": "gauge",
        "jitrelay_never_reading_unsent_messages_total": "counter",
        "jitrelay_never_reading_unsent_bytes_total": "counter",
        "jitrelay_journal_errors_total": "counter",
        "jitrelay_forwarding_seconds": "histogram",
        "jitrelay_control_messages_total": "counter",
        "jitrelay_subscriber_groups": "gauge",
        "jitrelay_subscription_changes_total": "counter",
    }
    for name, kind in expected.items():
        assert families.get(name) == kind, name
        assert len(helps.get(name, "")) > 10, name
    samples = parse(text)
    jitrelay = [labels for name, labels in samples if name.startswith("jitrelay_")]
    assert jitrelay and all(("domain", "market_data") in labels for labels in jitrelay)
    assert samples["process_resident_memory_bytes", frozenset()] > 0
    # Served on the loopback address only.
    assert listening_address(metrics_port(relay)) == "127.0.0.1"


def listening_address(port: int) -> str:
    """The local address of the TCP socket listening on ``port``, from /proc/net/tcp."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if int(hex_port, 16) == port and state == "0A":
                return socket.inet_ntoa(bytes.fromhex(address)[::-1])
    raise AssertionError(f"nothing listens on port {port}")


def test_metrics_port_in_use_is_an_error(start_relay: StartRelay) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        relay = start_relay("market_data", "--metrics-port", str(port), ready=False)
        assert relay.wait_exit(60) == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in relay.stderr
    assert relay.socket_path is not None and not relay.socket_path.exists()


@pytest.fixture
def flood() -> Iterator[Callable[[socket.socket], None]]:
    """Publish on a socket from a thread until the test ends or the relay goes away."""
    stop = threading.Event()
    threads = []

    def start(sock: socket.socket) -> None:
        batch = b"".join(valid(n) for n in range(64))

        def run() -> None:
            sock.settimeout(0.2)
            while not stop.is_set():
                try:
                    sock.sendall(batch)
                except TimeoutError:
                    continue
                except OSError:
                    return

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    stop.set()
    for thread in threads:
        thread.join(5)


@pytest.mark.parametrize("policy", ["block", "disconnect"])
def test_slow_subscriber_actions(start_relay: StartRelay, flood: Callable[[socket.socket], None], policy: str) -> None:
    limit = 256 * KiB
    options = ["--slow-policy", policy, "--pending-limit", str(limit), "--slow-timeout", "0.3", "--log-size", "8MiB"]
    relay = start_relay("market_data", "--metrics-port", "0", *options)
    port = metrics_port(relay)
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(str(relay.socket_path))
    publisher = relay.connect(TIMEOUT)
    open_connections(port, 2)
    flood(publisher)  # the subscriber never reads
    if policy == "block":
        # The log fills up to the stuck subscriber's cursor: the publisher is held, once; nobody is cut off.
        relay.wait_line("the log is full up to the slowest subscriber", timeout=TIMEOUT)
        samples = scrape(port)
        assert value(samples, "jitrelay_subscriber_pending_bytes_max") > limit
        assert value(samples, "jitrelay_subscribers_behind") == 1
        lags = [v for (name, _), v in samples.items() if name == "jitrelay_subscriber_lag_bytes"]
        assert lags == [value(samples, "jitrelay_subscriber_pending_bytes_max")]
        assert value(samples, "jitrelay_slow_subscriber_actions_total", action="disconnect") == 0
        assert value(samples, "jitrelay_slow_subscriber_actions_total", action="hold") == 1
    else:
        # Cut off (past its limit for 0.3 s, or out of the log first); the publisher is never held.
        relay.wait_line("disconnecting slow subscriber", timeout=TIMEOUT)
        samples = open_connections(port, 1)
        assert value(samples, "jitrelay_slow_subscriber_actions_total", action="disconnect") == 1
        assert value(samples, "jitrelay_subscriber_pending_bytes_max") == 0
        assert value(samples, "jitrelay_subscribers_behind") == 0
        assert value(samples, "jitrelay_slow_subscriber_actions_total", action="hold") == 0
    stuck.close()
    publisher.close()


def test_cumulative_buckets_never_count_a_sample_under_a_lower_bound() -> None:
    histogram = Histogram()
    samples_ns = [10, 900, 990, 1000, 1500, 2400, 3_000_000, 2_000_000_000, 1 << 62]
    for sample in samples_ns:
        histogram.record(sample)
    bounds_ns = [round(b * 1e9) for b in FORWARDING_BUCKETS]
    cumulative = cumulative_buckets(histogram.counts, bounds_ns)
    # 1000 ns lies in the bucket 992..1023, which reaches above 1 us: it counts under 2.5 us.
    # 2400 ns lies in 2304..2431, below 2.5 us; 3 ms under 5 ms; 2 s and beyond only under +Inf.
    expected = [3, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 9]
    assert cumulative == expected
    assert len(cumulative) == len(bounds_ns) + 1 and cumulative[-1] == histogram.count


def test_a_shared_memory_reader_is_counted_and_its_lag_read_from_its_slot(start_relay: StartRelay) -> None:
    relay = start_relay("market_data", "--metrics-port", "0")
    port = metrics_port(relay)
    with Subscriber("market_data", relay.socket_path, shared_memory=True) as reader:
        relay.wait_line("reads the log from shared memory", timeout=TIMEOUT)
        samples = scrape(port)
        assert value(samples, "jitrelay_shared_memory_readers") == 1
        messages = [build_message(protocol.MARKET_DATA, [(1, bytes([i]) * 10)], sequence=i) for i in range(50)]
        with Publisher("market_data", relay.socket_path) as publisher:
            for message in messages:
                publisher.publish_raw(message)
        total = sum(map(len, messages))
        samples = wait_for(
            port, lambda s: value(s, "jitrelay_log_head_bytes_total") == total, "every message forwarded"
        )
        lags = [v for (name, _), v in samples.items() if name == "jitrelay_subscriber_lag_bytes"]
        assert lags == [total]  # it has read nothing yet: all of it
        received = b""
        while len(received) < total:
            batch = reader.recv_batch(timeout=TIMEOUT)
            assert batch is not None, f"{len(received)} of {total} bytes read"
            received += batch.tobytes()
        assert received == b"".join(messages)
        samples = scrape(port)
        lags = [v for (name, _), v in samples.items() if name == "jitrelay_subscriber_lag_messages"]
        assert lags == [0]
    samples = open_connections(port, 0)
    assert value(samples, "jitrelay_shared_memory_readers") == 0
