"""End-to-end: a real relay process, real Unix sockets, raw-socket clients.

The clients here are written from PROTOCOL.md with plain sockets; only
``build_message`` and ``build_batch`` come from the project, to encode.
Every check is on exact bytes: what each subscriber reads must be the
concatenation of the messages it should get, in order, nothing else.

A relay forwards only to connections it has already accepted, so before a
test publishes it "syncs": the publisher sends heartbeat probes (source and
flags 0xEE, which no test message uses) until every reader has seen the last
probe sent. Readers drop those leading probes, so what they keep is exactly
what the test published afterwards.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from conftest import RelayProcess, StartRelay
from reference import extended_record, standard_record
from streams import ThreadedReader, send_chunked

from jitrelay.core.protocol import MAGIC_BYTES, build_batch, build_message, decode_messages

KiB = 1 << 10
MiB = 1 << 20

# name -> (domain id, lowest TLV type, highest TLV type, verifies checksums), from PROTOCOL.md
DOMAINS = {
    "market_data": (1, 1, 19, False),
    "signal": (2, 20, 39, True),
    "execution": (3, 40, 79, True),
}

PROBE_MARK = 0xEE  # source and flags of sync probes
SLOW_READS = (1, 13, 512, 4096, 16384, 32768, 65536)  # read sizes of a slow subscriber


# -- clients -----------------------------------------------------------------


def probe(domain_id: int, n: int) -> bytes:
    return build_message(domain_id, source=PROBE_MARK, flags=PROBE_MARK, sequence=n, timestamp_ns=0)


class Reader(ThreadedReader):
    """Reads one connection on a thread until EOF or error, handing what arrives to ``sink``.

    Leading probes are counted and dropped; by default the rest is kept in
    ``data``. ``pace`` makes it a slow reader: random small reads with a short
    sleep after each. ``pause``/``resume`` stop and restart reading (a read
    already waiting may still complete once).
    """

    def __init__(
        self,
        sock: socket.socket,
        domain_id: int,
        sink: Callable[[memoryview], None] | None = None,
        recv_size: int = 1 * MiB,
        pace: random.Random | None = None,
    ) -> None:
        super().__init__(sock, recv_size)
        self.data = bytearray()
        self.sink = sink or self.data.extend
        self.received = 0  # bytes handed to the sink
        self.last_probe = -1
        self._probe_prefix = MAGIC_BYTES + bytes((domain_id, 2, PROBE_MARK, PROBE_MARK))
        self._head: bytearray | None = bytearray()  # None once past the probes
        self._pace = pace
        self._open = threading.Event()
        self._open.set()
        self.start()

    def _may_read(self) -> bool:
        return self._open.wait(0.1)

    def _read_size(self) -> int:
        return super()._read_size() if self._pace is None else self._pace.choice(SLOW_READS)

    def _received(self, chunk: memoryview) -> None:
        self._deliver(chunk)
        if self._pace is not None:
            time.sleep(0.001)

    def _deliver(self, chunk: memoryview) -> None:
        if self._head is not None:
            head = self._head
            head += chunk
            while len(head) >= 8 and head[:8] == self._probe_prefix:
                if len(head) < 32:
                    return
                self.last_probe = struct.unpack_from("<Q", head, 8)[0]
                del head[:32]
            if len(head) < 8:
                with self.changed:
                    self.changed.notify_all()
                return
            self._head = None
            chunk = memoryview(bytes(head))
        self.sink(chunk)
        with self.changed:
            self.received += len(chunk)
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or not self.running:
                    return predicate()
                self.changed.wait(left)
        return True

    def wait_received(self, n: int, timeout: float = 10.0) -> bool:
        return self.wait_for(lambda: self.received >= n, timeout)

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """Wait until the relay closed this connection (EOF or an error such as ECONNRESET)."""
        return self.wait_ended(timeout) and not self._stopping

    def pause(self) -> None:
        self._open.clear()

    def resume(self) -> None:
        self._open.set()


class Clients:
    """Sockets and readers of one test, closed at teardown."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.readers: list[Reader] = []

    def connect(self, relay: RelayProcess, timeout: float = 10.0) -> socket.socket:
        sock = relay.connect(timeout)
        self.sockets.append(sock)
        return sock

    def reader(self, relay: RelayProcess, sock: socket.socket | None = None, **kwargs: object) -> Reader:
        sock = sock or self.connect(relay)
        reader = Reader(sock, DOMAINS[relay.domain][0], **kwargs)  # type: ignore[arg-type]
        self.readers.append(reader)
        return reader

    def close(self) -> None:
        for reader in self.readers:
            reader.stop()
        for sock in self.sockets:
            sock.close()


