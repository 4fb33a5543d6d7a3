"""The execution relay's journal, written by a real relay process and read back."""

from __future__ import annotations

import random
import resource
import signal
import socket
import threading
import time

from support.clients import PROBE_MARK, Clients, sync
from support.relays import StartRelay

from jitrelay.core.protocol import build_message
from jitrelay.server.journal import read_journal


def _stream(rng: random.Random, count: int) -> tuple[bytes, list[bytes]]:
    """Valid execution messages with rejects mixed in; the bytes and the valid messages."""
    sent: list[bytes] = []
    valid: list[bytes] = []
    for i in range(count):
        good = build_message(3, [(40 + i % 20, rng.randbytes(rng.randrange(0, 300)))], source=5, sequence=i)
        sent.append(good)
        valid.append(good)
        if i % 7 == 0:
            sent.append(build_message(3, [(80, b"out of range")], sequence=i))
        if i % 11 == 0:
            sent.append(build_message(3, [(41, b"bad crc")], sequence=i, checksum=0))
    return b"".join(sent), valid


def test_journal_holds_exactly_the_forwarded_messages_across_restarts(start_relay: StartRelay, short_dir) -> None:
    journal_dir = short_dir / "audit"
    rng = random.Random(7)
    expected: list[bytes] = []
    for _ in range(2):  # a restart starts a new segment; the reader sees both in order
        relay = start_relay("execution", "--journal-dir", str(journal_dir), "--journal-rotate", "8KiB")
        data, valid = _stream(rng, 300)
        with socket.socket(socket.AF_UNIX) as pub:
            pub.connect(str(relay.socket_path))
            for start in range(0, len(data), 4096):  # several reads, so several batches and segments
                pub.sendall(data[start : start + 4096])
                time.sleep(0.002)
            pub.shutdown(socket.SHUT_WR)
            pub.settimeout(10)
            assert pub.recv(1) == b""  # the relay closes after reading everything
        expected += valid
        relay.send_signal(signal.SIGTERM)
        assert relay.wait_exit(5) == 0
        assert relay.find_line("journaling forwarded messages to", str(journal_dir))
    journaled = [m.raw for m in read_journal(journal_dir)]
    assert journaled == expected
    segments = sorted(journal_dir.glob("execution-*.journal"))
    assert len(segments) > 2


def test_journal_is_off_for_market_data_and_with_no_journal(start_relay: StartRelay, short_dir) -> None:
    relay = start_relay("execution", "--no-journal")
    with socket.socket(socket.AF_UNIX) as pub:
        pub.connect(str(relay.socket_path))
        pub.sendall(build_message(3, [(40, b"x")]))
        time.sleep(0.2)
    assert relay.find_line("journaling") is None
    start_relay("market_data")
    assert not (short_dir / "journal").exists()


def test_a_failing_journal_holds_the_publishers_and_forwards_nothing_unjournaled(
    start_relay: StartRelay, clients: Clients, short_dir
) -> None:
    """Appends fail (EFBIG) once the segment reaches the relay's file-size limit: the publishers are held, the
    subscriber gets nothing more, and when the limit is lifted the journal writes again and everything goes out,
    journaled first."""
    journal_dir = short_dir / "audit"
    relay = start_relay("execution", "--journal-dir", str(journal_dir), "--journal-rotate", "64MiB")
    limit = 256 * 1024
    resource.prlimit(relay.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))  # soft: it can be lifted
    subscriber = clients.reader(relay)
    publisher = clients.connect(relay)
    sync(publisher, [subscriber], 3)
    data, valid = _stream(random.Random(11), 6000)  # about 1 MiB, four times the limit
    expected = b"".join(valid)
    # A first part well under the limit goes out before the rest is sent: the relay may read the rest in one
    # piece larger than the limit, and then nothing at all would have gone out before the journal refused.
    first = len(_stream(random.Random(11), 1)[0])  # the stream's first round: one valid message and two rejects
    publisher.sendall(data[:first])
    assert subscriber.wait_received(len(valid[0]), 10), "the first message did not go out"
    thread = threading.Thread(target=publisher.sendall, args=(data[first:],), daemon=True)
    thread.start()
    relay.wait_line("append failed", "holding publishers, nothing unjournaled is forwarded", timeout=20)
    time.sleep(0.5)  # several retries, all refused
    held_at = subscriber.received
    journaled = sum(path.stat().st_size for path in journal_dir.glob("execution-*.journal"))
    assert 0 < held_at < len(expected)
    assert held_at <= journaled <= limit  # what went out is in the journal; the probes went out before the limit
    time.sleep(0.3)
    assert subscriber.received == held_at, "bytes went out while the journal could not write them"
    resource.prlimit(relay.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    relay.wait_line("writes again; publishers resume", timeout=10)
    assert subscriber.wait_received(len(expected), 30), f"{subscriber.received} of {len(expected)} bytes"
    assert bytes(subscriber.data) == expected
    thread.join(10)
    relay.send_signal(signal.SIGTERM)
    assert relay.wait_exit(5) == 0
    assert [m.raw for m in read_journal(journal_dir) if m.header.source != PROBE_MARK] == valid
    stopped = relay.find_line("relay stopped", "journal errors")
    assert int(stopped.rsplit("journal errors ", 1)[1]) >= 2  # the first refusal and at least one retry
