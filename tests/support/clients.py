"""Raw-socket clients written from PROTOCOL.md, and the checks on exact bytes the end-to-end tests make."""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable

import numpy as np

from jitrelay.core.protocol import MAGIC_BYTES, build_batch, build_message, decode_messages
from jitrelay.core.units import MiB
from support import reference as ref
from support.reference import extended_record, standard_record
from support.relays import RelayProcess
from support.streams import ThreadedReader

# name -> (domain id, lowest and highest TLV type of its first range, verifies checksums), from PROTOCOL.md
DOMAINS = {
    "market_data": (1, 1, 19, False),
    "signal": (2, 20, 39, True),
    "execution": (3, 40, 59, True),
}


PROBE_MARK = 0xEE  # source and flags of sync probes


SLOW_READS = (1, 13, 512, 4096, 16384, 32768, 65536)  # read sizes of a slow subscriber


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
    """Records of the domain whose first range is ``lo..hi``, and one of a type none of its ranges holds."""
    ranges = next(d.ranges for d in ref.DOMAINS.values() if d.ranges[0] == (lo, hi))
    candidates = (lo - 1, hi + 1, 1, 19, 20, 39, 40, 59, 60, 79, 80, 100, 119, 120, 199)
    outside = [t for t in candidates if t and not ref.in_ranges(t, ranges)]
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
            version = rng.choice((0, 3, 4, 255))
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


def publisher_messages(rng: random.Random, source: int, count: int) -> list[bytes]:
    return [
        build_message(1, payload=valid_payload(rng, 1, 19), source=source, sequence=seq, flags=source)
        for seq in range(count)
    ]


def exact_payload(tlv_type: int, size: int) -> bytes:
    """Records of ``tlv_type`` that fill exactly ``size`` bytes (``size`` >= 5 or 0)."""
    out = b""
    while size - len(out) > 65540:
        out += extended_record(tlv_type, b"\x01" * 65535)
    rest = size - len(out)
    return out + (extended_record(tlv_type, b"\x02" * (rest - 5)) if rest else b"")


def publish_while_stopped(
    relay: RelayProcess, publisher: socket.socket, stream: NumberedStream, stopped_pid: int, other: Reader
) -> None:
    """Publish all of ``stream`` while process ``stopped_pid`` is stopped, under ``block``.

    The relay must hold the publisher before ``other`` has had everything; then
    the stopped one goes on, and this returns once the publisher has sent the
    whole stream and ``other`` has received it.
    """
    os.kill(stopped_pid, signal.SIGSTOP)
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            publisher.settimeout(60)
            for i in range(stream.chunks):
                publisher.sendall(stream.chunk(i))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=publish)
    try:
        thread.start()
        relay.wait_line("the log is full up to the slowest subscriber", "holding", timeout=30)
        assert thread.is_alive() and other.received < stream.total
    finally:
        os.kill(stopped_pid, signal.SIGCONT)
    thread.join(60)
    assert not thread.is_alive() and not errors
    assert other.wait_received(stream.total, 30)