def sync(publisher: socket.socket, readers: list[Reader], domain_id: int, timeout: float = 10.0) -> None:
    """Publish probes until every reader has seen the last one sent, so all are attached and none is in flight."""
    deadline = time.monotonic() + timeout
    n = 0
    while True:
        publisher.sendall(probe(domain_id, n))
        if all(r.wait_for(lambda r=r, n=n: r.last_probe == n, 0.05) for r in readers):
            return
        n += 1
        assert time.monotonic() < deadline, f"readers did not all receive a probe within {timeout} s"


def first_difference(got: bytes | bytearray, expected: bytes) -> int:
    n = min(len(got), len(expected))
    a = np.frombuffer(bytes(got[:n]), dtype=np.uint8)
    b = np.frombuffer(expected[:n], dtype=np.uint8)
    diff = np.flatnonzero(a != b)
    return int(diff[0]) if diff.size else n


def assert_stream(got: bytes | bytearray, expected: bytes, what: str = "stream") -> None:
    """Exact bytes, with a failure message that says where the streams part."""
    if bytes(got) == expected:
        return
    at = first_difference(got, expected)
    starts = [0]
    for msg in decode_messages(expected):
        starts.append(starts[-1] + len(msg.raw))
    index = max(i for i, s in enumerate(starts) if s <= at)
    raise AssertionError(
        f"{what}: got {len(got)} bytes, expected {len(expected)}; first difference at byte {at}, "
        f"{at - starts[index]} bytes into expected message #{index}: "
        f"got {bytes(got[at : at + 40]).hex()} expected {expected[at : at + 40].hex()}"
    )


# -- message generators --------------------------------------------------------


def valid_payload(rng: random.Random, lo: int, hi: int) -> bytes:
    records = []
    for _ in range(rng.choice((0, 1, 1, 2, 3, 5))):
        tlv_type = rng.randint(lo, hi)
        if rng.random() < 0.2:
            records.append(extended_record(tlv_type, rng.randbytes(rng.choice((0, 1, 255, 256, 1000, 3000)))))
        else:
            records.append(standard_record(tlv_type, rng.randbytes(rng.choice((0, 1, 8, 37, 100, 255)))))
    return b"".join(records)


def malformed_payload(rng: random.Random, lo: int, hi: int) -> bytes:
    good = standard_record(rng.randint(lo, hi), b"ok")
    ext_len = struct.pack("<H", 4)
    shapes = [
        bytes((lo, 10)) + b"short",  # value overruns the payload
        good + bytes((lo,)),  # a lone type byte after a good record
        good + standard_record(0, b"zero"),  # type 0
        bytes((255, 1, lo)) + ext_len + b"abcd",  # extended marker without its 0
        bytes((255, 0, 0)) + ext_len + b"abcd",  # extended record of type 0
        bytes((255, 0, lo, 4)),  # extended header cut short
        bytes((255, 0, lo)) + struct.pack("<H", 9) + b"abcd",  # extended value overruns
    ]
    return rng.choice(shapes)


def out_of_range_payload(rng: random.Random, lo: int, hi: int) -> bytes:
    outside = [t for t in (lo - 1, hi + 1, 1, 19, 20, 39, 40, 79, 80, 100, 119, 200, 254) if t and not lo <= t <= hi]
    bad = rng.choice(outside)
    record = extended_record(bad, b"v" * 300) if rng.random() < 0.3 else standard_record(bad, b"value")
    return valid_payload(rng, lo, hi) + record + standard_record(rng.randint(lo, hi), b"")


