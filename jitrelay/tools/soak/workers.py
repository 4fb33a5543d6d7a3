"""The soak's client processes: publishers that write their streams cut mid-message, subscribers that verify.

Both run in processes forked from the controller's forkserver (which has
this module loaded) and count into their ``Counters`` in shared memory, which
the controller reads even after a SIGKILL; failure details go to one file
each. The tests run the same roles in threads, with lists for counters.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time
import traceback
from collections.abc import Iterable, MutableSequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from jitrelay.core import protocol
from jitrelay.core.domains import logic_for
from jitrelay.core.units import MiB
from jitrelay.testing.processes import die_with_parent
from jitrelay.tools.soak.counters import (
    CLOSED_BY_RELAY,
    CONNECTED,
    ENDED,
    ERROR,
    RUNNING,
    STOPPING,
    Counters,
    named,
)
from jitrelay.tools.soak.verify import BEACON_FLAGS, ECHO_FLAGS, SOAK_SOURCE, Sources, StreamVerifier

TICK = 0.005  # publisher pacing step
POLL = 0.1  # subscriber receive timeout: how often it looks at the controller's phase
STALL_MIN = 0.1
UNSUBSCRIBE_SHARE = 0.25  # of a filtered subscriber's changes

Stats = Counters | MutableSequence[int]  # a client's counters: shared ``Counters``, or a list in the tests


@dataclass(frozen=True)
class ClientConfig:
    """What every client needs to know, fixed for the run."""

    socket_path: str
    domain: str
    domain_id: int
    max_payload: int
    publisher_rate: float
    max_size: int
    stall_prob: float
    stall_max: float
    resubscribe_prob: float = 0.0


@dataclass(frozen=True)
class SubscriberRole:
    """Who a subscriber is: its index names its beacons; ``sources`` is its subscription at connect (None: all)."""

    index: int
    from_start: bool = False  # attached before any publisher: every stream must start at 0
    witness: bool = False  # never stalls, never changes its subscription
    sources: Sources = None
    # Positions: asks for them; records where it stands, and its streams' sequences, in ``state_path`` (JSON,
    # replaced whole) after each read; tells of gaps in ``gaps_path`` (JSON lines); the witness records keys.
    positioned: bool = False
    resume: tuple[str, dict[int, int]] | None = None  # (position, last sequences) to go on from
    state_path: str = ""
    gaps_path: str = ""
    keys_path: str = ""
    shm: bool = False  # reads the relay's log from shared memory once granted (client.shared_log)


def client_main(
    kind: str, config: ClientConfig, stats: Stats, ctrl: Any, detail_path: str, seed: int, arg: int | SubscriberRole
) -> None:
    """Entry point of a client process: ``arg`` is the stream key of a publisher, or a subscriber's role.

    Raises nothing: whatever goes wrong is its ``error`` state and a traceback in ``detail_path``.
    """
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller decides when to stop
    rng = random.Random(seed)
    with open(detail_path, "a", buffering=1) as details:
        try:
            if isinstance(arg, SubscriberRole):
                run_subscriber(config, stats, ctrl, rng, arg, details)
            else:
                run_publisher(config, stats, ctrl, rng, arg)
        except BaseException:
            named(stats).state = ERROR
            details.write(json.dumps({"kind": "error", "traceback": traceback.format_exc()}) + "\n")


def _message_records(config: ClientConfig, rng: random.Random) -> list[tuple[int, bytes]]:
    """One record of the domain's first TLV type, sized at random up to ``max_size`` bytes of message."""
    tlv_type = protocol.DOMAIN_TLV_RANGES[config.domain_id][0][0]
    longest = config.max_size - protocol.HEADER_SIZE - 2
    value_len = rng.randint(0, max(0, longest))
    if value_len > protocol.MAX_STANDARD_VALUE:  # an extended record: 3 more bytes of record header
        value_len = value_len - 3 if value_len - 3 > protocol.MAX_STANDARD_VALUE else protocol.MAX_STANDARD_VALUE
    return [(tlv_type, rng.randbytes(value_len))]


