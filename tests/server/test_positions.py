"""Positions and resume on real relays: a subscriber that comes back gets exactly what it missed, or hears of it.

A subscriber killed with SIGKILL mid-stream, reconnecting with the last
position it recorded, receives exactly the rest: no duplicate, no gap. One
asking for a position the log has left gets a gap notice with the exact
count, then the stream from the oldest message kept; so does a positioned
subscriber the log leaves behind while it is stalled, instead of being cut
off. Filtered subscribers resume with their filter, over random streams.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.clients import Clients, NumberedStream, sync
from support.mapped import receive
from support.relays import RelayProcess, StartRelay

from jitrelay import Subscriber
from jitrelay.core import protocol
from jitrelay.core.domains import stats_socket_path
from jitrelay.core.units import MiB
from jitrelay.tools.stats import parse_reading, read_socket

# Subscribes with positions, records the start, then each message's bytes followed by the position after it.
_RECORDER = """
import os, sys
from jitrelay import Subscriber
data = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
with Subscriber("market_data", sys.argv[1], positions=True) as sub:
    batch = sub.recv_batch(timeout=0.5)  # nothing yet: the relay's first notice says where we start
    with open(sys.argv[3] + ".start", "w") as start:
        start.write(str(sub.position))
    for message in sub:
        os.write(data, message.raw)
        with open(sys.argv[3] + ".tmp", "w") as out:
            out.write(str(sub.position))
        os.replace(sys.argv[3] + ".tmp", sys.argv[3])
