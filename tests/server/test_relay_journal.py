"""The execution relay's journal, written by a real relay process and read back."""

from __future__ import annotations

import random
import signal
import socket
import time

from support.relays import StartRelay

from jitrelay.core.protocol import build_message
from jitrelay.server.journal import read_journal


def _stream(rng: random.Random, count: int) -> tuple[bytes, list[bytes]]:
    """Valid execution messages with rejects mixed in; the bytes and the valid messages."""
    sent: list[bytes] = []
    valid: list[bytes] = []
    for i in range(count):
        good = build_message(3, [(40 + i % 40, rng.randbytes(rng.randrange(0, 300)))], source=5, sequence=i)
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