def run_publisher(config: ClientConfig, stats: Stats, ctrl: Any, rng: random.Random, key: int) -> None:
    """Publish stream ``key`` at ``publisher_rate`` until ``ctrl[0]`` leaves ``RUNNING``; counters go to ``stats``.

    ``stats`` is the publisher's ``Counters`` (or a list of them by slot) and
    ``ctrl`` a sequence of ints: shared memory in the soak, so the controller
    reads them even after a SIGKILL. A relay that closes the connection ends
    it as ``closed_by_relay``; other errors propagate.

    Each write stops at a random byte inside the last message, and the rest
    goes first in the next write: the relay almost always holds a partial
    message from us, so a SIGKILL tears one.
    """
    from jitrelay.client import Publisher, RelayConnectionError

    counters = named(stats)
    source, flags = key & 0xFF, key >> 8
    made = 0  # messages built; the stream so far is sequences 0..made-1
    pending = b""
    try:
        publisher = Publisher(config.domain, config.socket_path, source=source, reconnect=False)  # a loss ends it
    except RelayConnectionError:
        counters.state = CLOSED_BY_RELAY
        return
    counters.state = CONNECTED
    started = time.monotonic()
    try:
        while ctrl[0] == RUNNING:
            due = int((time.monotonic() - started) * config.publisher_rate) - made
            if due <= 0:
                time.sleep(TICK)
                continue
            records = _message_records(config, rng)
            size = protocol.HEADER_SIZE + len(protocol.encode_records(records))
            count = min(due, max(1, MiB // size))
            batch = protocol.build_batch(
                config.domain_id, count, records, source=source, flags=flags, first_sequence=made, checksums=True
            )
            data = pending + batch.tobytes()
            cut = len(data) - rng.randrange(size)
            publisher.publish_raw(data[:cut])
            pending = data[cut:]
            made += count
            counters.published = made - (1 if pending else 0)
        publisher.publish_raw(pending)
        counters.published = made
        publisher.close()
        counters.state = ENDED
    except RelayConnectionError:
        counters.state = CLOSED_BY_RELAY


def soak_message(domain_id: int, flags: int, sequence: int) -> bytes:
    """A message of the soak's own source: a beacon or an echo, ``sequence`` naming the change it is for.

    Raises ``KeyError`` for a domain without TLV ranges.
    """
    tlv_type = protocol.DOMAIN_TLV_RANGES[domain_id][0][0]
    name = b"echo" if flags == ECHO_FLAGS else b"beacon"
    return protocol.build_message(domain_id, [(tlv_type, name)], source=SOAK_SOURCE, flags=flags, sequence=sequence)


def pick_sources(rng: random.Random, live: Iterable[int]) -> frozenset[int]:
    """A random subset of the publishers' sources (one to all but one of them), with the soak's own source."""
    publishers = sorted({s for s in live if s != SOAK_SOURCE})
    chosen = rng.sample(publishers, rng.randint(1, max(1, len(publishers) - 1))) if publishers else []
    return frozenset([SOAK_SOURCE, *chosen])


def next_subscription(rng: random.Random, current: Sources, live: Iterable[int]) -> Sources:
    """A subscriber's next subscription: now and then everything again (None), else another subset."""
    if current is not None and rng.random() < UNSUBSCRIBE_SHARE:
        return None
    live = list(live)
    sources = pick_sources(rng, live)
    for _ in range(3):  # another subset, when there is one
        if sources != current:
            break
        sources = pick_sources(rng, live)
    return sources


def run_subscriber(
    config: ClientConfig, stats: Stats, ctrl: Any, rng: random.Random, role: SubscriberRole, details: IO[str]
) -> None:
    """Read and verify every message until the relay closes the connection; stall and resubscribe now and then.

    A subscription goes out with a beacon right behind it (``index << 32 |
    change number``); the echo of that beacon ends the switch window. New
    subsets are drawn from the publishers' current sources, ``ctrl[1:]``.
    Failure details go to ``details`` as JSON lines. A connection the relay
    refuses or closes ends it as ``closed_by_relay``; other errors propagate.
    """
    gaps = open(role.gaps_path, "a", buffering=1) if role.gaps_path else None  # noqa: SIM115
    try:
        subscriber = _Subscriber(config, named(stats), ctrl, rng, role, details, gaps)
        if subscriber.connect():
            subscriber.run()
    finally:
        if gaps is not None:
            gaps.close()


class _Subscriber:
    """One subscriber's connection, verifier and counters, and the stalls and subscription changes it makes."""

    def __init__(
        self,
        config: ClientConfig,
        counters: Counters,
        ctrl: Any,
        rng: random.Random,
        role: SubscriberRole,
        details: IO[str],
        gaps: IO[str] | None,
    ):
        self.config, self.counters, self.ctrl, self.rng, self.role = config, counters, ctrl, rng, role
        self.resume = None
        if role.resume is not None:
            position, last = role.resume
            self.resume = (protocol.Position.parse(position), {int(k): v for k, v in last.items()})
        self.verifier = StreamVerifier(
            config.domain_id,
            config.max_payload,
            from_start=role.from_start,
            on_failure=lambda d: details.write(json.dumps(d) + "\n"),
            positioned=role.positioned,
            resume=self.resume,
            on_gap=None if gaps is None else lambda d: gaps.write(json.dumps(d) + "\n"),
            record_keys=bool(role.keys_path),
        )
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.mapped: MappedFeed | None = None
        self.changes = 0
        self.next_stall = self.next_change = 0.0

    def connect(self) -> bool:
        """Connect, ask for positions and the mapped log as its role says: False when the relay is not there."""
        verifier = self.verifier
        try:
            self.sock.connect(self.config.socket_path)
            resume = self.resume[0] if self.resume is not None else None
            initial = protocol.positions_message(resume) if verifier.positioned else b""
            if self.role.shm:
                self.sock.sendall(initial + protocol.shared_memory_message())
                self.mapped = MappedFeed(self.sock, self.config, verifier)
                self.counters.shm_granted = 1
            elif initial:
                self.sock.sendall(initial)
        except (OSError, EOFError):
            self.sock.close()
            self.counters.state = ENDED if self.ctrl[0] == STOPPING else CLOSED_BY_RELAY
            return False
        self.counters.state = CONNECTED
        return True

    def subscribe(self, sources: Sources) -> bool:
        """Send the subscription and its beacon; False when the relay has closed the connection."""
        self.changes += 1
        tag = self.role.index << 32 | self.changes
        control = protocol.unsubscribe_message() if sources is None else protocol.subscribe_message(sources=sources)
        self.verifier.subscribe(sources, echo=tag)
        if self.mapped is not None:
            self.mapped.select(control)  # from the log's head on: where the relay appends the beacon and its echo
        try:
            self.sock.sendall(control + soak_message(self.config.domain_id, BEACON_FLAGS, tag))
        except OSError:
            return False  # the next read sees the close
        return True

    def run(self) -> None:
        """Read until the relay closes the connection or the stream breaks, then leave the witness's record."""
        role, counters, verifier = self.role, self.counters, self.verifier
        if role.sources is not None and self.subscribe(role.sources):
            counters.subscribed = 1
        if self.mapped is None:
            self.sock.settimeout(POLL)
        recorded = verifier.position
        self.next_stall = self.next_change = time.monotonic() + 1.0
        while True:
            self.maybe_stall()
            self.maybe_resubscribe()
            received = self.read()
            if received is None:
                continue
            if received == 0:
                cut_off = self.mapped is not None and self.mapped.cut_off
                counters.tail = verifier.tail
                counters.shm_cut_off = int(cut_off)
                counters.state = ENDED if self.ctrl[0] == STOPPING and not cut_off else CLOSED_BY_RELAY
                break
            if role.state_path and verifier.position != recorded and verifier.settled:
                _record(role.state_path, verifier)
                recorded = verifier.position
                counters.recorded += 1
            for name, value in verifier.figures().items():
                setattr(counters, name, value)
            if verifier.broken:
                counters.state = ERROR
                break
        self.sock.close()
        if role.keys_path and verifier.keys is not None and verifier.keys_base is not None:
            Path(role.keys_path).write_bytes(verifier.keys_base.to_bytes(8, "little") + verifier.keys.tobytes())

    def maybe_stall(self) -> None:
        """Now and then (not the witness) stop reading for a while: a slow subscriber."""
        config = self.config
        if self.role.witness or not config.stall_prob or time.monotonic() < self.next_stall:
            return
        if self.ctrl[0] == RUNNING and self.rng.random() < config.stall_prob:
            _stall(self.rng.uniform(STALL_MIN, max(STALL_MIN, config.stall_max)), self.counters, self.ctrl)
        self.next_stall = time.monotonic() + 1.0

    def maybe_resubscribe(self) -> None:
        """Now and then (not the witness, nor a positioned one) change the subscription, once the last took."""
        role, config = self.role, self.config
        if role.witness or role.positioned or not config.resubscribe_prob or time.monotonic() < self.next_change:
            return
        if self.ctrl[0] == RUNNING and not self.verifier.switching and self.rng.random() < config.resubscribe_prob:
            sources = next_subscription(self.rng, self.verifier.sources, self.ctrl[1:])
            self.sock.settimeout(None)  # a few bytes: never a partial send
            if self.subscribe(sources):
                self.counters.changes += 1
                self.counters.unsubscribes += int(sources is None)
            if self.mapped is None:
                self.sock.settimeout(POLL)
        self.next_change = time.monotonic() + 1.0

    def read(self) -> int | None:
        """Feed the next read to the verifier: bytes read, None if nothing came in time, 0 at the end."""
        if self.mapped is not None:
            received = self.mapped.read(POLL)
            self.counters.shm_laps = self.mapped.laps
            return received
        try:
            received = self.sock.recv_into(self.verifier.space())
        except TimeoutError:
            return None
        except ConnectionError:
            received = 0
        if received:
            self.verifier.commit(received)
        return received


class MappedFeed:
    """A shared-memory subscriber's stream, fed to its verifier: the socket up to the grant, then the mapped log.

    It reads through ``client.shared_log.MappedStream``, which is what
    ``Subscriber(..., shared_memory=True)`` reads through: the bytes a socket
    subscriber would get. The mapping carries no notices, so for a positioned
    subscriber this puts in the ones a socket stream would hold: the grant's
    position, then before every batch the position it starts at, preceded by a
    gap notice for each lap the reader recorded. The verifier then checks the
    mapped stream as it checks a socket one: each position must be exactly
    where its own count of messages and bytes stands (a ``position`` failure
    otherwise), and each gap is checked against the witness's record.
    Taking the grant raises ``EOFError`` or ``OSError`` when the relay closes
    the connection first.
    """

    LIMIT = MiB  # bytes per batch read from the mapping

    def __init__(self, sock: socket.socket, config: ClientConfig, verifier: StreamVerifier):
        from jitrelay.client.shared_log import MappedStream

        self.verifier = verifier
        self.gaps: list[protocol.Gap] = []
        self.laps = 0  # gaps recorded so far, and fed to the verifier
        self.selection = protocol.EVERYTHING
        self.stream = MappedStream.take_grant(
            sock, verifier.feed, logic_for(config.domain), self.selection, self.LIMIT, verifier.positioned, self.gaps
        )
        if verifier.positioned:
            verifier.feed(protocol.position_notice(self.stream.reader.position))

    @property
    def cut_off(self) -> bool:
        """The relay lapped this reader, which had not asked for positions: it is cut off."""
        return self.stream.cut_off is not None

    def select(self, control: bytes) -> None:
        """The subscriber has just sent the subscription ``control``: the reader filters by it from the head on."""
        self.selection = protocol.apply_control(self.selection, control)
        self.stream.select(self.selection)

    def read(self, timeout: float) -> int | None:
        """Feed the next batch to the verifier: its size, None if there was none yet, 0 at the end of the stream."""
        stream, verifier = self.stream, self.verifier
        epoch, offset, number = stream.reader.position
        try:
            batch = stream.poll()
            if batch is None:
                stream.wait(timeout)
                return None
        except EOFError:
            return 0
        if verifier.positioned:
            # The reader went on from the oldest message kept: the batch starts there.
            for gap in self.gaps[self.laps :]:
                verifier.feed(protocol.gap_notice(gap))
                offset, number = offset + gap.bytes, number + gap.messages
            self.laps = len(self.gaps)
            verifier.feed(protocol.position_notice(protocol.Position(epoch, offset, number)))
        verifier.feed(batch.data)
        return len(batch)


def _record(path: str, verifier: StreamVerifier) -> None:
    """Where ``verifier`` stands, with its streams' last sequences, replacing the file whole: a SIGKILL leaves one."""
    if verifier.position is None:  # not settled: nothing to resume from
        return
    epoch, offset, number = verifier.position
    state = {"position": str(protocol.Position(epoch, offset, number)), "last": verifier.last}
    tmp = path + ".tmp"
    with open(tmp, "w") as out:
        json.dump(state, out)
    os.replace(tmp, path)


def _stall(seconds: float, counters: Counters, ctrl: Any) -> None:
    """Stop reading for ``seconds``, or until the controller ends the run."""
    counters.stalls += 1
    started = time.monotonic()
    deadline = started + seconds
    while ctrl[0] == RUNNING and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))
    counters.stall_ms += int((time.monotonic() - started) * 1000)
