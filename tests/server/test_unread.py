"""Publishers that never read their socket (all of Torq's services), on real relays with real client processes.

Such a publisher is also, to the relay, a subscriber of everyone else's
messages: it must never be cut off and never hold anyone back, under every
slow policy, and what it is not sent must be counted exactly. A subscriber
that reads, however slowly, keeps the slow policy as it was; so does one
stopped before its first read that never published. Each client here is a
process of its own, driven one command at a time over its stdin, so that a
test knows what it did and when, and can SIGSTOP it. Checks are on exact
bytes and counts; nothing here asserts a speed.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from support import torq
from support.processes import ReaderProcess
from support.relays import RelayProcess, StartRelay

from jitrelay.core.protocol import OFF_SOURCE, build_batch
from jitrelay.core.units import KiB, MiB

LOG_SIZE = 8 * MiB  # the smallest log these domains allow; each publisher sends three times as much
VALUE = 200  # bytes of the one record of every message
MESSAGE = 32 + 2 + VALUE
PER_PUBLISHER = 3 * LOG_SIZE // MESSAGE
WAIT = 60.0  # generous: the machine is shared; a stall shows as this running out, not as a slow pass

# name -> (domain id, a TLV type it carries (100 is Torq's heartbeat), checksummed)
DOMAINS = {"market_data": (1, 1, False), "signal": (2, 20, True), "execution": (3, 40, True), "system": (4, 100, True)}

# A client process: connects, then does what each line on its stdin says and answers with one line.
# hello: send the first message; go PIECE PAUSE: send the rest in PIECE-byte writes, PAUSE seconds apart;
# read N: read N bytes (one message's worth, say) into the out file; drain: read until nothing comes for a
# second, then say whether the connection is still open; close.
_CLIENT = r"""
import select, socket, sys, time
path, stream_file, first, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
data = memoryview(open(stream_file, "rb").read()) if stream_file != "-" else memoryview(b"")
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(path)
sent = 0
def say(*words):
    print(*words, flush=True)
say("connected")
for line in sys.stdin:
    command, *args = line.split()
    if command == "hello":
        sock.sendall(data[:first])
        sent = first
        say("hello")
    elif command == "go":
        piece, pause = int(args[0]), float(args[1])
        try:
            while sent < len(data):
                sock.sendall(data[sent : sent + piece])
                sent = min(len(data), sent + piece)
                time.sleep(pause)
        except OSError as exc:
            say("failed", type(exc).__name__)
            continue
        say("sent", sent)
    elif command == "read":
        wanted, got = int(args[0]), 0
        with open(out, "ab") as sink:
            while got < wanted:
                chunk = sock.recv(wanted - got)
                if not chunk:
                    break
                sink.write(chunk)
                got += len(chunk)
        say("read", got)
    elif command == "drain":
        state, total = "open", 0
        sock.setblocking(False)
        with open(out, "ab") as sink:
            while select.select([sock], [], [], 1.0)[0]:
                try:
                    chunk = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    state = type(exc).__name__
                    break
                if not chunk:
                    state = "closed"
                    break
                sink.write(chunk)
                total += len(chunk)
        sock.setblocking(True)
        say(state, total)
    elif command == "close":
        sock.close()
        say("closed")
        break