def mixed_messages(rng: random.Random, domain: str, count: int) -> list[tuple[bytes, bool]]:
    """``count`` messages for a relay of ``domain``, each with whether PROTOCOL.md says it is forwarded."""
    domain_id, lo, hi, verifies = DOMAINS[domain]
    out = []
    for seq in range(count):
        head = {
            "source": rng.randint(0, 200),
            "flags": rng.randint(0, 255),
            "sequence": seq,
            "timestamp_ns": rng.getrandbits(63),
        }
        kind = rng.choices(
            ("valid", "heartbeat", "wrong_domain", "bad_version", "malformed", "out_of_range", "bad_checksum"),
            weights=(40, 8, 8, 8, 14, 12, 10),
        )[0]
        if kind == "valid":
            out.append((build_message(domain_id, payload=valid_payload(rng, lo, hi), **head), True))
        elif kind == "heartbeat":
            out.append((build_message(domain_id, **head), True))
        elif kind == "wrong_domain":
            other = rng.choice([d for d in (0, 1, 2, 3, 4, 9, 255) if d != domain_id])
            out.append((build_message(other, payload=valid_payload(rng, lo, hi), **head), False))
        elif kind == "bad_version":
            version = rng.choice((0, 1, 3, 255))
            out.append((build_message(domain_id, payload=valid_payload(rng, lo, hi), version=version, **head), False))
        elif kind == "malformed":
            out.append((build_message(domain_id, payload=malformed_payload(rng, lo, hi), **head), False))
        elif kind == "out_of_range":
            out.append((build_message(domain_id, payload=out_of_range_payload(rng, lo, hi), **head), False))
        else:
            good = build_message(domain_id, payload=valid_payload(rng, lo, hi), **head)
            crc = struct.unpack_from("<I", good, 28)[0] ^ (1 << rng.randrange(32))
            out.append((good[:28] + struct.pack("<I", crc) + good[32:], not verifies))
    return out