"""


def publish(relay: RelayProcess, clients: Clients, stream: NumberedStream) -> None:
    publisher = clients.connect(relay)
    publisher.settimeout(60)
    for i in range(stream.chunks):
        publisher.sendall(stream.chunk(i))
    publisher.close()


def test_a_subscriber_killed_mid_stream_resumes_with_exactly_the_rest(
    start_relay: StartRelay, clients: Clients, short_dir: Path
) -> None:
    relay = start_relay("market_data")
    stream = NumberedStream(1, [(1, b"r" * 37)], chunk_messages=14768, chunks=16)  # ~16 MiB of 71-byte messages
    data, position = short_dir / "data.bin", short_dir / "position"
    recorder = subprocess.Popen([sys.executable, "-c", _RECORDER, str(relay.socket_path), str(data), str(position)])
    try:
        deadline = time.monotonic() + 30
        while not Path(str(position) + ".start").exists():
            assert time.monotonic() < deadline and recorder.poll() is None, "the recorder never started"
            time.sleep(0.02)
        start = protocol.Position.parse(Path(str(position) + ".start").read_text())
        publisher = clients.connect(relay)
        publisher.settimeout(60)
        for i in range(stream.chunks // 2):
            publisher.sendall(stream.chunk(i))
        while not position.exists() or protocol.Position.parse(position.read_text()).message < start.message + 1000:
            time.sleep(0.01)
        recorder.send_signal(signal.SIGKILL)  # mid-stream: the publisher keeps going
        for i in range(stream.chunks // 2, stream.chunks):
            publisher.sendall(stream.chunk(i))
    finally:
        recorder.kill()
        recorder.wait(10)
    last = protocol.Position.parse(position.read_text())
    committed = last.offset - start.offset
    assert committed > 0 and len(data.read_bytes()) >= committed  # it may have written one more than it recorded
    with Subscriber("market_data", relay.socket_path, resume_from=last) as sub:
        rest = receive(sub, stream.total - committed)
        assert sub.gaps == []
        assert sub.position == protocol.Position(
            last.epoch, start.offset + stream.total, start.message + stream.chunks * stream.chunk_messages
        )
    assert data.read_bytes()[:committed] + rest == stream.prefix(stream.total), "lost, doubled or changed bytes"


def test_a_position_the_log_has_left_gets_the_exact_gap_then_the_oldest_kept(
    start_relay: StartRelay, clients: Clients
) -> None:
    relay = start_relay("market_data", "--log-size", str(8 * MiB))
    with Subscriber("market_data", relay.socket_path, positions=True) as first:
        first.recv_batch(timeout=0.5)
        start = first.position
    assert start is not None
    stream = NumberedStream(1, [(1, b"g" * 37)], chunk_messages=14768, chunks=24)  # ~24 MiB: past the 8 MiB log
    publish(relay, clients, stream)
    time.sleep(0.2)
    with Subscriber("market_data", relay.socket_path, resume_from=start) as sub:
        batch = None
        while batch is None:
            batch = sub.recv_batch(timeout=5.0)
        (gap,) = sub.gaps
        assert gap.reason == protocol.GAP_LEFT_LOG
        first_kept = protocol.decode_message(batch.tobytes(), 0)[0].header.sequence
        assert gap.messages == first_kept and gap.bytes == first_kept * stream.message_size
        rest = batch.tobytes() + receive(sub, stream.total - first_kept * stream.message_size - len(batch))
        assert rest == stream.prefix(stream.total)[first_kept * stream.message_size :]


def test_a_stalled_positioned_subscriber_hears_of_its_gap_instead_of_being_cut_off(
    start_relay: StartRelay, clients: Clients
) -> None:
    relay = start_relay("market_data", "--log-size", str(8 * MiB))
    sock = clients.connect(relay)
    stalled = clients.reader(relay, sock)
    publisher = clients.connect(relay)
    sync(publisher, [stalled], 1)
    sock.sendall(protocol.positions_message())
    assert stalled.wait_for(lambda: len(stalled.data) >= 58, 10), "no position notice"  # it is positioned now
    stalled.pause()
    stream = NumberedStream(1, [(1, b"s" * 37)], chunk_messages=14768, chunks=32)  # ~32 MiB
    publisher.settimeout(60)
    for i in range(stream.chunks):
        publisher.sendall(stream.chunk(i))
    relay.wait_line("fell out of the log: told of a gap")
    stalled.resume()
    assert relay.find_line("disconnecting slow subscriber") is None
    deadline = time.monotonic() + 30
    while True:  # until the end of the stream arrived after the gap
        messages = list(protocol.decode_messages(bytes(stalled.data)[: _whole(bytes(stalled.data))]))
        data = [m for m in messages if m.header.relay_domain != protocol.CONTROL_DOMAIN]
        if data and data[-1].header.sequence == stream.chunks * stream.chunk_messages - 1:
            break
        assert time.monotonic() < deadline, "the stream did not go on after the gap"
        time.sleep(0.05)
    notices = [protocol.read_notice(m.raw) for m in messages if m.header.relay_domain == protocol.CONTROL_DOMAIN]
    gaps = [n for n in notices if isinstance(n, protocol.Gap)]
    assert gaps and all(g.reason == protocol.GAP_LEFT_LOG for g in gaps)
    sequences = [m.header.sequence for m in data if m.header.source != 0xEE]  # sync probes aside
    received, missed = set(sequences), sum(g.messages for g in gaps)
    assert sequences == sorted(received), "reordered or doubled"
    assert len(received) + missed == stream.chunks * stream.chunk_messages, "a loss the gap notices do not account for"
    assert relay.find_line("fell out of the log: told of a gap")
    figures = stats_figures(relay)
    assert figures["gap_notice"] == len(gaps) and figures["disconnect"] == 0


def stats_figures(relay: RelayProcess) -> dict[str, float]:
    """The slow-subscriber actions from the relay's stats socket."""
    reading = parse_reading(read_socket(stats_socket_path(relay.socket_path)), "market_data", time.time())
    return {a: reading.value("jitrelay_slow_subscriber_actions_total", action=a) for a in ("gap_notice", "disconnect")}


