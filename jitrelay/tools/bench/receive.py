"""How a subscriber worker receives: attach and wait for the probe, then count or time what arrives.

Stream subscribers read a Unix socket (``Reads``) or a jitrelay relay's log
in shared memory (``MappedReads``) in large reads; a zmq subscriber receives
one frame per message (``zmq_receive``). Every loop stops when ``Ending``
says so: all the messages sent have arrived, the stream went quiet, or time
ran out.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from jitrelay.client.shared_log import CutOff
from jitrelay.core.protocol import (
    MAGIC,
    MAGIC_FIELD,
    OFF_MAGIC,
    OFF_SEQUENCE,
    SEQUENCE_FIELD,
    SEQUENCE_TIMESTAMP_FIELDS,
)
from jitrelay.core.units import MiB
from jitrelay.tools.bench.relays import STARTUP_SECONDS, BenchError

RECV_BUFFER = 4 * MiB
POLL_SECONDS = 0.2  # subscriber receive timeout: how often it looks at the control values while idle
IDLE_SECONDS = 1.0  # after the publisher is done, a subscriber silent this long has received all it will
SEQUENCE_CHECK_EVERY = 1024  # a zmq W1 subscriber checks the sequence of one frame in this many


def read_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from a blocking stream; raises ``BenchError`` when the relay closes it first."""
    data = bytearray(n)
    view = memoryview(data)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise BenchError(f"relay closed the connection after {got} of {n} probe bytes")
        got += k
    return bytes(data)


class Ending:
    """When a subscriber stops: the stream went quiet after the publisher finished, or time ran out."""

    def __init__(self, expected: Any, limit_s: float):
        self.expected = expected
        self.deadline = time.monotonic() + limit_s
        self.quiet_since = time.monotonic()
        self.known_at: float | None = None

    def data(self, at: float | None = None) -> None:
        """Data arrived now, or at monotonic time ``at`` (a receiver that skips the call per message)."""
        self.quiet_since = max(self.quiet_since, time.monotonic() if at is None else at)

    def on_timeout(self, received: int) -> str | None:
        """Why to stop, after a receive that timed out with ``received`` messages in; None to go on."""
        now = time.monotonic()
        if now > self.deadline:
            return "deadline"
        if self.expected.value < 0:
            return None
        if received >= self.expected.value:
            return "all received"
        if self.known_at is None:
            self.known_at = now
        if now - max(self.quiet_since, self.known_at) > IDLE_SECONDS:
            return "quiet"
        return None


def shared_subscriber(path: str, buffer_size: int = RECV_BUFFER, tlv_types: list[int] | None = None) -> Any:
    """A ``Subscriber(shared_memory=True)``: returns once the relay has granted it the log (or raises)."""
    from jitrelay.client import Subscriber

    return Subscriber("market_data", path, buffer_size=buffer_size, tlv_types=tlv_types, shared_memory=True)


def mapped_await_probe(sub: Any, probe: bytes) -> None:
    """The probe is the first message a granted subscriber reads from the log."""
    batch = sub.recv_batch(STARTUP_SECONDS)
    if batch is None or batch.tobytes() != probe:
        raise BenchError("the first message read from shared memory was not the probe")


def await_probe(sock: socket.socket, probe: bytes) -> None:
    """The probe comes first on a stream; after it, reads time out every ``POLL_SECONDS``."""
    sock.settimeout(STARTUP_SECONDS)
    if read_exactly(sock, len(probe)) != probe:
        raise BenchError("the first bytes received were not the probe message")
    sock.settimeout(POLL_SECONDS)


def zmq_await_probe(sock: Any, probe: bytes) -> None:
    """The first frame is the probe; after it, receives time out every ``POLL_SECONDS``."""
    import zmq

    sock.setsockopt(zmq.RCVTIMEO, int(STARTUP_SECONDS * 1000))
    try:
        first = sock.recv()
    except zmq.Again:
        raise BenchError(f"no probe within {STARTUP_SECONDS:.0f} s") from None
    if first != probe:
        raise BenchError("the first message received was not the probe")
    sock.setsockopt(zmq.RCVTIMEO, int(POLL_SECONDS * 1000))


