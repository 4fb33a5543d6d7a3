"""Stream fuzzing against a running relay: hostile bytes must not hurt anyone else.

One relay per domain runs for the whole module, with two long-lived
observers: a clean publisher that sends valid numbered messages and a
subscriber. Each Hypothesis example opens one to three fuzzing connections
that send arbitrary bytes, valid messages, per-message rejects and valid
messages with one byte flipped or replaced, all in random chunks, while the
clean publisher sends at the same time. ``reference.reference_scan`` says
what the relay must forward from each connection: the messages with verdict
forward before its first stream-fatal fault (after which the relay closes it
and discards the rest); a partial message left when the fuzzer hangs up is
discarded. A fuzzer hangs up only its sending side, then reads until the
relay closes the connection (at the fault, or at the hang-up), so when every
fuzzer is closed the relay has judged all their bytes.

Each example then checks, on exact bytes: the relay is alive and logged one
line per stream fault; every fuzzing connection was closed by the relay;
each observer's stream is whole valid messages only; the subscriber got the
clean publisher's messages (told apart by a random marker no fuzzer can
produce) all, in order, unchanged; and what each observer got is exactly an
interleaving of what every other connection must have forwarded, nothing
more, nothing less. A probe round trip (clean publisher to subscriber, then
back) ends every example so none bleeds into the next.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import reference as ref
from support import strategies
from support.relays import RelayProcess
from support.streams import ThreadedReader, send_chunked

from jitrelay.core.protocol import BAD_MAGIC, FAULT_NAMES, FORWARD, NO_FAULT, OVERSIZE, VERDICT_NAMES

TOKEN = os.urandom(16)  # in every clean and probe message; no fuzzing connection can guess it
CLEAN_MARK = TOKEN + b"clean"
PROBE_MARK = TOKEN + b"probe"
CHUNK_SIZES = (1, 1, 2, 3, 7, 31, 32, 33, 64, 200, 4096)
CLOSE_TIMEOUT = 10.0
FUZZ_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the observers -----------------------------------------------------------------


class Observer(ThreadedReader):
    """A long-lived connection whose incoming stream a thread reads; ``stream_until`` cuts it at probes."""

    def __init__(self, relay: RelayProcess, domain: ref.Domain) -> None:
        self.sock = relay.connect(CLOSE_TIMEOUT)
        super().__init__(self.sock, 1 << 16)
        self.domain = domain
        self.data = bytearray()
        self.pos = 0  # stream offset of the first byte not yet handed out
        self.start()

    @property
    def closed(self) -> str | None:
        """Why the relay closed this connection, or None while it is open."""
        if self.error is not None:
            return repr(self.error)
        return "EOF" if self.eof else None

    def _received(self, chunk: memoryview) -> None:
        with self.changed:
            self.data += chunk
            self.changed.notify_all()

    def stream_until(self, probe: bytes, timeout: float = CLOSE_TIMEOUT) -> bytes | None:
        """The bytes that arrive before ``probe``, which is consumed too; None if it does not come in time."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while (at := self.data.find(probe, self.pos)) < 0:
                assert self.closed is None, f"the relay closed an observer ({self.closed})"
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(left)
            segment = bytes(self.data[self.pos : at])
            self.pos = at + len(probe)
            return segment

    def send(self, data: bytes, rng: random.Random) -> None:
        send_chunked(self.sock, data, rng, CHUNK_SIZES, pause_chance=0.15)

    def close(self) -> None:
        self.stop()
        self.sock.close()


@dataclass
class Rig:
    relay: RelayProcess
    domain: ref.Domain
    publisher: Observer
    subscriber: Observer
    clean_sent: int = 0
    probes: int = 0

    def probe(self, mark: bytes) -> bytes:
        self.probes += 1
        lo = self.domain.ranges[0][0]
        return ref.message(self.domain.ident, ref.standard_record(lo, mark + struct.pack("<Q", self.probes)))

    def sync(self) -> tuple[bytes, bytes]:
        """A probe from the publisher to the subscriber and one back: what each observer got before its probe.

        Both streams are taken whole before anything is judged, so a failing
        example leaves nothing behind to fail the examples Hypothesis tries next.
        """
        forth = self.probe(PROBE_MARK)
        self.publisher.sock.sendall(forth)
        at_subscriber = self.subscriber.stream_until(forth)
        assert at_subscriber is not None, f"the subscriber did not get the probe within {CLOSE_TIMEOUT} s"
        back = self.probe(PROBE_MARK)
        self.subscriber.sock.sendall(back)
        at_publisher = self.publisher.stream_until(back)
        assert at_publisher is not None, f"the clean publisher did not get the probe within {CLOSE_TIMEOUT} s"
        return at_subscriber, at_publisher