"""


class Client:
    """One client process; ``ask`` sends it a command and returns its answer, or fails after ``timeout``."""

    def __init__(self, relay: RelayProcess, folder: Path, name: str, stream: bytes = b"") -> None:
        self.out = folder / f"{name}.received"
        self.out.write_bytes(b"")
        source = folder / f"{name}.stream"
        source.write_bytes(stream)
        self.stream = stream
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CLIENT, str(relay.socket_path), str(source), str(MESSAGE), str(self.out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.answer(10) == "connected"
        relay.wait_line("connected", f"pid={self.pid} uid=")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float = WAIT) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"client {self.pid} gave no answer within {timeout} s: it is stalled"
        return self.proc.stdout.readline().strip()

    def ask(self, command: str, timeout: float = WAIT) -> str:
        self.send(command)
        return self.answer(timeout)

    def received(self) -> bytes:
        return self.out.read_bytes()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


StartClient = Callable[..., Client]


@pytest.fixture
def started(short_dir: Path) -> Iterator[StartClient]:
    """Start client processes with ``started(relay, name, stream)``; all are killed at teardown."""
    made: list[Client] = []

    def start(relay: RelayProcess, name: str, stream: bytes = b"") -> Client:
        client = Client(relay, short_dir, name, stream)
        made.append(client)
        return client

    yield start
    for client in made:
        client.kill()


def stream_of(domain: str, source: int, count: int = PER_PUBLISHER) -> bytes:
    """``count`` messages from publisher ``source``: one record each, consecutive sequence numbers."""
    domain_id, tlv, checksums = DOMAINS[domain]
    records = [(tlv, bytes([source]) * VALUE)]
    return build_batch(domain_id, count, records, source=source, checksums=checksums, timestamp_ns=1).tobytes()


def by_source(data: bytes, source: int) -> bytes:
    """The messages of ``source`` in ``data`` (all messages here are ``MESSAGE`` bytes), in the order received."""
    assert len(data) % MESSAGE == 0, "not whole messages"
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, MESSAGE)
    return rows[rows[:, OFF_SOURCE] == source].tobytes()


def not_sent(relay: RelayProcess, pid: int) -> int:
    """The messages the relay says it did not send to the never-reading publisher ``pid``, from its close line."""
    line = relay.wait_line(f"pid={pid} uid=", "disconnected", "never read", timeout=10)
    found = re.search(r"not sent (\d+) messages", line)
    assert found, line
    return int(found.group(1))


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_publishers_that_never_read_are_never_cut_off_nor_hold_anyone_and_what_they_miss_is_counted(
    start_relay: StartRelay, started: StartClient, short_dir: Path, domain: str
) -> None:
    summary = short_dir / "figures.json"
    relay = start_relay(domain, "--log-size", str(LOG_SIZE), "--summary-file", str(summary))
    streams = [stream_of(domain, 1), stream_of(domain, 2)]
    total = sum(map(len, streams))
    reader = ReaderProcess(relay.socket_path, short_dir / "reader.bin", receive_buffer=4 * MiB)
    try:
        relay.wait_line("connected", f"pid={reader.pid} uid=")
        publishers = [started(relay, f"publisher{k + 1}", streams[k]) for k in range(2)]
        # Both are connected before either publishes, so each is sent everything of the other from its first
        # message; and both have published before either floods: one that never published is a subscriber.
        for publisher in publishers:
            assert publisher.ask("hello") == "hello"
        deadline = time.monotonic() + 10
        while len(reader.received()) < 2 * MESSAGE:
            assert time.monotonic() < deadline, "the reader did not get both first messages"
            time.sleep(0.01)
        for publisher in publishers:
            publisher.send(f"go {64 * KiB} 0.0005")
        for publisher in publishers:
            assert publisher.answer() == f"sent {len(publisher.stream)}", "a publisher was cut off"
        deadline = time.monotonic() + WAIT
        while len(reader.received()) < total:
            assert time.monotonic() < deadline, f"the reader got {len(reader.received())} of {total} bytes"
            time.sleep(0.02)
        got = reader.received()
        for k in range(2):
            assert by_source(got, k + 1) == streams[k], f"publisher {k + 1}'s messages did not all reach the reader"
        for k, publisher in enumerate(publishers):
            relay.wait_line(f"pid={publisher.pid} uid=", "has never read its socket", timeout=5)
            state, drained = publisher.ask("drain").split()
            assert state == "open", f"publisher {k + 1}'s connection: {state}"
            own = publisher.received()
            assert len(own) == int(drained) and len(own) % MESSAGE == 0, "it was sent part of a message"
            other = streams[1 - k]
            assert own == other[: len(own)], "what it was sent is not an exact prefix of the other's messages"
            assert 0 < len(own) < len(other)
            assert publisher.ask("close") == "closed"
            assert not_sent(relay, publisher.pid) == (len(other) - len(own)) // MESSAGE
    finally:
        relay.kill()
        reader.kill()
    assert relay.find_line("disconnecting slow subscriber") is None
    figures = json.loads(summary.read_text())
    assert figures["never_reading"] == 2 and figures["never_reading_open"] == 0
    missed = [(len(streams[1 - k]) - len(p.received())) for k, p in enumerate(publishers)]
    assert figures["unread_bytes"] == sum(missed)
    assert figures["unread_messages"] == sum(missed) // MESSAGE
    assert figures["messages_forwarded"] == 2 * PER_PUBLISHER


@pytest.mark.parametrize("domain", ["market_data", "execution"])
@pytest.mark.parametrize("published", [False, True], ids=["subscriber", "publisher"])
def test_a_client_stopped_before_its_first_read_is_a_subscriber_unless_it_published(
    start_relay: StartRelay, started: StartClient, short_dir: Path, domain: str, published: bool
) -> None:
    """Never published: today's policy (cut off, or holding the publisher). Published: a publisher that never reads."""
    relay = start_relay(domain, "--log-size", str(LOG_SIZE))
    flood = stream_of(domain, 1)
    stopped = started(relay, "stopped", stream_of(domain, 2, 1))
    flooder = started(relay, "flooder", flood)
    if published:
        assert stopped.ask("hello") == "hello"
    os.kill(stopped.pid, signal.SIGSTOP)
    flooder.send(f"go {256 * KiB} 0")
    if published:
        assert flooder.answer() == f"sent {len(flood)}"
        relay.wait_line(f"pid={stopped.pid} uid=", "has never read its socket")
        assert relay.find_line("disconnecting slow subscriber") is None
        assert relay.find_line("the log is full") is None
    elif domain == "market_data":
        assert flooder.answer() == f"sent {len(flood)}"
        relay.wait_line("disconnecting slow subscriber", f"pid={stopped.pid} uid=", "fell out of the log")
    else:
        relay.wait_line("the log is full up to the slowest subscriber", "holding", timeout=WAIT)
        ready, _, _ = select.select([flooder.proc.stdout], [], [], 1.0)
        assert not ready, "the publisher was not held"
    os.kill(stopped.pid, signal.SIGCONT)
    state, _ = stopped.ask("drain").split()
    if not published and domain == "execution":
        assert flooder.answer() == f"sent {len(flood)}"
        assert state == "open"
        deadline = time.monotonic() + WAIT
        while len(stopped.received()) < len(flood):
            assert stopped.ask("drain").split()[0] == "open"
            assert time.monotonic() < deadline, "the stopped subscriber was not sent everything"
        assert stopped.received() == flood, "under block a stopped subscriber loses nothing"
    elif published:
        assert state == "open"
        own = stopped.received()
        assert own == flood[: len(own)] and len(own) % MESSAGE == 0
    else:
        assert state in ("closed", "ConnectionResetError")
    assert relay.find_line("has never read its socket", f"pid={flooder.pid} uid=") is None