def _whole(data: bytes) -> int:
    """The length of the complete messages at the start of ``data``."""
    at = 0
    while at + 32 <= len(data):
        end = at + 32 + int.from_bytes(data[at + 24 : at + 28], "little")
        if end > len(data):
            break
        at = end
    return at


@pytest.fixture(scope="module")
def shared_relay(tmp_path_factory: pytest.TempPathFactory) -> RelayProcess:
    folder = Path(f"/tmp/jr-positions-{os.getpid()}")
    folder.mkdir(mode=0o700, exist_ok=True)
    relay = RelayProcess("market_data", folder / "market_data.sock")
    relay.wait_ready()
    yield relay
    relay.kill()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.integers(1, 4), st.integers(1, 3)), min_size=20, max_size=300),
    st.sets(st.integers(1, 4), min_size=1, max_size=3),
    st.sets(st.integers(1, 3), min_size=1, max_size=3) | st.none(),
    st.floats(0.1, 0.9),
)
def test_a_filtered_subscriber_resumes_with_exactly_its_selection(
    shared_relay: RelayProcess, plan: list[tuple[int, int]], types: set[int], sources: set[int] | None, cut: float
) -> None:
    rng = random.Random(len(plan))
    messages = [
        protocol.build_message(1, [(t, rng.randbytes(rng.randint(0, 40)))], source=s, sequence=i)
        for i, (t, s) in enumerate(plan)
    ]
    selected = [m for m, (t, s) in zip(messages, plan, strict=True) if t in types and (sources is None or s in sources)]
    half = int(len(messages) * cut)
    sub = Subscriber("market_data", shared_relay.socket_path, tlv_types=types, sources=sources, positions=True)
    sub.recv_batch(timeout=0.3)
    with socket_to(shared_relay) as publisher:
        publisher.sendall(b"".join(messages[:half]))
        want_first = [m for m in selected if messages.index(m) < half]
        got_first = receive(sub, sum(map(len, want_first))) if want_first else b""
        position = sub.position
        sub.close()
        publisher.sendall(b"".join(messages[half:]))
        with Subscriber(
            "market_data", shared_relay.socket_path, tlv_types=types, sources=sources, resume_from=position
        ) as again:
            rest = receive(again, sum(map(len, selected)) - len(got_first))
            assert again.gaps == []
    assert got_first + rest == b"".join(selected)


def socket_to(relay: RelayProcess):  # type: ignore[no-untyped-def]
    sock = relay.connect(10)
    sock.sendall(protocol.publish_only_message())
    return sock


def test_execution_resumes_from_the_journal_byte_exact_across_a_restart(
    start_relay: StartRelay, clients: Clients, short_dir: Path
) -> None:
    journal = ["--journal-dir", str(short_dir / "audit"), "--log-size", str(8 * MiB)]
    socket_path = short_dir / "execution.sock"
    relay = start_relay("execution", *journal, socket_path=socket_path)
    with Subscriber("execution", socket_path, positions=True) as first:
        first.recv_batch(timeout=0.5)
        start = first.position
    assert start is not None
    before = NumberedStream(3, [(40, b"j" * 400)], chunk_messages=1024, chunks=40)  # ~17 MiB: past the 8 MiB log
    publish(relay, clients, before)
    relay.send_signal(signal.SIGTERM)
    assert relay.wait_exit(10) == 0
    relay = start_relay("execution", *journal, socket_path=socket_path)  # a new epoch
    after = NumberedStream(3, [(41, b"k" * 100)], chunk_messages=1024, chunks=4)
    publish(relay, clients, after)
    with Subscriber("execution", socket_path, resume_from=start) as sub:
        got = receive(sub, before.total + after.total)
        assert sub.gaps == []
        assert sub.position is not None and sub.position.epoch != start.epoch
        assert sub.position.message == after.chunks * after.chunk_messages
    assert got == before.prefix(before.total) + after.prefix(after.total)
    assert relay.find_line("from the journal")