def whole_messages(what: str, stream: bytes, domain: ref.Domain) -> list[bytes]:
    """Split what the relay sent into messages; fail at the first byte that is not a message it may forward."""
    judged, end, fault = ref.reference_scan(stream, domain.ident, domain.max_payload, domain.checksum, domain.ranges)
    assert fault == NO_FAULT and end == len(stream), (
        f"{what}: byte {end} does not start a whole message ({FAULT_NAMES[fault]}): {stream[end : end + 32].hex()}"
    )
    for offset, _, verdict in judged:
        assert verdict == FORWARD, f"{what}: byte {offset} starts a {VERDICT_NAMES[verdict]} message"
    return [stream[offset : offset + n] for offset, n, _ in judged]


@pytest.fixture(scope="module", params=["market_data", "signal"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    name: str = request.param
    folder = Path(tempfile.mkdtemp(prefix="jr-fuzz-", dir="/tmp"))
    relay = RelayProcess(name, folder / f"{name}.sock")
    publisher = subscriber = None
    try:
        relay.wait_ready()
        publisher = Observer(relay, ref.DOMAINS[name])
        subscriber = Observer(relay, ref.DOMAINS[name])
        rig = Rig(relay, ref.DOMAINS[name], publisher, subscriber)
        # The relay may not have accepted the subscriber yet: probe until one reaches it.
        deadline = time.monotonic() + CLOSE_TIMEOUT
        while True:
            probe = rig.probe(PROBE_MARK)
            publisher.sock.sendall(probe)
            if subscriber.stream_until(probe, 0.1) is not None:
                break
            assert time.monotonic() < deadline, "the subscriber never received a probe"
        rig.sync()
        yield rig
    finally:
        for observer in (publisher, subscriber):
            if observer is not None:
                observer.close()
        relay.kill()
        shutil.rmtree(folder, ignore_errors=True)


# -- what the fuzzers send ---------------------------------------------------------


@st.composite
def mutated_message(draw: st.DrawFn, domain: ref.Domain) -> bytes:
    """A valid message with one byte flipped in one bit or replaced by another value."""
    message = draw(strategies.judged_message(domain, draw(st.sampled_from(["forward", "empty"]))))
    at = draw(st.integers(0, len(message) - 1))
    if draw(st.booleans()):
        new = message[at] ^ (1 << draw(st.integers(0, 7)))
    else:
        new = draw(st.integers(0, 255).filter(lambda b: b != message[at]))
    return message[:at] + bytes((new,)) + message[at + 1 :]


def piece(domain: ref.Domain) -> st.SearchStrategy[bytes]:
    """Mostly messages, so streams often get far before a fault; sometimes raw bytes."""
    kinds = {
        "valid": strategies.judged_message(domain, "forward"),
        "any": strategies.any_message(domain),
        "mutated": mutated_message(domain),
        "magic_rich": strategies.magic_rich_bytes(),
        "arbitrary": st.binary(max_size=64),
    }
    weights = ["valid"] * 3 + ["any"] * 2 + ["mutated"] * 3 + ["magic_rich", "arbitrary"]
    return st.sampled_from(weights).flatmap(kinds.__getitem__)


@st.composite
def fuzz_stream(draw: st.DrawFn, domain: ref.Domain) -> bytes:
    body = b"".join(draw(st.lists(piece(domain), max_size=8)))
    return body + draw(strategies.tail(domain, domain.max_payload))


@st.composite
def clean_messages(draw: st.DrawFn, domain: ref.Domain) -> list[tuple[bytes, dict[str, int]]]:
    """Valid payloads and header fields; ``number_clean`` puts a numbered marker record in front of each."""
    payloads = draw(st.lists(strategies.valid_payload(domain, max_records=2), max_size=8))
    return [(payload, draw(strategies.header_fields())) for payload in payloads]


def number_clean(rig: Rig, drawn: list[tuple[bytes, dict[str, int]]]) -> list[bytes]:
    """The clean publisher's messages, each unique across the whole run."""
    lo = rig.domain.ranges[0][0]
    out = []
    for payload, fields in drawn:
        rig.clean_sent += 1
        marker = ref.standard_record(lo, CLEAN_MARK + struct.pack("<Q", rig.clean_sent))
        out.append(ref.message(rig.domain.ident, marker + payload, **fields))
    return out


def must_forward(data: bytes, domain: ref.Domain) -> tuple[list[bytes], int]:
    """What the relay must forward from a connection that sends ``data`` then hangs up, and its stream fault."""
    judged, _, fault = ref.reference_scan(data, domain.ident, domain.max_payload, domain.checksum, domain.ranges)
    return [data[at : at + n] for at, n, verdict in judged if verdict == FORWARD], fault


# -- checks --------------------------------------------------------------------------


def is_interleaving(got: list[bytes], sequences: list[list[bytes]]) -> bool:
    """Whether ``got`` is exactly the sequences merged with each one's order kept (search over index tuples)."""
    if len(got) != sum(len(s) for s in sequences):
        return False
    start = (0,) * len(sequences)
    stack, seen = [start], {start}
    while stack:
        state = stack.pop()
        k = sum(state)
        if k == len(got):
            return True
        for i, seq in enumerate(sequences):
            if state[i] < len(seq) and seq[state[i]] == got[k]:
                nxt = state[:i] + (state[i] + 1,) + state[i + 1 :]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
    return False


def assert_received(what: str, got: list[bytes], sequences: list[list[bytes]]) -> None:
    """``got`` holds exactly the messages of ``sequences``, each sequence in its own order."""
    want = Counter(m for seq in sequences for m in seq)
    have = Counter(got)
    missing, extra = want - have, have - want
    if missing or extra:
        raise AssertionError(
            f"{what}: {sum(missing.values())} messages missing, {sum(extra.values())} unexpected; "
            f"first missing {next(iter(missing), b'')[:48].hex()}; first unexpected {next(iter(extra), b'')[:48].hex()}"
        )
    assert is_interleaving(got, sequences), f"{what}: the messages arrived out of their publishers' order"


def fault_lines(relay: RelayProcess, start: int) -> Counter[str]:
    """Stream faults the relay logged from line ``start`` on, by reason."""
    names = (FAULT_NAMES[BAD_MAGIC], FAULT_NAMES[OVERSIZE])
    return Counter(name for line in relay.lines[start:] for name in names if f": {name}" in line)


# -- the test ------------------------------------------------------------------------


class Fuzzer:
    """Sends its bytes in random chunks, hangs up its sending side, then reads until the relay closes it."""

    def __init__(self, relay: RelayProcess, data: bytes, rng: random.Random) -> None:
        self.sock = relay.connect(CLOSE_TIMEOUT)
        self.data = data
        self.rng = rng
        self.closed_by_relay = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            try:
                send_chunked(self.sock, self.data, self.rng, CHUNK_SIZES, pause_chance=0.15)
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                if isinstance(exc, TimeoutError):
                    raise
                # closed at a stream fault while still sending
            while True:
                try:
                    if not self.sock.recv(1 << 16):
                        break
                except ConnectionResetError:
                    break
            self.closed_by_relay = True
        except BaseException as exc:  # a timeout, reported by the test
            self.error = exc
        finally:
            self.sock.close()


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzzed_connections_hurt_nobody(rig: Rig, data: st.DataObject) -> None:
    domain = rig.domain
    streams = data.draw(st.lists(fuzz_stream(domain), min_size=1, max_size=3), label="fuzz streams")
    clean = number_clean(rig, data.draw(clean_messages(domain), label="clean messages"))
    # Seeds, not st.randoms(): the senders draw on threads, and Hypothesis needs its draws in a fixed order.
    seeds = data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=len(streams) + 1, max_size=len(streams) + 1))
    rngs = [random.Random(seed) for seed in seeds]
    log_start = len(rig.relay.lines)

    expected = [must_forward(stream, domain) for stream in streams]
    for forwarded, fault in expected:
        event(f"fuzzer forwards {'some' if forwarded else 'none'}, then {FAULT_NAMES[fault]}")
    fuzzers = [Fuzzer(rig.relay, stream, rng) for stream, rng in zip(streams, rngs, strict=False)]
    for fuzzer in fuzzers:
        fuzzer.thread.start()
    rig.publisher.send(b"".join(clean), rngs[-1])
    for fuzzer in fuzzers:
        fuzzer.thread.join(CLOSE_TIMEOUT)
    for i, fuzzer in enumerate(fuzzers):
        assert fuzzer.error is None and fuzzer.closed_by_relay, (
            f"fuzzer {i}: the relay did not close the connection ({fuzzer.error!r}); "
            f"fault {FAULT_NAMES[expected[i][1]]}, {len(streams[i])} bytes sent"
        )
    assert rig.relay.proc.poll() is None, f"the relay died:\n{rig.relay.stderr}"

    streams_at = rig.sync()
    at_subscriber = whole_messages("subscriber", streams_at[0], domain)
    at_publisher = whole_messages("clean publisher", streams_at[1], domain)
    from_fuzzers = [forwarded for forwarded, _ in expected]
    got_clean = [m for m in at_subscriber if CLEAN_MARK in m]
    assert got_clean == clean, f"the subscriber got {len(got_clean)} of {len(clean)} clean messages, or changed"
    assert_received("subscriber", at_subscriber, [clean, *from_fuzzers])
    assert_received("clean publisher", at_publisher, from_fuzzers)

    faults = Counter(FAULT_NAMES[fault] for _, fault in expected if fault != NO_FAULT)
    deadline = time.monotonic() + 5
    while fault_lines(rig.relay, log_start) != faults and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fault_lines(rig.relay, log_start) == faults, rig.relay.stderr.splitlines()[log_start:]
    assert not [line for line in rig.relay.lines[log_start:] if "Traceback" in line or " ERROR " in line], (
        rig.relay.stderr
    )
    assert rig.relay.proc.poll() is None, f"the relay died:\n{rig.relay.stderr}"