class NumberedStream:
    """A long, reproducible run of equal messages with consecutive sequence numbers, made one chunk at a time.

    Both the publisher and each checker regenerate chunk ``i`` on demand, so a
    test can push hundreds of MiB through the relay and compare every byte
    without holding the stream in memory.
    """

    def __init__(self, domain_id: int, records: list[tuple[int, bytes]], chunk_messages: int, chunks: int) -> None:
        self.domain_id = domain_id
        self.records = records
        self.chunk_messages = chunk_messages
        self.chunks = chunks
        self.verifies = domain_id != 1
        self.template = build_batch(domain_id, chunk_messages, records, timestamp_ns=1, checksums=self.verifies)
        self.message_size = self.template.size // chunk_messages
        self.chunk_size = self.template.size
        self.total = self.chunk_size * chunks

    def chunk(self, index: int) -> bytes:
        first = index * self.chunk_messages
        if self.verifies:
            batch = build_batch(self.domain_id, self.chunk_messages, self.records, first_sequence=first, timestamp_ns=1)
            return batch.tobytes()
        rows = self.template.copy().reshape(self.chunk_messages, self.message_size)
        rows[:, 8:16].view("<u8")[:, 0] += np.uint64(first)
        return rows.tobytes()

    def prefix(self, n: int) -> bytes:
        """The first ``n`` bytes of the stream."""
        return b"".join(self.chunk(i) for i in range(-(-n // self.chunk_size)))[:n]


class StreamCheck:
    """Compares bytes, as they arrive, with a ``NumberedStream``; remembers where they first differ."""

    def __init__(self, stream: NumberedStream) -> None:
        self.stream = stream
        self.offset = 0
        self.mismatch: int | None = None
        self._index = -1
        self._chunk = b""

    def __call__(self, data: memoryview) -> None:
        pos, n = 0, len(data)
        size = self.stream.chunk_size
        while self.mismatch is None and pos < n:
            at = self.offset + pos
            index, within = divmod(at, size)
            if index >= self.stream.chunks:
                self.mismatch = at  # more bytes than were sent
                break
            if index != self._index:
                self._index, self._chunk = index, self.stream.chunk(index)
            take = min(n - pos, size - within)
            got = bytes(data[pos : pos + take])
            want = self._chunk[within : within + take]
            if got != want:
                self.mismatch = at + first_difference(got, want)
            pos += take
        self.offset += n

    def verdict(self) -> str:
        if self.mismatch is None:
            return f"{self.offset} bytes, all as sent"
        msg, within = divmod(self.mismatch, self.stream.message_size)
        return (
            f"first wrong byte at offset {self.mismatch} (message #{msg}, byte {within} of "
            f"{self.stream.message_size}); {self.offset} bytes received of {self.stream.total} sent"
        )


def checked_readers(
    relay: RelayProcess, clients: Clients, stream: NumberedStream, **second: object
) -> tuple[list[Reader], list[StreamCheck], socket.socket]:
    """Two readers that check what they get against ``stream``, and a publisher synced to both.

    ``second`` holds options of the second reader only (a ``pace``, say).
    """
    checks = [StreamCheck(stream) for _ in range(2)]
    readers = [clients.reader(relay, sink=checks[0]), clients.reader(relay, sink=checks[1], **second)]
    publisher = clients.connect(relay)
    sync(publisher, readers, stream.domain_id)
    return readers, checks, publisher


def assert_each_got_the_stream(
    relay: RelayProcess, stream: NumberedStream, readers: list[Reader], checks: list[StreamCheck], timeout: float
) -> None:
    """Every reader got the whole stream, each byte as sent, and the relay dropped no subscriber."""
    for reader, check in zip(readers, checks, strict=True):
        reader.wait_received(stream.total, timeout)
        assert check.mismatch is None and check.offset == stream.total, check.verdict()
    assert relay.find_line("slow subscriber") is None


# -- forwarding ------------------------------------------------------------------


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_mixed_stream_in_tiny_chunks_reaches_each_subscriber_exactly(
    start_relay: StartRelay, clients: Clients, domain: str
) -> None:
    relay = start_relay(domain)
    domain_id = DOMAINS[domain][0]
    subscribers = [clients.reader(relay) for _ in range(3)]
    publisher = clients.connect(relay)
    sync(publisher, subscribers, domain_id)

    rng = random.Random(f"mixed {domain}")
    messages = mixed_messages(rng, domain, 400)
    expected = b"".join(m for m, forwarded in messages if forwarded)
    assert 0 < len(expected) < sum(len(m) for m, _ in messages)
    send_chunked(publisher, b"".join(m for m, _ in messages), rng, (1, 1, 1, 2, 3, 5, 31, 32, 33, 100, 700, 4096))

    for sub in subscribers:
        sub.wait_received(len(expected))
    time.sleep(0.2)  # room for any bytes that should not come
    for i, sub in enumerate(subscribers):
        assert_stream(sub.data, expected, f"subscriber {i}")
    publisher.setblocking(False)
    with pytest.raises(BlockingIOError):
        publisher.recv(1)  # a publisher never gets its own messages back


def publisher_messages(rng: random.Random, source: int, count: int) -> list[bytes]:
    return [
        build_message(1, payload=valid_payload(rng, 1, 19), source=source, sequence=seq, flags=source)
        for seq in range(count)
    ]


def test_two_publishers_interleave_only_whole_messages(start_relay: StartRelay, clients: Clients) -> None:
    relay = start_relay("market_data")
    subscribers = [clients.reader(relay) for _ in range(3)]
    publishers = [clients.connect(relay) for _ in range(2)]
    # Each publisher is also a subscriber of the other one's messages.
    echoes = [clients.reader(relay, sock) for sock in publishers]
    sync(publishers[0], [*subscribers, echoes[1]], 1)
    sync(publishers[1], [*subscribers, echoes[0]], 1)

    sent = [publisher_messages(random.Random(f"publisher {k}"), k + 1, 2500) for k in range(2)]
    streams = [b"".join(msgs) for msgs in sent]
    errors: list[BaseException] = []

    def publish(k: int) -> None:
        try:
            send_chunked(publishers[k], streams[k], random.Random(k), (1, 3, 32, 77, 500, 4096, 65536))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors

    total = sum(map(len, streams))
    for sub in subscribers:
        sub.wait_received(total)
    echoes[0].wait_received(len(streams[1]))
    echoes[1].wait_received(len(streams[0]))
    time.sleep(0.2)

    for i, sub in enumerate(subscribers):
        got = list(decode_messages(bytes(sub.data)))  # raises unless the stream is whole messages only
        for k in range(2):
            mine = [m.raw for m in got if m.header.source == k + 1]
            assert mine == sent[k], f"subscriber {i}: publisher {k}'s messages missing, altered or out of order"
        assert len(got) == sum(map(len, sent)), f"subscriber {i} got messages nobody sent"
    assert_stream(echoes[0].data, streams[1], "publisher 0 reading publisher 1")
    assert_stream(echoes[1].data, streams[0], "publisher 1 reading publisher 0")


def test_publisher_leaving_mid_message_forwards_nothing_of_it(start_relay: StartRelay, clients: Clients) -> None:
    relay = start_relay("signal")
    subscriber = clients.reader(relay)
    first = clients.connect(relay)
    sync(first, [subscriber], 2)

    rng = random.Random("mid-message")
    expected = b""
    whole = build_message(2, payload=valid_payload(rng, 20, 39) + extended_record(21, b"x" * 600), sequence=99)
    for cut in (1, 4, 8, 27, 31, 32, 33, 40, len(whole) - 1):
        publisher = first if cut == 1 else clients.connect(relay)
        done = [build_message(2, [(20, b"%d" % cut)], sequence=k) for k in range(2)]
        publisher.sendall(b"".join(done) + whole[:cut])
        expected += b"".join(done)
        assert subscriber.wait_received(len(expected)), f"complete messages before a cut at {cut} not forwarded"
        time.sleep(0.05)  # let the relay read the partial message before the publisher goes
        publisher.close()

    last = clients.connect(relay)
    tail = build_message(2, [(39, b"after")], sequence=1000)
    last.sendall(tail)
    expected += tail
    subscriber.wait_received(len(expected))
    time.sleep(0.2)
    assert_stream(subscriber.data, expected)


def exact_payload(tlv_type: int, size: int) -> bytes:
    """Records of ``tlv_type`` that fill exactly ``size`` bytes (``size`` >= 5 or 0)."""
    out = b""
    while size - len(out) > 65540:
        out += extended_record(tlv_type, b"\x01" * 65535)
    rest = size - len(out)
    return out + (extended_record(tlv_type, b"\x02" * (rest - 5)) if rest else b"")


FAULT_CASES = {
    # name: (domain, relay options, reason, largest payload allowed, bytes that are fatal)
    "bad_magic": ("market_data", (), "bad_magic", None, build_message(1, [(1, b"m")], magic=0xCAFEBABE)),
    "zero_magic": ("execution", (), "bad_magic", None, bytes(40)),
    "oversize_signal": ("signal", (), "oversize", 32 * KiB, None),
    "oversize_market_data": ("market_data", (), "oversize", 1 * MiB, None),
    "oversize_max_payload": ("market_data", ("--max-payload", "4096"), "oversize", 4096, None),
}


@pytest.fixture
def peer_name() -> Callable[[socket.socket], str]:
    """How the relay's log names the peer of a client socket: by pid on a Unix socket (test_tcp: by address)."""
    return lambda sock: f"pid={os.getpid()}"


@pytest.mark.parametrize("case", list(FAULT_CASES))
def test_stream_fault_closes_only_that_connection(
    start_relay: StartRelay, clients: Clients, peer_name: Callable[[socket.socket], str], case: str
) -> None:
    domain, options, reason, limit, fatal = FAULT_CASES[case]
    domain_id, lo, hi, _ = DOMAINS[domain]
    relay = start_relay(domain, *options)
    subscriber = clients.reader(relay)
    other = clients.connect(relay)
    other_reader = clients.reader(relay, other)
    faulty = clients.connect(relay)
    sync(faulty, [subscriber, other_reader], domain_id)

    before = [build_message(domain_id, [(lo, b"before %d" % k)], sequence=k) for k in range(3)]
    if limit is not None:
        before.append(build_message(domain_id, payload=exact_payload(hi, limit), sequence=3))  # at the limit
        fatal = build_message(domain_id, payload=exact_payload(hi, limit + 1), sequence=4)[:32]  # header only
    after = build_message(domain_id, [(lo, b"after the fault")], sequence=5)
    faulty.sendall(b"".join(before) + fatal + after)

    relay.wait_line(reason, peer_name(faulty))
    faulty.settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        assert faulty.recv(1) == b"", "the relay should have closed the faulty connection"

    others = [build_message(domain_id, [(hi, b"still here %d" % k)], sequence=10 + k) for k in range(2)]
    other.sendall(b"".join(others))
    expected = b"".join(before) + b"".join(others)
    subscriber.wait_received(len(expected))
    other_reader.wait_received(len(b"".join(before)))
    time.sleep(0.2)
    assert_stream(subscriber.data, expected, "subscriber")
    assert_stream(other_reader.data, b"".join(before), "the other client")
    assert relay.proc.poll() is None


def rule_cases(domain: str) -> list[tuple[str, bytes, bool]]:
    """(label, message, forwarded) pairs for the domain rules of PROTOCOL.md."""
    domain_id, lo, hi, verifies = DOMAINS[domain]
    seq = iter(range(1000))

    def msg(records: bytes, **kw: int) -> bytes:
        return build_message(domain_id, payload=records, sequence=next(seq), **kw)

    def corrupt_crc(m: bytes) -> bytes:
        return m[:28] + struct.pack("<I", struct.unpack_from("<I", m, 28)[0] ^ 0x80000000) + m[32:]

    cases = [
        ("lowest type", msg(standard_record(lo, b"lo")), True),
        ("highest type", msg(standard_record(hi, b"hi")), True),
        ("below range", msg(standard_record(lo - 1, b"x")), False),
        ("above range", msg(standard_record(hi + 1, b"x")), False),
        ("extended, highest type", msg(extended_record(hi, b"e" * 400)), True),
        ("extended, above range", msg(extended_record(hi + 1, b"e" * 400)), False),
        ("good checksum", msg(standard_record(lo, b"crc")), True),
        ("bad checksum", corrupt_crc(msg(standard_record(lo, b"crc"))), not verifies),
        ("bad checksum, heartbeat", corrupt_crc(msg(b"")), not verifies),
        ("good checksum again", msg(standard_record(hi, b"crc")), True),
    ]
    if domain == "execution":
        cases += [
            ("type 40", msg(standard_record(40, b"")), True),
            ("type 79", msg(standard_record(79, b"")), True),
            ("type 80", msg(standard_record(80, b"")), False),
            ("type 100 (system)", msg(standard_record(100, b"")), False),
        ]
    return cases


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_domain_rules(start_relay: StartRelay, clients: Clients, domain: str) -> None:
    relay = start_relay(domain)
    subscriber = clients.reader(relay)
    publisher = clients.connect(relay)
    sync(publisher, [subscriber], DOMAINS[domain][0])

    cases = rule_cases(domain)
    publisher.sendall(b"".join(m for _, m, _ in cases))
    expected = b"".join(m for _, m, forwarded in cases if forwarded)
    subscriber.wait_received(len(expected))
    time.sleep(0.2)
    labels = {struct.unpack_from("<Q", m, 8)[0]: label for label, m, _ in cases}
    got = [labels.get(m.header.sequence, "?") for m in decode_messages(bytes(subscriber.data))]
    assert got == [label for label, _, forwarded in cases if forwarded]
    assert_stream(subscriber.data, expected)


# -- slow subscribers ----------------------------------------------------------------


def test_slow_subscriber_is_dropped_and_memory_stays_bounded(start_relay: StartRelay, clients: Clients) -> None:
    relay = start_relay("market_data", "--slow-policy", "disconnect", "--pending-limit", str(1 * MiB))
    stream = NumberedStream(1, [(1, b"w" * 37)], chunk_messages=1846, chunks=1600)  # 71-byte messages, ~200 MiB
    checks = [StreamCheck(stream) for _ in range(2)]
    fast = [clients.reader(relay, sink=check) for check in checks]
    slow = clients.reader(relay)
    publisher = clients.connect(relay)
    sync(publisher, [*fast, slow], 1)

    window = 2 * stream.chunk_size  # keep the fast readers well under the pending limit

    def send(index: int, readers: list[Reader]) -> None:
        for reader in readers:
            assert reader.wait_received(index * stream.chunk_size - window, 10), (
                f"a subscriber stalled: {reader.received} bytes; {relay.stderr[-2000:]}"
            )
        publisher.sendall(stream.chunk(index))

    warm_up = 64
    for i in range(warm_up):  # everyone reads: buffers reach their working size
        send(i, [*fast, slow])
    slow.wait_received(warm_up * stream.chunk_size)
    slow.pause()
    baseline = relay.rss_bytes()
    peak = baseline
    for i in range(warm_up, stream.chunks):
        send(i, fast)
        if i % 8 == 0:
            peak = max(peak, relay.rss_bytes())

    for reader, check in zip(fast, checks, strict=True):
        reader.wait_received(stream.total, 20)
        assert check.mismatch is None and check.offset == stream.total, check.verdict()
    peak = max(peak, relay.rss_bytes())
    assert peak - baseline < 64 * MiB, f"relay RSS grew from {baseline >> 20} MiB to {peak >> 20} MiB"
    relay.wait_line("slow subscriber", f"pid={os.getpid()}")

    slow.resume()
    assert slow.wait_closed(), "the dropped subscriber's connection is still open"
    assert slow.eof or isinstance(slow.error, ConnectionResetError), slow.error
    assert warm_up * stream.chunk_size <= len(slow.data) < stream.total
    assert_stream(slow.data, stream.prefix(len(slow.data)), "what the slow subscriber got before the drop")
    time.sleep(0.1)
    for check in checks:
        assert check.mismatch is None and check.offset == stream.total, check.verdict()


def test_blocked_subscriber_loses_nothing_under_block(start_relay: StartRelay, clients: Clients) -> None:
    relay = start_relay("execution", "--slow-policy", "block", "--pending-limit", str(1 * MiB))
    stream = NumberedStream(3, [(40, b"e" * 2000)], chunk_messages=64, chunks=512)  # ~64 MiB of 2037-byte messages
    (other, slow), checks, publisher = checked_readers(relay, clients, stream)
    slow.pause()

    publisher.settimeout(60)
    sent = [0]
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            for i in range(stream.chunks):
                publisher.sendall(stream.chunk(i))
                sent[0] += stream.chunk_size
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=publish)
    thread.start()
    # Wait for the publisher to stall: the relay stopped reading from it.
    last, still_since = -1, time.monotonic()
    deadline = time.monotonic() + 10
    while time.monotonic() - still_since < 0.5 and time.monotonic() < deadline:
        time.sleep(0.05)
        if sent[0] != last:
            last, still_since = sent[0], time.monotonic()
    stalled_at = sent[0]
    assert thread.is_alive() and stalled_at < stream.total // 2, (
        f"publisher not held back: {stalled_at} of {stream.total} bytes sent while a subscriber read nothing"
    )
    assert other.received < stream.total // 2

    slow.resume()
    thread.join(30)
    assert not thread.is_alive() and not errors
    assert_each_got_the_stream(relay, stream, [other, slow], checks, 20)


@pytest.mark.parametrize(
    "options",
    [
        ("--slow-policy", "block", "--pending-limit", str(256 * KiB)),
        ("--slow-policy", "disconnect", "--pending-limit", str(512 * MiB)),
    ],
    ids=["block", "disconnect-large-limit"],
)
def test_slow_reader_gets_exactly_the_bytes_sent(
    start_relay: StartRelay, clients: Clients, options: tuple[str, ...]
) -> None:
    relay = start_relay("market_data", *options)
    stream = NumberedStream(1, [(1, b"s" * 37)], chunk_messages=14768, chunks=24)  # ~24 MiB of 71-byte messages
    (fast, slow), checks, publisher = checked_readers(relay, clients, stream, pace=random.Random("slow"))

    publisher.settimeout(60)
    for i in range(stream.chunks):
        publisher.sendall(stream.chunk(i))
    assert_each_got_the_stream(relay, stream, [fast, slow], checks, 30)


def test_publisher_that_exits_with_unread_data_loses_none_of_its_messages(
    start_relay: StartRelay, clients: Clients
) -> None:
    """A peer that closes with unread data makes the relay's next write to it fail.

    The messages it sent before closing are complete and must still be
    forwarded, even though the relay had not read them when the write failed.
    """
    relay = start_relay("execution", "--slow-policy", "block", "--pending-limit", str(64 * KiB))
    subscriber = clients.reader(relay)
    leaver = clients.connect(relay)  # publishes, never reads
    talker = clients.connect(relay)  # fills the leaver's pending output
    sync(talker, [subscriber], 3)
    noise = [build_message(3, [(41, b"n" * 200)], source=2, sequence=i) for i in range(40000)]
    ours = [build_message(3, [(40, i.to_bytes(4, "little") * 8)], source=1, sequence=i) for i in range(300)]
    talker.settimeout(30)
    # ~9 MiB the leaver never reads, more than kernel buffers hold: the relay pauses publishers until it is gone.
    thread = threading.Thread(target=talker.sendall, args=(b"".join(noise),))
    thread.start()
    relay.wait_line("pausing publishers")
    leaver.sendall(b"".join(ours))
    leaver.close()  # unread data in its queue: the relay's pending write to it fails
    thread.join(30)
    total = sum(map(len, noise)) + sum(map(len, ours))
    assert subscriber.wait_received(total, 10), f"got {subscriber.received} of {total} bytes"
    by_source: dict[int, list[bytes]] = {1: [], 2: []}
    for message in decode_messages(bytes(subscriber.data)):
        by_source[message.header.source].append(message.raw)
    assert by_source[1] == ours
    assert by_source[2] == noise


def test_subscriber_behind_for_less_than_the_slow_timeout_loses_nothing(
    start_relay: StartRelay, clients: Clients
) -> None:
    """Under ``disconnect`` a subscriber that stalls briefly is waited for, not dropped."""
    relay = start_relay(
        "market_data", "--slow-policy", "disconnect", "--pending-limit", str(256 * KiB), "--slow-timeout", "5"
    )
    stream = NumberedStream(1, [(1, b"m" * 37)], chunk_messages=14000, chunks=16)  # ~16 MiB of 71-byte messages
    (fast, stalling), checks, publisher = checked_readers(relay, clients, stream)
    stalling.pause()
    thread = threading.Thread(target=lambda: [publisher.sendall(stream.chunk(i)) for i in range(stream.chunks)])
    thread.start()
    relay.wait_line("pausing publishers")
    time.sleep(1.0)  # well past a scheduler hiccup, well inside the timeout
    stalling.resume()
    thread.join(30)
    assert_each_got_the_stream(relay, stream, [fast, stalling], checks, 20)


def test_relay_reports_its_counters_and_forwarding_time_on_sigusr1_and_exit(
    start_relay: StartRelay, clients: Clients
) -> None:
    relay = start_relay("signal")
    subscriber = clients.reader(relay)
    publisher = clients.connect(relay)
    sync(publisher, [subscriber], 2)
    good = [build_message(2, [(20, b"s" * 10)], sequence=i) for i in range(50)]
    bad = build_message(2, [(20, b"s" * 10)], checksum=1)
    publisher.sendall(b"".join(good) + bad + bad)
    assert subscriber.wait_received(sum(map(len, good)))
    mark = len(relay.lines)
    relay.send_signal(signal.SIGUSR1)
    summary = relay.wait_line("relay running:", start=mark)
    assert "'bad_checksum': 2" in summary
    timing = relay.wait_line("forwarding time per batch", start=mark)
    match = re.search(
        r"p50 ([\d.]+) us, p99 ([\d.]+) us, p99\.9 ([\d.]+) us, max ([\d.]+) us over (\d+) batches", timing
    )
    assert match, timing
    p50, p99, p999, top = (float(x) for x in match.groups()[:4])
    assert 0 < p50 <= p99 <= p999 <= top and int(match.group(5)) >= 2
    relay.send_signal(signal.SIGTERM)
    assert relay.wait_exit(5) == 0
    assert relay.find_line("relay stopped:", "'bad_checksum': 2", start=mark)
    assert relay.find_line("relay forwarding time per batch", start=mark)