class Reads:
    """A stream subscriber's reads into one reused buffer, until its ``Ending`` or the relay says stop.

    Iterating yields each read's byte count (the bytes are in ``buf``);
    ``received`` tells how many whole messages the caller has taken so far.
    ``wall_ns`` is ``time.time_ns()`` right after the latest read,
    ``first_ns``/``last_ns`` the monotonic times of the first and latest, and
    ``stop`` why the reads ended.
    """

    def __init__(self, sock: Any, expected: Any, limit_s: float, received: Callable[[], int]):
        self.sock = sock
        self.buf: Any = bytearray(RECV_BUFFER)
        self.view: Any = memoryview(self.buf)
        self.ending = Ending(expected, limit_s)
        self.received = received
        self.stop: str | None = None
        self.wall_ns = self.first_ns = self.last_ns = 0

    def __iter__(self) -> Iterator[int]:
        recv_into, buf, ending = self.sock.recv_into, self.buf, self.ending
        while self.stop is None:
            try:
                n = recv_into(buf)
            except TimeoutError:
                self.stop = ending.on_timeout(self.received())
                continue
            self.wall_ns = time.time_ns()
            if n == 0:
                self.stop = "closed by relay"
                return
            self.last_ns = time.monotonic_ns()
            self.first_ns = self.first_ns or self.last_ns
            yield n
            ending.data()
            if 0 <= ending.expected.value <= self.received():
                self.stop = "all received"

    def result(self, received: int, partial: int, last_sequence: int | None, gaps: int, bad_magic: int) -> dict:
        """The figures every subscriber reports."""
        return {
            "received": received,
            "partial_bytes": partial,
            "first_to_last_s": (self.last_ns - self.first_ns) / 1e9,
            "last_sequence": last_sequence,
            "sequence_gaps": gaps,
            "bad_magic": bad_magic,
            "stop": self.stop,
        }


class MappedReads(Reads):
    """``Reads`` of a shared-memory ``Subscriber``: each batch it copies out of the mapped log is one read.

    ``buf`` and ``view`` are that batch (whole messages, a fresh array each
    time); it waits on the log's futex word for ``POLL_SECONDS`` at most.
    """

    def __init__(self, sub: Any, expected: Any, limit_s: float, received: Callable[[], int]):
        super().__init__(sub, expected, limit_s, received)
        self.buf = self.view = None

    def __iter__(self) -> Iterator[int]:
        recv_batch, ending = self.sock.recv_batch, self.ending
        while self.stop is None:
            try:
                batch = recv_batch(POLL_SECONDS)
            except EOFError as exc:  # the relay went away, or overwrote what this reader had yet to read
                self.stop = "lapped" if isinstance(exc, CutOff) else "closed by relay"
                return
            if batch is None:
                self.stop = ending.on_timeout(self.received())
                continue
            self.wall_ns = time.time_ns()
            self.last_ns = time.monotonic_ns()
            self.first_ns = self.first_ns or self.last_ns
            self.buf = self.view = batch
            yield len(batch)
            ending.data()
            if 0 <= ending.expected.value <= self.received():
                self.stop = "all received"