@pytest.mark.parametrize("domain", ["market_data", "execution"])
def test_a_publisher_that_reads_a_little_then_stops_keeps_the_slow_policy(
    start_relay: StartRelay, started: StartClient, short_dir: Path, domain: str
) -> None:
    """It read one message, so it is a (slow) subscriber: cut off under ``disconnect``, holding under ``block``."""
    relay = start_relay(domain, "--log-size", str(LOG_SIZE))
    flood = stream_of(domain, 1)
    slow = started(relay, "slow", stream_of(domain, 2, 1))
    flooder = started(relay, "flooder", flood)
    assert flooder.ask("hello") == "hello"
    assert slow.ask(f"read {MESSAGE}") == f"read {MESSAGE}"
    assert slow.ask("hello") == "hello"
    flooder.send(f"go {256 * KiB} 0")
    if domain == "market_data":
        assert flooder.answer() == f"sent {len(flood)}"
        relay.wait_line("disconnecting slow subscriber", f"pid={slow.pid} uid=")
    else:
        relay.wait_line("the log is full up to the slowest subscriber", "holding", timeout=WAIT)
        ready, _, _ = select.select([flooder.proc.stdout], [], [], 1.0)
        assert not ready, "the publisher was not held"
        while len(slow.received()) < len(flood):
            assert slow.ask("drain").split()[0] == "open"
        assert flooder.answer() == f"sent {len(flood)}"
        assert slow.received() == flood
    assert relay.find_line("has never read its socket") is None


def test_a_torq_publisher_that_sent_only_its_identification_header_is_never_cut_off(
    start_relay: StartRelay, started: StartClient, short_dir: Path
) -> None:
    """A Torq strategy's first bytes on the signal relay are a market-data header (rejected), then it waits for an
    opportunity: it has published nothing the relay forwarded, yet it is a publisher, not a slow subscriber."""
    relay = start_relay("signal", "--log-size", str(LOG_SIZE))
    flood = stream_of("signal", 1)
    quiet = started(relay, "quiet", torq.identification_header())
    flooder = started(relay, "flooder", flood)
    assert quiet.ask("hello") == "hello"
    relay.wait_line("connected", f"pid={flooder.pid} uid=")
    flooder.send(f"go {256 * KiB} 0")
    assert flooder.answer() == f"sent {len(flood)}"
    relay.wait_line(f"pid={quiet.pid} uid=", "has never read its socket")
    assert relay.find_line("disconnecting slow subscriber") is None
    state, _ = quiet.ask("drain").split()
    assert state == "open"
    own = quiet.received()
    assert 0 < len(own) < len(flood) and own == flood[: len(own)]