def count_messages(
    reader: type[Reads], sock: Any, size: int, expected: Any, limit_s: float, stride: int = 1, first: int = 0
) -> dict:
    """Count whole messages; message ``i`` received should carry sequence ``first + i * stride``."""
    keep = 2 * size
    tail = b""
    total = 0
    seq_shift = first
    gaps = bad_magic = 0
    reads = reader(sock, expected, limit_s, lambda: total // size)
    for n in reads:
        buf, view = reads.buf, reads.view  # a mapped read's batch is new each time; a socket's buffer is not
        # The one message header that starts in this read, if it is whole: magic and sequence.
        skip = -total % size
        if skip + OFF_SEQUENCE + SEQUENCE_FIELD.size <= n:
            index = (total + skip) // size
            if MAGIC_FIELD.unpack_from(buf, skip + OFF_MAGIC)[0] != MAGIC:
                bad_magic += 1
            else:
                seq = SEQUENCE_FIELD.unpack_from(buf, skip + OFF_SEQUENCE)[0]
                if seq != index * stride + seq_shift:
                    gaps += 1
                    seq_shift = seq - index * stride
        tail = bytes(view[n - keep : n]) if n >= keep else (tail + bytes(view[:n]))[-keep:]
        total += n
    received, partial = divmod(total, size)
    last_seq = SEQUENCE_FIELD.unpack_from(tail, len(tail) - partial - size + OFF_SEQUENCE)[0] if received else None
    return reads.result(received, partial, last_seq, gaps, bad_magic)


def time_messages(reader: type[Reads], sock: Any, size: int, expected: Any, limit_s: float) -> dict:
    """Time every message: receive time minus the send time it carries (its slot on the publisher's schedule)."""
    import numpy as np

    latencies: list[int] = []
    carry = b""
    received = next_seq = gaps = bad_magic = 0
    reads = reader(sock, expected, limit_s, lambda: received)
    for n in reads:
        now_ns, view = reads.wall_ns, reads.view
        data = carry + bytes(view[:n]) if carry else view[:n]
        whole = len(data) // size
        for k in range(whole):
            pos = k * size
            if MAGIC_FIELD.unpack_from(data, pos + OFF_MAGIC)[0] != MAGIC:
                bad_magic += 1
                continue
            seq, sent_ns = SEQUENCE_TIMESTAMP_FIELDS.unpack_from(data, pos + OFF_SEQUENCE)
            latencies.append(now_ns - sent_ns)
            if seq != next_seq:
                gaps += 1
            next_seq = seq + 1
        carry = bytes(data[whole * size :])
        received += whole
    result = reads.result(received, len(carry), next_seq - 1 if received else None, gaps, bad_magic)
    result["latency_ns"] = np.asarray(latencies, dtype=np.int64).tobytes()
    return result


def zmq_receive(sock: Any, size: int, timing: bool, expected: Any, limit_s: float) -> dict:
    """Count (or with ``timing`` time) frames; per frame only what it must, so the baseline is not slowed."""
    import numpy as np
    import zmq

    latencies: list[int] = []
    received = probes = first_ns = last_ns = seq_shift = gaps = bad_magic = 0
    last = b""
    ending = Ending(expected, limit_s)
    stop = None
    recv = sock.recv
    while stop is None:
        try:
            frame = recv()
        except zmq.Again:
            if received:
                ending.data(at=last_ns / 1e9)
            stop = ending.on_timeout(received)
            continue
        last_ns = time.monotonic_ns()
        if len(frame) != size:  # one of the probes repeated until every subscriber had one
            probes += 1
            continue
        if timing:
            seq, sent_ns = SEQUENCE_TIMESTAMP_FIELDS.unpack_from(frame, OFF_SEQUENCE)
            latencies.append(time.time_ns() - sent_ns)
            gaps += seq != received + seq_shift
            seq_shift = seq - received
        elif not received % SEQUENCE_CHECK_EVERY:
            if MAGIC_FIELD.unpack_from(frame, OFF_MAGIC)[0] != MAGIC:
                bad_magic += 1
            seq = SEQUENCE_FIELD.unpack_from(frame, OFF_SEQUENCE)[0]
            gaps += seq != received + seq_shift
            seq_shift = seq - received
        if not received:
            first_ns = last_ns
        received += 1
        last = frame
    sock.close(linger=0)
    result = {
        "received": received,
        "partial_bytes": 0,
        "first_to_last_s": (last_ns - first_ns) / 1e9,
        "last_sequence": SEQUENCE_FIELD.unpack_from(last, OFF_SEQUENCE)[0] if received else None,
        "sequence_gaps": gaps,
        "bad_magic": bad_magic,
        "extra_probes": probes,
        "stop": stop,
    }
    if timing:
        result["latency_ns"] = np.asarray(latencies, dtype=np.int64).tobytes()
    return result
