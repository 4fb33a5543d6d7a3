"""``jitrelay soak``: run a relay under load and faults for a while, and check every message it delivers.

The soak starts a relay (``python -m jitrelay run DOMAIN``) and client
processes that connect, publish, subscribe, stall and get killed with SIGKILL
at random, and replaces every client it kills. It answers three questions:

- did any subscriber receive a message that is not exactly what a publisher
  sent (CRC-32), miss or repeat one (per-stream sequence with no gap), or
  receive one its subscription did not ask for?
- did the relay lose anything for subscribers that stayed connected (a
  subscriber attached before any publisher must verify exactly as many
  messages as the relay says it forwarded)?
- does its resident memory stay flat once warm?

Streams. Each publisher process is a new stream, and its sequence numbers
run from 0. Its key is 16 bits written in the header's ``source`` (low byte)
and ``flags`` (high byte): the source byte is its publisher slot's (slot 0
starts on source 1, slot 1 on source 2, ...), so the publishers running at
any one time have distinct sources and a subscription by source selects whole
publishers; the flags byte counts the starts on that source, so a replacement
never continues an old stream. A subscriber checks for every key that each
message is the previous one plus 1. Keys are not reused: a source moves to a
free byte after 256 starts, which bounds a run to 65,280 publisher starts.
Source 0 is the soak's own traffic: the controller's attach probes and the
subscription beacons and echoes below.

Subscriptions. A ``--filtered`` share of the subscribers (never the witness)
subscribes at connect to a random subset of the publishers' sources, and any
subscriber but the witness changes its subscription now and then (another
subset, or everything again). A change takes effect once the relay has read
it, so for a while only ``old | new`` is checked; the switch window closes at
the first message only the new set allows or at the subscriber's echo,
whichever comes first. The echo makes narrowing changes checkable (from
everything, no message is ever allowed by the new set only): right behind its
control message the subscriber sends a beacon on the same connection, and the
controller's echo connection answers every beacon it receives. The relay
reads that echo only after it has finished with the beacon, and so with the
control message before it: the echo, and whatever reaches the subscriber
after it, was forwarded under the new subscription.

Faults. Publishers write their stream cut at random byte offsets, so the relay
nearly always holds part of a message from each of them; killing one leaves a
torn message the relay must discard (it logs "closed mid-message"). A stalling
subscriber stops reading for 0.1 s to ``--stall-max`` seconds; under the
``disconnect`` policy a long enough stall gets it dropped, under ``block``
(execution) every stall ends and the publishers simply wait. One subscriber,
the witness, never stalls and is never killed, so every run has one complete
stream to count.

Shared memory. A ``--shm`` share of the subscribers (never the witness) reads
the relay's log from shared memory (``MappedFeed``) and is checked by the same
verifier; a lap is a gap for a positioned one and a cut-off for the others,
each matched against the relay's figures.

Clients are forked from a ``multiprocessing`` forkserver that has this module
loaded, so churning costs milliseconds, not an interpreter start. They report
through shared counters (``RawArray``), which stay readable after a SIGKILL,
and write failure details to one file each in the run folder.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jitrelay.core import protocol
from jitrelay.core.domains import LOGICS, logic_for
from jitrelay.core.units import MiB
from jitrelay.testing.processes import die_with_parent
from jitrelay.testing.procfs import proc_status
from jitrelay.testing.relay import ProcessFailed, RelayProcess
from jitrelay.tools.options import add_byte_option, non_negative, non_negative_float
from jitrelay.tools.usage import UsageError

READY_TIMEOUT = 60.0  # a relay on a fresh checkout compiles its kernels first
ATTACH_TIMEOUT = 30.0
TICK = 0.005  # publisher pacing step
POLL = 0.1  # subscriber receive timeout: how often it looks at the controller's phase
STALL_MIN = 0.1
RSS_INTERVAL = 0.5
PROGRESS_INTERVAL = 10.0
QUIET_SECONDS = 1.0  # after the publishers end, subscribers idle this long have everything
DRAIN_TIMEOUT = 30.0
MAX_DETAILS = 10  # failure details kept per subscriber
MAX_KEYS = 1 << 16
STARTS_PER_SOURCE = 256  # the flags byte of a stream key
# Source 0 carries the soak's own traffic, told apart by flags; every subscription includes it.
SOAK_SOURCE = 0
PROBE_FLAGS, BEACON_FLAGS, ECHO_FLAGS = 0, 1, 2
PROBE_KEY = SOAK_SOURCE | PROBE_FLAGS << 8
UNSUBSCRIBE_SHARE = 0.25  # of a filtered subscriber's changes
RELAY_OPTIONS = {
    # A stalled subscriber more than 1 MiB behind has 0.5 s to catch up, and one the 16 MiB log leaves
    # behind is cut off at once; the others never wait for it.
    "disconnect": (
        "--slow-policy",
        "disconnect",
        "--pending-limit",
        "1MiB",
        "--slow-timeout",
        "0.5",
        "--log-size",
        "16MiB",
    ),
    # Nothing is dropped: publishers wait only when the log is full up to a stalled subscriber.
    "block": ("--slow-policy", "block", "--log-size", "16MiB"),
}

# The controller's phase, in the shared ``ctrl`` array.
RUNNING, ENDING, STOPPING = 0, 1, 2
# Shared counters of one client.
(VERIFIED, CRC, SEQUENCE, HEAD, FRAMING, PROBES, STATE, STALLS, STALL_MS, TAIL, STREAMS, PUBLISHED) = range(12)
# ... and of a subscriber's subscriptions.
(SUBSCRIPTION, FILTERED_VERIFIED, SUBSCRIBED, CHANGES, UNSUBSCRIBES, MARKERS, BY_MESSAGE, BY_ECHO) = range(12, 20)
# ... and of a positioned one: notices read, position failures, gap notices and the messages they say were missed,
# the positions it recorded, and (resuming) the messages the relay sent before its first notice, set aside.
(NOTICES, POSITION_FAILURES, GAP_NOTICES, GAP_MESSAGES, RECORDED, BEFORE_NOTICE) = range(20, 26)
SKIPPED_AHEAD = (
    26  # streams that went on further ahead after a subscription change (the relay restarted it at the head)
)
# ... and of a shared-memory reader: granted the mapped log (1), laps that became gaps, the lap that cut it off (1).
(SHM_GRANTED, SHM_LAPS, SHM_CUT_OFF) = range(27, 30)
STATS_LEN = 30
# Client states.
STARTING, CONNECTED, CLOSED_BY_RELAY, ENDED, ERROR = range(5)
STATE_NAMES = ("starting", "connected", "closed_by_relay", "ended", "error")
FAILURE_KINDS = ("crc", "sequence", "head", "framing", "subscription")
FAILURE_SLOTS = dict(zip(FAILURE_KINDS, (CRC, SEQUENCE, HEAD, FRAMING, SUBSCRIPTION), strict=True))


class SoakError(RuntimeError):
    """The soak could not run: the relay would not start, clients would not attach."""


# Checking a subscriber's stream


Sources = frozenset[int] | None  # the source bytes a subscription allows; None: every source


def allows(sources: Sources, source: int) -> bool:
    return sources is None or source in sources


class StreamVerifier:
    """Check every message of one subscriber's byte stream as it arrives.

    Each message must frame (magic, a payload within the domain's limit, its
    domain and version), carry a CRC-32 that matches its bytes, and continue
    its stream: sequence exactly previous + 1 for its key (``source | flags <<
    8``). With ``from_start`` (a subscriber attached before any publisher) the
    first message of every stream must also be sequence 0. A bad magic or an
    impossible size means the stream lost its framing: the verifier stops
    (``broken``), since nothing after it can be trusted.

    ``subscribe()`` records a subscription the subscriber has just sent. Until
    the relay is known to apply it, a message may come from the old set or the
    new one; this switch window closes at the first message only the new set
    allows, or at the echo named in the call. From then on a message from
    another source is a ``subscription`` failure. A source the change adds
    starts its streams afresh (the relay skipped some of them meanwhile); the
    streams of a source kept stay whole.

    With ``positioned`` the stream also carries the relay's notices (system
    domain): the verifier follows ``position``, the stream offset and message
    number after the last message, and checks that every position notice says
    exactly that, except the first one and the one after a gap notice. A gap
    notice sets the streams' sequences aside (their next messages may skip);
    the position notice after it must be exactly as many messages and bytes
    on as the gap notice says, and ``on_gap`` hears of the gap (``gap``,
    ``count``, ``bytes``, the message numbers ``p`` before and ``q`` after),
    then, for each stream seen before the gap, of its first sequence after it
    (``gap``, ``key``, ``before``, ``first``): how many messages of each stream
    the gap took is checked against the witness's record at the end.
    ``resume`` is ``(position, last sequences)`` of a subscriber that resumes
    where another left off: its streams go on from those sequences, and the
    relay's first notice must be that position (or a gap notice); what the
    relay sent before that notice is set aside (``before_notice``), since it
    sends it again after. ``record_keys`` keeps the key of every message by
    message number (``keys`` from ``keys_base``): the witness's record.

    Reads land in ``space()`` and are checked by ``commit()``; only the
    unfinished message at the end is ever moved.
    """

    def __init__(
        self,
        domain_id: int,
        max_payload: int,
        *,
        from_start: bool = False,
        on_failure: Callable[[dict], None] | None = None,
        positioned: bool = False,
        resume: tuple[protocol.Position, dict[int, int]] | None = None,
        on_gap: Callable[[dict], None] | None = None,
        record_keys: bool = False,
    ):
        self.domain_id = domain_id
        self.max_payload = max_payload
        self.from_start = from_start
        self.on_failure = on_failure
        self.positioned = positioned or resume is not None
        self.on_gap = on_gap
        # (epoch, offset, message) after the last message; None until the first notice
        self.position: tuple[int, int, int] | None = tuple(resume[0]) if resume is not None else None
        self.resuming = resume is not None  # until the first notice
        self.notices = 0
        self.gaps = 0
        self.gap_messages = 0
        self.before_notice = 0
        self._gap: dict | None = None  # a gap notice read, the position notice after it not yet
        self._gap_id = 0
        self._gap_watch: dict[int, int] = {}  # streams seen before the last gap, not yet after it: last sequence
        self.keys = array.array("i") if record_keys else None
        self.keys_base: int | None = None
        self._buf = bytearray(max(4 * MiB, 2 * (protocol.HEADER_SIZE + max_payload)))
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self.last: dict[int, int] = {}
        self.seen = 0  # messages framed, valid or not
        self.verified = 0
        self.probes = 0
        self.markers = 0  # beacons and echoes: source 0, not a stream
        self.failures: Counter[str] = Counter()
        self.details: list[dict] = []
        self.broken = False
        self.sources: Sources = None  # the latest subscription sent
        self.allowed: Sources = None  # what may arrive now: ``sources``, or old | new in a switch window
        self.switching = False
        self._old: Sources = None
        self._echo: int | None = None
        self._whole: Sources = None  # sources selected ever since the start: their streams begin at 0
        self._may_skip: set[int] = set()  # streams that may skip ahead once: a change may restart it at the head
        self.skipped_ahead = 0
        self.filtered_verified = 0  # verified while ``allowed`` was narrower than everything
        self.closed_by_message = 0
        self.closed_by_echo = 0
        if resume is not None:
            self.last.update(resume[1])

    @property
    def settled(self) -> bool:
        """Where it stands is a position to resume from: known, not inside a gap, past the resume's first notice."""
        return self.position is not None and self._gap is None and not self.resuming

    @property
    def tail(self) -> int:
        """Bytes of an unfinished message waiting for the rest."""
        return self._end - self._start

    def space(self) -> memoryview:
        """Where the next read goes; never empty, since a message fits in half the buffer."""
        if self._start:
            tail = self._end - self._start
            self._buf[:tail] = self._view[self._start : self._end]
            self._start, self._end = 0, tail
        return self._view[self._end :]

    def commit(self, nbytes: int) -> None:
        self._end += nbytes
        self._check()

    def feed(self, data: bytes) -> None:
        """Copy ``data`` in and check it: for tests and tools that hold bytes, not a socket."""
        view = memoryview(data)
        while view:
            space = self.space()
            n = min(len(space), len(view))
            space[:n] = view[:n]
            self.commit(n)
            view = view[n:]

    def subscribe(self, sources: Sources, echo: int | None = None) -> None:
        """The subscriber has just sent a subscription to ``sources`` (None: everything again).

        ``echo`` is the sequence of the echo that proves the relay applies it.
        Call it only with the previous window closed: a subscriber waits.
        """
        if self.switching:
            raise ValueError("the previous subscription change is still in its switch window")
        old = self.sources
        if old is not None:
            for key in [k for k in self.last if k & 0xFF not in old and allows(sources, k & 0xFF)]:
                del self.last[key]
        if self.verified:
            # A subscriber the relay is sending to from behind in the log starts again at the head when its
            # filter changes (the engine's cursors): each stream it has may skip ahead once, never back, and
            # a stream may be first seen anywhere.
            self._may_skip.update(self.last)
            self.from_start = False
        self._old, self.sources = old, sources
        self.allowed = None if old is None or sources is None else old | sources
        if sources is not None:
            self._whole = sources if self._whole is None else self._whole & sources
        self._echo = echo
        self.switching = True

    def _settle(self) -> None:
        self.allowed = self.sources
        self.switching = False

    def _fail(self, kind: str, **what: Any) -> None:
        self.failures[kind] += 1
        if len(self.details) < MAX_DETAILS:
            detail = {"kind": kind, "message": self.seen, **what}
            self.details.append(detail)
            if self.on_failure is not None:
                self.on_failure(detail)

    def _notice(self, data: memoryview) -> None:
        """A notice of the relay's, in a positioned stream."""
        try:
            notice = protocol.read_notice(data)
        except protocol.ProtocolError as exc:
            self._fail("framing", why=str(exc))
            return
        self.notices += 1
        if isinstance(notice, protocol.Gap):
            self.gaps += 1
            self.resuming = False
            if notice.reason != protocol.GAP_LEFT_LOG or protocol.UNKNOWN in (notice.messages, notice.bytes):
                self._fail("position", why="gap of unknown size", gap=list(notice))
                self._gap = {"count": 0, "bytes": 0, "p": None}
                return
            self.from_start = False  # a stream may now begin anywhere, or not at all
            if self._gap is None:  # the streams seen so far may skip after it
                self._gap = {"count": 0, "bytes": 0, "p": self.position}
                self._gap_watch = dict(self.last)
                self.last.clear()
            self._gap["count"] += notice.messages
            self._gap["bytes"] += notice.bytes
            self.gap_messages += notice.messages
            return
        at = (notice.epoch, notice.offset, notice.message)
        gap, self._gap = self._gap, None
        if gap is not None:
            p = gap["p"]
            if p is not None and (p[0] != at[0] or at[2] - p[2] != gap["count"] or at[1] - p[1] != gap["bytes"]):
                self._fail("position", why="gap notice", before=list(p), after=list(at), missed=gap["count"])
            self._gap_id += 1
            if self.on_gap is not None and p is not None and p[0] == at[0]:
                self.on_gap({"gap": self._gap_id, "count": gap["count"], "bytes": gap["bytes"], "p": p[2], "q": at[2]})
        elif self.position is not None and at != self.position:
            self._fail("position", why="notice elsewhere", expected=list(self.position), got=list(at))
        self.resuming = False
        self.position = at
        if self.keys is not None and self.keys_base is None:
            self.keys_base = at[2]

    def _check(self) -> None:
        if self.broken:
            self._start = self._end
            return
        buf, view, last = self._buf, self._view, self.last
        pos, end = self._start, self._end
        unpack, crc32 = protocol.HEADER_STRUCT.unpack_from, zlib.crc32
        positioned, keys = self.positioned, self.keys
        while end - pos >= protocol.HEADER_SIZE:
            magic, domain, version, source, flags, seq, _, size, checksum = unpack(buf, pos)
            if magic != protocol.MAGIC or size > self.max_payload:
                self._fail("framing", why="bad magic" if magic != protocol.MAGIC else f"payload of {size} bytes")
                self.broken = True
                pos = end
                break
            stop = pos + protocol.HEADER_SIZE + size
            if stop > end:
                break
            key = source | flags << 8
            if positioned:
                if domain == protocol.CONTROL_DOMAIN and version == protocol.VERSION:
                    self._notice(view[pos:stop])
                    pos = stop
                    continue
                if self.resuming:  # sent before the relay read where to resume: it comes again after the notice
                    self.before_notice += 1
                    pos = stop
                    continue
                at = self.position
                if at is not None:
                    self.position = (at[0], at[1] + stop - pos, at[2] + 1)
                    if keys is not None and self.keys_base is not None:
                        keys.append(key)
                watch = self._gap_watch
                if watch and key in watch and self.on_gap is not None:
                    before = watch.pop(key)
                    self.on_gap({"gap": self._gap_id, "key": key, "before": before, "first": seq})
            allowed = self.allowed
            if version != protocol.VERSION or domain != self.domain_id:
                self._fail("framing", why=f"version {version}, domain {domain}", key=key, seq=seq)
            elif crc32(view[pos + protocol.HEADER_SIZE : stop], crc32(view[pos : pos + protocol.CHECKSUM_COVERED])) != (
                checksum
            ):
                self._fail("crc", key=key, seq=seq, size=stop - pos)
            elif allowed is not None and source not in allowed:
                self._fail("subscription", key=key, seq=seq, allowed=sorted(allowed))
            elif source == SOAK_SOURCE:
                if flags == PROBE_FLAGS:
                    self.probes += 1
                else:
                    self.markers += 1
                    if self.switching and flags == ECHO_FLAGS and seq == self._echo:
                        self._settle()
                        self.closed_by_echo += 1
            else:
                if self.switching and self._old is not None and source not in self._old:
                    self._settle()  # only the new set allows it: the relay forwarded it under the new one
                    self.closed_by_message += 1
                previous = last.get(key)
                if previous is None:
                    if self.from_start and seq != 0 and allows(self._whole, source):
                        self._fail("head", key=key, seq=seq)
                elif seq != previous + 1:
                    if seq > previous and key in self._may_skip:
                        self.skipped_ahead += 1
                    else:
                        self._fail("sequence", key=key, expected=previous + 1, got=seq)
                if self._may_skip and not self.switching:  # the restart comes while the relay applies the change
                    self._may_skip.discard(key)
                last[key] = seq
                self.verified += 1
                if allowed is not None:
                    self.filtered_verified += 1
            self.seen += 1
            pos = stop
        self._start = pos


# Client processes


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
    kind: str, config: ClientConfig, stats: Any, ctrl: Any, detail_path: str, seed: int, arg: int | SubscriberRole
) -> None:
    """Entry point of a client process: ``arg`` is the stream key of a publisher, or a subscriber's role."""
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
            stats[STATE] = ERROR
            details.write(json.dumps({"kind": "error", "traceback": traceback.format_exc()}) + "\n")


def _message_records(config: ClientConfig, rng: random.Random) -> list[tuple[int, bytes]]:
    """One record of the domain's first TLV type, sized at random up to ``max_size`` bytes of message."""
    tlv_type = protocol.DOMAIN_TLV_RANGES[config.domain_id][0][0]
    longest = config.max_size - protocol.HEADER_SIZE - 2
    value_len = rng.randint(0, max(0, longest))
    if value_len > protocol.MAX_STANDARD_VALUE:  # an extended record: 3 more bytes of record header
        value_len = value_len - 3 if value_len - 3 > protocol.MAX_STANDARD_VALUE else protocol.MAX_STANDARD_VALUE
    return [(tlv_type, rng.randbytes(value_len))]


def run_publisher(config: ClientConfig, stats: Any, ctrl: Any, rng: random.Random, key: int) -> None:
    """Publish stream ``key`` at ``publisher_rate`` until ``ctrl[0]`` leaves ``RUNNING``; counters go to ``stats``.

    ``stats`` and ``ctrl`` are sequences of ints: shared ``RawArray``s in the
    soak, so the controller reads them even after a SIGKILL.

    Each write stops at a random byte inside the last message, and the rest
    goes first in the next write: the relay almost always holds a partial
    message from us, so a SIGKILL tears one.
    """
    from jitrelay.client import Publisher, RelayConnectionError

    source, flags = key & 0xFF, key >> 8
    made = 0  # messages built; the stream so far is sequences 0..made-1
    pending = b""
    try:
        publisher = Publisher(config.domain, config.socket_path, source=source)
    except RelayConnectionError:
        stats[STATE] = CLOSED_BY_RELAY
        return
    stats[STATE] = CONNECTED
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
            stats[PUBLISHED] = made - (1 if pending else 0)
        publisher.publish_raw(pending)
        stats[PUBLISHED] = made
        publisher.close()
        stats[STATE] = ENDED
    except RelayConnectionError:
        stats[STATE] = CLOSED_BY_RELAY


def soak_message(domain_id: int, flags: int, sequence: int) -> bytes:
    """A message of the soak's own source: a beacon or an echo, ``sequence`` naming the change it is for."""
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
    config: ClientConfig, stats: Any, ctrl: Any, rng: random.Random, role: SubscriberRole, details: Any
) -> None:
    """Read and verify every message until the relay closes the connection; stall and resubscribe now and then.

    A subscription goes out with a beacon right behind it (``index << 32 |
    change number``); the echo of that beacon ends the switch window. New
    subsets are drawn from the publishers' current sources, ``ctrl[1:]``.
    """
    gaps = open(role.gaps_path, "a", buffering=1) if role.gaps_path else None  # noqa: SIM115
    resume = None
    if role.resume is not None:
        resume = (protocol.Position.parse(role.resume[0]), {int(k): v for k, v in role.resume[1].items()})
    verifier = StreamVerifier(
        config.domain_id,
        config.max_payload,
        from_start=role.from_start,
        on_failure=lambda d: details.write(json.dumps(d) + "\n"),
        positioned=role.positioned,
        resume=resume,
        on_gap=None if gaps is None else lambda d: gaps.write(json.dumps(d) + "\n"),
        record_keys=bool(role.keys_path),
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mapped: MappedFeed | None = None
    try:
        sock.connect(config.socket_path)
        initial = protocol.positions_message(resume[0] if resume is not None else None) if verifier.positioned else b""
        if role.shm:
            sock.sendall(initial + protocol.shared_memory_message())
            mapped = MappedFeed(sock, config, verifier)
            stats[SHM_GRANTED] = 1
        elif initial:
            sock.sendall(initial)
    except (OSError, EOFError):
        sock.close()
        stats[STATE] = ENDED if ctrl[0] == STOPPING else CLOSED_BY_RELAY
        return
    stats[STATE] = CONNECTED
    changes = 0
    recorded = verifier.position

    def subscribe(sources: Sources) -> bool:
        """Send the subscription and its beacon; False when the relay has closed the connection."""
        nonlocal changes
        changes += 1
        tag = role.index << 32 | changes
        control = protocol.unsubscribe_message() if sources is None else protocol.subscribe_message(sources=sources)
        verifier.subscribe(sources, echo=tag)
        if mapped is not None:
            mapped.select(control)  # from the log's head on: where the relay appends the beacon and its echo
        try:
            sock.sendall(control + soak_message(config.domain_id, BEACON_FLAGS, tag))
        except OSError:
            return False  # the next read sees the close
        return True

    if role.sources is not None and subscribe(role.sources):
        stats[SUBSCRIBED] = 1
    if mapped is None:
        sock.settimeout(POLL)
    next_stall = next_change = time.monotonic() + 1.0
    while True:
        if not role.witness and config.stall_prob and time.monotonic() >= next_stall:
            if ctrl[0] == RUNNING and rng.random() < config.stall_prob:
                _stall(rng.uniform(STALL_MIN, max(STALL_MIN, config.stall_max)), stats, ctrl)
            next_stall = time.monotonic() + 1.0
        if not role.witness and not role.positioned and config.resubscribe_prob and time.monotonic() >= next_change:
            if ctrl[0] == RUNNING and not verifier.switching and rng.random() < config.resubscribe_prob:
                sources = next_subscription(rng, verifier.sources, ctrl[1:])
                sock.settimeout(None)  # a few bytes: never a partial send
                if subscribe(sources):
                    stats[CHANGES] += 1
                    stats[UNSUBSCRIBES] += int(sources is None)
                if mapped is None:
                    sock.settimeout(POLL)
            next_change = time.monotonic() + 1.0
        if mapped is not None:
            received = mapped.read(POLL)
            stats[SHM_LAPS] = mapped.laps
            if received is None:
                continue
        else:
            try:
                received = sock.recv_into(verifier.space())
            except TimeoutError:
                continue
            except ConnectionError:
                received = 0
            if received:
                verifier.commit(received)
        if received == 0:
            stats[TAIL] = verifier.tail
            cut_off = mapped is not None and mapped.cut_off
            stats[SHM_CUT_OFF] = int(cut_off)
            stats[STATE] = ENDED if ctrl[0] == STOPPING and not cut_off else CLOSED_BY_RELAY
            break
        if role.state_path and verifier.position != recorded and verifier.settled:
            _record(role.state_path, verifier)
            recorded = verifier.position
            stats[RECORDED] += 1
        if verifier.positioned:
            stats[NOTICES] = verifier.notices
            stats[POSITION_FAILURES] = verifier.failures["position"]
            stats[GAP_NOTICES] = verifier.gaps
            stats[GAP_MESSAGES] = verifier.gap_messages
            stats[BEFORE_NOTICE] = verifier.before_notice
        stats[VERIFIED] = verifier.verified
        stats[PROBES] = verifier.probes
        stats[STREAMS] = len(verifier.last)
        stats[FILTERED_VERIFIED] = verifier.filtered_verified
        stats[MARKERS] = verifier.markers
        stats[BY_MESSAGE] = verifier.closed_by_message
        stats[BY_ECHO] = verifier.closed_by_echo
        stats[SKIPPED_AHEAD] = verifier.skipped_ahead
        for kind, slot in FAILURE_SLOTS.items():
            stats[slot] = verifier.failures[kind]
        if verifier.broken:
            stats[STATE] = ERROR
            break
    sock.close()
    if gaps is not None:
        gaps.close()
    if role.keys_path and verifier.keys is not None and verifier.keys_base is not None:
        Path(role.keys_path).write_bytes(verifier.keys_base.to_bytes(8, "little") + verifier.keys.tobytes())


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
            for gap in self.gaps[
                self.laps :
            ]:  # the reader went on from the oldest message kept: the batch starts there
                verifier.feed(protocol.gap_notice(gap))
                offset, number = offset + gap.bytes, number + gap.messages
            self.laps = len(self.gaps)
            verifier.feed(protocol.position_notice(protocol.Position(epoch, offset, number)))
        verifier.feed(memoryview(batch))
        return len(batch)


def _record(path: str, verifier: StreamVerifier) -> None:
    """Where ``verifier`` stands, with its streams' last sequences, replacing the file whole: a SIGKILL leaves one."""
    epoch, offset, number = verifier.position
    state = {"position": str(protocol.Position(epoch, offset, number)), "last": verifier.last}
    tmp = path + ".tmp"
    with open(tmp, "w") as out:
        json.dump(state, out)
    os.replace(tmp, path)


def _stall(seconds: float, stats: Any, ctrl: Any) -> None:
    """Stop reading for ``seconds``, or until the controller ends the run."""
    stats[STALLS] += 1
    started = time.monotonic()
    deadline = started + seconds
    while ctrl[0] == RUNNING and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))
    stats[STALL_MS] += int((time.monotonic() - started) * 1000)


# The relay under test


def relay_summary(figures: dict | None) -> dict | None:
    """What the report keeps of the relay's final figures (its summary file), or None when it wrote none."""
    if figures is None:
        return None
    verdicts = figures["verdicts"]
    return {
        "received": figures["messages_received"],
        "forwarded": figures["messages_forwarded"],
        "rejected": {name: verdicts[name] for name in protocol.REJECT_NAMES if verdicts.get(name)},
        "faults": figures["faults"],
        "control": verdicts.get("control", 0),
        "slow_dropped": figures["slow_actions"]["disconnect"],
        "connections": figures["connections_accepted"],
        "torn_messages": figures["torn_messages"],
    }


class Echo:
    """The controller's connection that answers every subscriber's beacon with an echo.

    It subscribes to the soak's source only. The relay reads an echo only
    after it has finished with the beacon it answers, and so with the
    subscription sent just before that beacon: the echo reaches the
    subscriber under its new subscription.
    """

    def __init__(self, config: ClientConfig):
        self.domain_id = config.domain_id
        self.beacons = 0
        self.echoes = 0
        self.error: str | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(config.socket_path)
            self.sock.sendall(protocol.subscribe_message(sources=[SOAK_SOURCE]))
        except OSError as exc:
            self.sock.close()
            raise SoakError(f"the echo connection could not subscribe: {exc}") from exc
        self._thread = threading.Thread(target=self._run, name="soak-echo", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray()
        try:
            while data := self.sock.recv(MiB):
                buf += data
                pos = 0
                while len(buf) - pos >= protocol.HEADER_SIZE:
                    magic, _, _, source, flags, seq, _, size, _ = protocol.HEADER_STRUCT.unpack_from(buf, pos)
                    if magic != protocol.MAGIC:
                        self.error = f"bad magic after {self.beacons} beacons"
                        return
                    stop = pos + protocol.HEADER_SIZE + size
                    if stop > len(buf):
                        break
                    if source == SOAK_SOURCE and flags == BEACON_FLAGS:
                        self.beacons += 1
                        self.sock.sendall(soak_message(self.domain_id, ECHO_FLAGS, seq))
                        self.echoes += 1
                    pos = stop
                del buf[:pos]
        except OSError as exc:
            self.error = repr(exc)

    def close(self, timeout: float = 10.0) -> None:
        """Send nothing more: the relay reads what was sent, then closes its side and the reader ends."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self._thread.join(timeout)
        self.sock.close()


# The controller


@dataclass
class Client:
    kind: str  # "pub" or "sub"
    index: int
    proc: Any
    stats: Any
    detail_path: Path
    key: int = -1  # publisher's stream key
    slot: int = -1  # publisher's slot: its source byte is the slot's
    from_start: bool = False
    witness: bool = False
    filtered: bool = False  # subscribed at connect
    positioned: bool = False  # asks for positions: recorded in ``state_path``, resumed from when killed
    resumed: bool = False  # started from the position a killed one recorded
    state_path: Path | None = None
    gaps_path: Path | None = None
    killed: bool = False
    replaced: bool = False
    hung: bool = False
    shm: bool = False  # reads the log from shared memory

    @property
    def state(self) -> str:
        return STATE_NAMES[self.stats[STATE]]


@dataclass
class SoakOptions:
    domain: str = "market_data"
    duration: float = 300.0
    rate: float = 20000.0
    publishers: int = 3
    subscribers: int = 4
    churn: float = 1.0
    stall_prob: float = 0.2
    stall_max: float = 2.0
    filtered: float = 0.5
    resubscribe: float = 0.2
    resuming: float = 0.5
    sigstop: float = 0.1
    shm: float = 0.25
    log_size: int = 0  # the relay's log in bytes; 0: RELAY_OPTIONS' 16 MiB
    max_size: int = 1024
    seed: int | None = None
    json_path: Path | None = None
    socket_dir: Path | None = None
    progress: bool = True
    argv: list[str] = field(default_factory=list)


class Soak:
    """One soak run: the relay, the clients, the churn, the memory samples, the report."""

    def __init__(self, opts: SoakOptions):
        self.opts = opts
        self.seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(1 << 32)
        self.rng = random.Random(self.seed)
        self.logic = logic_for(opts.domain)
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["jitrelay.tools.soak", "jitrelay.client"])
        # The phase, then each publisher slot's source: slot i starts on source i + 1.
        self.ctrl = self.ctx.RawArray("q", 1 + opts.publishers)
        self.ctrl[1:] = list(range(1, 1 + opts.publishers))
        self.clients: list[Client] = []
        self._indexes = itertools.count()
        self._starts: Counter[int] = Counter()  # publisher starts per source byte
        self.echo: Echo | None = None
        self.rss_samples: list[tuple[float, int]] = []
        self.kills = Counter()
        self.replaced = Counter()
        self.resumes = 0  # replacements that resumed from a killed subscriber's recorded position
        self.unrecorded = 0  # positioned subscribers killed before they had recorded one
        self.stopped: dict[int, tuple[Client, float, float]] = {}  # SIGSTOPped: pid -> (client, since, until)
        self.sigstops = 0
        self.sigstop_seconds = 0.0
        self.sigstopped: Counter[str] = Counter()  # SIGSTOPs by the kind of subscriber stopped
        self.keys_path = None
        self.probes_sent = 0
        self.t0 = 0.0
        self.load_seconds = 0.0
        self.interrupted = False
        self.own_dir = opts.socket_dir is None
        self.run_dir = Path(tempfile.mkdtemp(prefix="jitrelay-soak-", dir="/tmp")) if self.own_dir else opts.socket_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = ClientConfig(
            socket_path=str(self.run_dir / f"{opts.domain}.sock"),
            domain=opts.domain,
            domain_id=self.logic.domain_id,
            max_payload=self.logic.max_payload,
            publisher_rate=opts.rate / opts.publishers,
            max_size=min(opts.max_size, protocol.HEADER_SIZE + self.logic.max_payload),
            stall_prob=opts.stall_prob,
            stall_max=opts.stall_max,
            resubscribe_prob=opts.resubscribe,
        )
        self.relay: RelayProcess | None = None
        self.relay_figures: dict | None = None  # its summary file, once it has stopped

    # clients

    def spawn(
        self,
        kind: str,
        *,
        slot: int = -1,
        from_start: bool = False,
        witness: bool = False,
        resume: tuple[str, dict[int, int]] | None = None,
        shm: bool | None = None,
    ) -> Client:
        """Start a publisher in ``slot``, or a subscriber: the witness and a ``--resuming`` share of the others
        ask for positions (unfiltered), the rest are filtered at connect by the ``--filtered`` share; a ``--shm``
        share of them (the witness aside) reads the log from shared memory. ``resume`` starts a positioned one
        where a killed one left off; ``shm`` says how it reads (a successor reads as the one it replaces)."""
        index = next(self._indexes)
        stats = self.ctx.RawArray("q", STATS_LEN)
        detail_path = self.run_dir / f"{kind}-{index}.jsonl"
        key = -1
        filtered = positioned = False
        state_path = gaps_path = None
        arg: int | SubscriberRole
        if kind == "pub":
            key = arg = self._stream_key(slot)
        else:
            positioned = witness or resume is not None or self.rng.random() < self.opts.resuming
            filtered = not witness and not positioned and self.rng.random() < self.opts.filtered
            sources = pick_sources(self.rng, self.ctrl[1:]) if filtered else None
            if shm is None:
                shm = not witness and bool(self.opts.shm) and self.rng.random() < self.opts.shm
            if positioned:
                gaps_path = self.run_dir / f"{kind}-{index}.gaps.jsonl"
                state_path = None if witness else self.run_dir / f"{kind}-{index}.position.json"
            if witness:
                self.keys_path = self.run_dir / "witness-keys.bin"
            arg = SubscriberRole(
                index,
                from_start=from_start,
                witness=witness,
                sources=sources,
                positioned=positioned,
                resume=resume,
                state_path=str(state_path or ""),
                gaps_path=str(gaps_path or ""),
                keys_path=str(self.keys_path) if witness else "",
                shm=shm,
            )
        seed = (self.seed * 1_000_003 + index) % (1 << 63)
        proc = self.ctx.Process(
            target=client_main,
            args=(kind, self.config, stats, self.ctrl, str(detail_path), seed, arg),
            name=f"soak-{kind}-{index}",
            daemon=True,
        )
        proc.start()
        client = Client(
            kind, index, proc, stats, detail_path, key, slot, from_start, witness, filtered, positioned,
            resume is not None, state_path, gaps_path, shm=bool(shm),
        )  # fmt: skip
        self.clients.append(client)
        return client

    def _stream_key(self, slot: int) -> int:
        """A new stream for ``slot``: its source byte, unless that has had its 256 starts, and the next flags."""
        source = self.ctrl[1 + slot]
        if self._starts[source] >= STARTS_PER_SOURCE:
            held = set(self.ctrl[1:])
            free = [s for s in range(1, 256) if s not in held and self._starts[s] < STARTS_PER_SOURCE]
            if not free:
                raise SoakError(f"ran out of stream keys after {sum(self._starts.values())} publisher starts")
            source = min(free, key=lambda s: (self._starts[s], s))
            self.ctrl[1 + slot] = source
        flags = self._starts[source]
        self._starts[source] += 1
        return source | flags << 8

    def live(self, kind: str | None = None) -> list[Client]:
        return [c for c in self.clients if not c.killed and c.proc.is_alive() and kind in (None, c.kind)]

    def kill_one(self) -> None:
        victims = [c for c in self.live() if not c.witness]
        if not victims:
            return
        victim = self.rng.choice(victims)
        victim.proc.kill()
        victim.proc.join(2)
        victim.killed = True
        self.kills[victim.kind] += 1
        if victim.proc.pid in self.stopped:
            self._account_stop(self.stopped.pop(victim.proc.pid)[1], time.monotonic())
        resume = None
        if victim.positioned:
            try:
                state = json.loads(victim.state_path.read_text())
            except (OSError, ValueError):
                self.unrecorded += 1  # killed before its first record: its successor starts afresh
            else:
                resume = (state["position"], {int(k): v for k, v in state["last"].items()})
                self.resumes += 1
        self.spawn(victim.kind, slot=victim.slot, resume=resume, shm=victim.shm)

    def sigstop_one(self, now: float) -> None:
        """Stop a subscriber other than the witness with SIGSTOP, to be continued with SIGCONT a while later."""
        victims = [c for c in self.live("sub") if not c.witness and c.proc.pid not in self.stopped]
        if not victims:
            return
        victim = self.rng.choice(victims)
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.proc.pid, signal.SIGSTOP)
            self.stopped[victim.proc.pid] = (
                victim,
                now,
                now + self.rng.uniform(STALL_MIN, max(STALL_MIN, self.opts.stall_max)),
            )
            self.sigstops += 1
            self.sigstopped[_kind(victim)] += 1

    def continue_stopped(self, now: float, every: bool = False) -> None:
        """SIGCONT the stopped subscribers whose time is up (``every``: all of them)."""
        for pid, (_, since, until) in list(self.stopped.items()):
            if every or now >= until:
                del self.stopped[pid]
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                self._account_stop(since, now)

    def _account_stop(self, since: float, now: float) -> None:
        self.sigstop_seconds += now - since

    def replace_exited(self) -> None:
        """A client that ended on its own (dropped as slow, refused) gets a successor, as a killed one does."""
        for client in self.clients:
            if not client.killed and not client.replaced and client.proc.exitcode is not None:
                client.replaced = True
                self.replaced[client.kind] += 1
                self.spawn(client.kind, slot=client.slot, shm=client.shm)

    # phases

    def attach_subscribers(self) -> None:
        """Start the subscribers and probe until each has a message: from then on it sees every publisher."""
        subs = [self.spawn("sub", from_start=True, witness=i == 0) for i in range(self.opts.subscribers)]
        tlv_type = protocol.DOMAIN_TLV_RANGES[self.logic.domain_id][0][0]
        deadline = time.monotonic() + ATTACH_TIMEOUT
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(self.config.socket_path)
            while not all(s.stats[PROBES] for s in subs):  # no one else publishes yet: nothing comes back
                if time.monotonic() > deadline or not self.relay.alive():
                    states = ", ".join(f"sub-{s.index} {s.state}" for s in subs)
                    raise SoakError(f"subscribers did not attach within {ATTACH_TIMEOUT:.0f} s ({states})")
                sock.sendall(
                    protocol.build_message(self.logic.domain_id, [(tlv_type, b"probe")], sequence=self.probes_sent)
                )
                self.probes_sent += 1
                time.sleep(0.02)
            sock.shutdown(socket.SHUT_WR)  # graceful: the relay reads every probe, then closes its side
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass

    def sample_rss(self) -> None:
        rss = proc_status(self.relay.pid, "VmRSS") if self.relay else None
        if rss is not None:
            self.rss_samples.append((time.monotonic() - self.t0 if self.t0 else 0.0, rss))

    def load(self) -> None:
        """The timed part: publishers run, the churn kills and replaces clients, memory is sampled."""
        opts = self.opts
        for slot in range(opts.publishers):
            self.spawn("pub", slot=slot)
        self.t0 = time.monotonic()
        end = self.t0 + opts.duration
        next_kill = self.t0 + self.rng.expovariate(opts.churn) if opts.churn > 0 else float("inf")
        next_stop = self.t0 + self.rng.expovariate(opts.sigstop) if opts.sigstop > 0 else float("inf")
        next_rss = self.t0
        next_progress = self.t0 + PROGRESS_INTERVAL
        try:
            while (now := time.monotonic()) < end:
                if not self.relay.alive():
                    return
                if now >= next_kill:
                    self.kill_one()
                    next_kill += self.rng.expovariate(opts.churn)
                if now >= next_stop:
                    self.sigstop_one(now)
                    next_stop += self.rng.expovariate(opts.sigstop)
                self.continue_stopped(now)
                self.replace_exited()
                if now >= next_rss:
                    self.sample_rss()
                    next_rss += RSS_INTERVAL
                if opts.progress and now >= next_progress:
                    next_progress += PROGRESS_INTERVAL
                    self.progress(now - self.t0)
                time.sleep(min(0.02, max(0.0, min(next_kill, next_rss, end) - time.monotonic())))
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            self.load_seconds = time.monotonic() - self.t0

    def progress(self, elapsed: float) -> None:
        published = sum(c.stats[PUBLISHED] for c in self.clients if c.kind == "pub")
        verified = sum(c.stats[VERIFIED] for c in self.clients if c.kind == "sub")
        failures = sum(c.stats[k] for c in self.clients if c.kind == "sub" for k in FAILURE_SLOTS.values())
        rss = self.rss_samples[-1][1] / MiB if self.rss_samples else float("nan")
        print(
            f"soak {elapsed:5.0f} s: published {published:,}, verified {verified:,}, failures {failures}, "
            f"killed {sum(self.kills.values())}, relay RSS {rss:.1f} MiB",
            file=sys.stderr,
            flush=True,
        )

    def finish(self) -> int | None:
        """End the run in order: stalls end, publishers flush and close, subscribers drain, the relay stops."""
        self.ctrl[0] = ENDING
        self.continue_stopped(time.monotonic(), every=True)
        publishers = [c for c in self.live("pub")]
        deadline = time.monotonic() + DRAIN_TIMEOUT
        for client in publishers:
            client.proc.join(max(0.0, deadline - time.monotonic()))
            if client.proc.is_alive():
                client.hung = True
                client.proc.kill()
                client.proc.join(2)
        # Subscribers have everything once none of them has verified anything for a while.
        last, quiet_since = None, time.monotonic()
        while time.monotonic() < deadline and self.relay.alive():
            now_counts = [c.stats[VERIFIED] for c in self.live("sub")]
            if now_counts != last:
                last, quiet_since = now_counts, time.monotonic()
            elif time.monotonic() - quiet_since >= QUIET_SECONDS:
                break
            time.sleep(0.05)
        if self.echo is not None:
            self.echo.close()
        self.sample_rss()
        self.ctrl[0] = STOPPING
        code = self.relay.stop()
        for client in self.live("sub"):
            client.proc.join(10)
            if client.proc.is_alive():  # it never saw the relay close its connection
                client.hung = True
                client.proc.kill()
                client.proc.join(2)
        return code

    def run(self) -> dict:
        self.relay = RelayProcess(
            self.opts.domain,
            Path(self.config.socket_path),
            self.relay_options(),
            summary_file=self.run_dir / "relay-figures.json",
            tie_to_parent=True,
            new_session=True,  # a Ctrl-C reaches the soak, which stops the relay itself
        )
        exit_code: int | None = None
        try:
            self.wait_for_relay()
            self.sample_rss()
            if self.opts.filtered or self.opts.resubscribe:
                self.echo = Echo(self.config)
            self.attach_subscribers()
            self.load()
            exit_code = self.finish()
        except KeyboardInterrupt:
            self.interrupted = True
            self.ctrl[0] = STOPPING
            self.continue_stopped(time.monotonic(), every=True)
            exit_code = self.relay.stop()
        finally:
            self.continue_stopped(time.monotonic(), every=True)
            for client in self.clients:
                if client.proc.is_alive():
                    client.proc.kill()
                    client.proc.join(2)
            self.relay.stop()
            if self.echo is not None:
                self.echo.close(timeout=2.0)
        with contextlib.suppress(ProcessFailed):
            self.relay_figures = self.relay.figures()
        report = self.report(exit_code)
        if self.own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return report

    def wait_for_relay(self) -> None:
        try:
            self.relay.wait_ready(READY_TIMEOUT)
        except ProcessFailed:
            code = self.relay.proc.poll()
            raise SoakError(f"the relay did not start (exit code {code}):\n{self.relay.tail()}") from None

    def relay_options(self) -> tuple[str, ...]:
        options = list(RELAY_OPTIONS[self.logic.slow_policy])
        if self.opts.log_size:
            options[options.index("--log-size") + 1] = str(self.opts.log_size)
        return tuple(options)

    # figures

    def report(self, relay_exit: int | None) -> dict:
        opts = self.opts
        relay = self.relay
        summary = relay_summary(self.relay_figures)
        dropped_pids = set(self.relay_figures["slow_disconnected_pids"]) if self.relay_figures else set()
        dropped = Counter(c.kind for c in self.clients if c.proc.pid in dropped_pids)  # killed ones too
        subs = [c for c in self.clients if c.kind == "sub"]
        pubs = [c for c in self.clients if c.kind == "pub"]
        failures = Counter()
        for client in subs:
            for kind, slot in FAILURE_SLOTS.items():
                failures[kind] += client.stats[slot]
        errors = [c for c in self.clients if c.stats[STATE] == ERROR and not self._broken(c)]
        echo = self.echo
        echo_error = echo.error if echo is not None else None
        failures["client_error"] = len(errors) + (echo_error is not None)
        hung = [c for c in self.clients if c.hung]
        failures["client_hung"] = len(hung)
        closed = [c for c in subs if not c.killed and c.stats[STATE] == CLOSED_BY_RELAY]
        unexpected = [c for c in closed if c.proc.pid not in dropped_pids]
        if summary and summary["slow_dropped"] > len(dropped_pids):  # more drops than the pids kept: trust the count
            unexpected = unexpected[summary["slow_dropped"] - len(dropped_pids) :]
        failures["unexpected_close"] = len(unexpected)
        # A shared-memory reader is cut off only by a lap it reported itself, and one that asked for positions never.
        miscut = [
            c
            for c in subs
            if c.shm and not c.killed and c.proc.pid in dropped_pids and (c.positioned or not c.stats[SHM_CUT_OFF])
        ]
        failures["shm_cut_off"] = len(miscut)
        # The relay closes a stream between messages; bytes left over at a clean end are a torn message.
        torn = [c for c in subs if c.stats[STATE] == ENDED and c.stats[TAIL]]
        failures["torn_tail"] = len(torn)
        failures["position"] = sum(c.stats[POSITION_FAILURES] for c in subs)
        resumes = self._check_gaps(subs)
        failures["gap_count"] = resumes.pop("mismatches")
        forwarded = summary["forwarded"] if summary else None
        complete = [
            c
            for c in subs
            if c.from_start and not c.killed and c.stats[STATE] == ENDED and not c.filtered and not c.stats[CHANGES]
        ]
        soak_traffic = self.probes_sent + (echo.beacons + echo.echoes if echo is not None else 0)
        missing = {}
        if forwarded is not None:
            expected = forwarded - soak_traffic
            missing = {f"sub-{c.index}": expected - c.stats[VERIFIED] for c in complete}
            failures["missing"] = sum(1 for m in missing.values() if m)
        rejected = summary["rejected"] if summary else None
        faults = summary["faults"] if summary else None
        failures["relay_rejected"] = sum((rejected or {}).values())
        failures["relay_faults"] = sum((faults or {}).values())
        relay_died = relay_exit != 0 or summary is None
        details = []
        for client in subs + errors:
            if client.detail_path.exists():
                for line in client.detail_path.read_text().splitlines()[:MAX_DETAILS]:
                    details.append(
                        {"client": f"{client.kind}-{client.index}", "role": _role(client), **json.loads(line)}
                    )
        if echo_error is not None:
            details.append({"client": "echo", "kind": "error", "error": echo_error})
        for client in torn:
            details.append({"client": f"sub-{client.index}", "kind": "torn_tail", "bytes": client.stats[TAIL]})
        for client in hung:
            details.append({"client": f"{client.kind}-{client.index}", "kind": "hung", "state": client.state})
        for client in unexpected:
            details.append({"client": f"sub-{client.index}", "kind": "unexpected_close", "pid": client.proc.pid})
        for client in miscut:
            details.append({"client": f"sub-{client.index}", "kind": "shm_cut_off", "role": _role(client)})
        for name, gap in missing.items():
            if gap:
                details.append({"client": name, "kind": "missing", "messages": gap})
        details.extend(resumes.pop("details"))
        gaps = failures["sequence"] + failures["head"]
        total_failures = sum(failures.values())
        rss = self._rss_figures()
        report = {
            "domain": opts.domain,
            "seed": self.seed,
            "argv": opts.argv,
            "options": {
                "duration_s": opts.duration,
                "rate": opts.rate,
                "publishers": opts.publishers,
                "subscribers": opts.subscribers,
                "churn_per_s": opts.churn,
                "stall_prob": opts.stall_prob,
                "stall_max_s": opts.stall_max,
                "filtered": opts.filtered,
                "resubscribe_prob": opts.resubscribe,
                "resuming": opts.resuming,
                "sigstop_per_s": opts.sigstop,
                "shm": opts.shm,
                "max_size": self.config.max_size,
                "relay_options": list(self.relay_options()),
            },
            "load_seconds": round(self.load_seconds, 3),
            "interrupted": self.interrupted,
            "messages_published": sum(c.stats[PUBLISHED] for c in pubs),
            "messages_verified": sum(c.stats[VERIFIED] for c in subs),
            "verification_failures": total_failures,
            "gaps": gaps,
            "failures": dict(failures),
            "failure_details": details[:20],
            "complete_subscribers": {
                "expected_each": None if forwarded is None else forwarded - soak_traffic,
                "missing": missing,
            },
            "subscriptions": {
                "subscribed_at_connect": sum(1 for c in subs if c.stats[SUBSCRIBED]),
                "subscribers_changed": sum(1 for c in subs if c.stats[CHANGES]),
                "changes": sum(c.stats[CHANGES] for c in subs),
                "unsubscribes": sum(c.stats[UNSUBSCRIBES] for c in subs),
                "messages_verified": sum(c.stats[FILTERED_VERIFIED] for c in subs),
                "windows_closed_by_message": sum(c.stats[BY_MESSAGE] for c in subs),
                "windows_closed_by_echo": sum(c.stats[BY_ECHO] for c in subs),
                "streams_skipped_ahead": sum(c.stats[SKIPPED_AHEAD] for c in subs),
                "beacons_echoed": echo.beacons if echo is not None else 0,
                "relay_control_messages": summary["control"] if summary else None,
            },
            "faults": {
                "clients_killed": sum(self.kills.values()),
                "publishers_killed": self.kills["pub"],
                "subscribers_killed": self.kills["sub"],
                "torn_messages_discarded": summary["torn_messages"] if summary else None,
                "subscribers_dropped_slow": dropped["sub"],
                "publishers_dropped_slow": dropped["pub"],
                "relay_slow_dropped": summary["slow_dropped"] if summary else None,
                "stalls": sum(c.stats[STALLS] for c in subs),
                "stall_seconds": round(sum(c.stats[STALL_MS] for c in subs) / 1000, 1),
                "sigstops": self.sigstops,
                "sigstop_seconds": round(self.sigstop_seconds, 1),
                "clients_replaced_after_exit": dict(self.replaced),
            },
            "positions": resumes,
            "kinds": {kind: self._kind_figures(kind, subs, dropped_pids) for kind in KINDS},
            "clients": {"publishers": len(pubs), "subscribers": len(subs)},
            "relay": {
                "exit_code": relay_exit,
                "died": relay_died,
                "summary": summary,
                "probes": self.probes_sent,
                "log_tail": relay.tail(10).splitlines() if relay and relay_died else [],
            },
            "rss": rss,
        }
        report["ok"] = total_failures == 0 and not relay_died
        return report

    def _check_gaps(self, subs: list[Client]) -> dict:
        """The positioned subscribers' figures, and every gap they heard of checked against the witness's record.

        For each gap (message numbers ``p`` to ``q``) the witness's record says
        how many messages of each stream, and of the soak's own traffic, the
        relay left out; a stream the subscriber saw on both sides must go on
        exactly that many sequences on (``mismatches`` otherwise). The gap
        notice's own count was checked against the positions around it as it
        arrived (a ``position`` failure otherwise).
        """
        keys, base = None, 0
        if self.keys_path is not None and self.keys_path.exists():
            raw = self.keys_path.read_bytes()
            base = int.from_bytes(raw[:8], "little")
            keys = array.array("i", raw[8:])
        positioned = [c for c in subs if c.positioned]
        figures = {
            "positioned_subscribers": len(positioned),
            "resumes": self.resumes,
            "killed_before_recording": self.unrecorded,
            "positions_recorded": sum(c.stats[RECORDED] for c in positioned),
            "set_aside_before_notice": sum(c.stats[BEFORE_NOTICE] for c in positioned),
            "gap_notices": sum(c.stats[GAP_NOTICES] for c in positioned),
            "messages_missed": sum(c.stats[GAP_MESSAGES] for c in positioned),
            "relay_gap_notices": (self.relay_figures or {}).get("slow_actions", {}).get("gap_notice"),
            "dropped_as_slow": sum(
                1
                for c in positioned
                if self.relay_figures and c.proc.pid in self.relay_figures["slow_disconnected_pids"]
            ),
            "gaps_checked": 0,
            "missed_stream_messages": 0,
            "missed_soak_traffic": 0,
            "streams_checked": 0,
            "gaps_unchecked": 0,
            "position_failures": sum(c.stats[POSITION_FAILURES] for c in positioned),
            "gap_count_failures": 0,
        }
        mismatches, details = 0, []
        for client in positioned:
            if client.gaps_path is None or not client.gaps_path.exists():
                continue
            gaps: dict[int, dict] = {}
            for line in client.gaps_path.read_text().splitlines():
                with contextlib.suppress(ValueError):  # a line a SIGKILL cut short
                    record = json.loads(line)
                    if "count" in record:
                        gaps[record["gap"]] = {**record, "counts": None}
                        continue
                    gap = gaps.get(record["gap"])
                    if gap is None:
                        continue
                    if gap["counts"] is None:
                        lo, hi = gap["p"] - base, gap["q"] - base
                        if keys is None or lo < 0 or hi > len(keys):
                            gap["counts"] = False
                        else:
                            gap["counts"] = Counter(keys[lo:hi])
                    if gap["counts"] is False:
                        continue
                    figures["streams_checked"] += 1
                    took = gap["counts"][record["key"]]
                    if record["first"] != record["before"] + took + 1:
                        mismatches += 1
                        if len(details) < MAX_DETAILS:
                            details.append(
                                {"client": f"sub-{client.index}", "kind": "gap_count", **record, "took": took}
                            )
            for gap in gaps.values():
                lo, hi = gap["p"] - base, gap["q"] - base
                if keys is None or lo < 0 or hi > len(keys):
                    figures["gaps_unchecked"] += 1
                    continue
                counts = gap["counts"] or Counter(keys[lo:hi])
                soak = sum(n for k, n in counts.items() if k & 0xFF == SOAK_SOURCE)
                figures["gaps_checked"] += 1
                figures["missed_soak_traffic"] += soak
                figures["missed_stream_messages"] += sum(counts.values()) - soak
                if sum(counts.values()) != gap["count"]:
                    mismatches += 1
                    details.append({"client": f"sub-{client.index}", "kind": "gap_count", **gap, "counts": None})
        figures["gap_count_failures"] = mismatches
        return {**figures, "mismatches": mismatches, "details": details}

    def _kind_figures(self, kind: str, subs: list[Client], dropped_pids: set[int]) -> dict:
        """What the subscribers of one kind (``socket`` or ``shm``: how they read) ran and verified, and lost."""
        mine = [c for c in subs if _kind(c) == kind]
        positioned = [c for c in mine if c.positioned]
        return {
            "subscribers": len(mine),
            "granted": sum(c.stats[SHM_GRANTED] for c in mine),
            "positioned": len(positioned),
            "resumed": sum(1 for c in mine if c.resumed),
            "filtered": sum(1 for c in mine if c.filtered),
            "killed": sum(1 for c in mine if c.killed),
            "sigstops": self.sigstopped[kind],
            "messages_verified": sum(c.stats[VERIFIED] for c in mine),
            "verified_under_a_subscription": sum(c.stats[FILTERED_VERIFIED] for c in mine),
            "failures": sum(c.stats[slot] for c in mine for slot in (*FAILURE_SLOTS.values(), POSITION_FAILURES)),
            "gap_notices": sum(c.stats[GAP_NOTICES] for c in positioned),
            "messages_missed": sum(c.stats[GAP_MESSAGES] for c in positioned),
            "laps": sum(c.stats[SHM_LAPS] for c in mine),  # shm: laps a positioned reader recorded as gaps
            "cut_off": sum(1 for c in mine if c.proc.pid in dropped_pids),  # dropped as slow, lapped (shm)
            "cut_off_by_lap": sum(c.stats[SHM_CUT_OFF] for c in mine),
        }

    @staticmethod
    def _broken(client: Client) -> bool:
        """A subscriber that stopped on a framing failure: counted under ``framing``, not as an error."""
        return client.kind == "sub" and client.stats[FRAMING] > 0

    def _rss_figures(self) -> dict:
        samples = self.rss_samples
        if not samples:
            return {"start_mib": None, "warmup_mib": None, "max_mib": None, "end_mib": None, "samples": []}
        warmup_at = max(5.0, 0.1 * self.opts.duration)
        warm = next((rss for t, rss in samples if t >= warmup_at), samples[-1][1])
        end = samples[-1][1]
        return {
            "start_mib": samples[0][1] / MiB,
            "warmup_at_s": warmup_at,
            "warmup_mib": warm / MiB,
            "max_mib": max(rss for _, rss in samples) / MiB,
            "end_mib": end / MiB,
            "end_over_warmup": end / warm,
            "samples": [[round(t, 2), rss] for t, rss in samples],
        }


KINDS = ("socket", "shm")


def _kind(client: Client) -> str:
    """How a subscriber reads its stream: from its socket, or from the relay's log in shared memory."""
    return "shm" if client.shm else "socket"


def _role(client: Client) -> str:
    """What a client was, for a failure's detail."""
    if client.kind == "pub":
        return f"publisher {client.key:#06x}"
    kind = (
        "witness"
        if client.witness
        else "positioned"
        if client.positioned
        else "filtered"
        if client.filtered
        else "plain"
    )
    changes = client.stats[CHANGES]
    return (
        kind
        + (", shared memory" if client.shm else "")
        + (", resumed" if client.resumed else "")
        + (", initial" if client.from_start else "")
        + (f", {changes} subscription changes" if changes else "")
    )


def format_report(report: dict) -> str:
    o, f, r = report["options"], report["faults"], report["rss"]
    fail = report["failures"]
    relay = report["relay"]
    summary = relay["summary"] or {}
    expected = report["complete_subscribers"]["expected_each"]
    missing = report["complete_subscribers"]["missing"]
    subs = report["subscriptions"]
    pos = report["positions"]
    relay_gaps = pos["relay_gap_notices"]

    def mib(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    rows = [
        ("load", f"{report['load_seconds']:.1f} s" + (" (interrupted)" if report["interrupted"] else "")),
        ("messages published", f"{report['messages_published']:,}"),
        (
            "messages verified",
            f"{report['messages_verified']:,} (CRC-32 and sequence, by {report['clients']['subscribers']} subscribers)",
        ),
        (
            "verification failures",
            f"{report['verification_failures']} ("
            + ", ".join(
                f"{k} {v}" for k, v in fail.items() if v or k in ("crc", "sequence", "subscription", "gap_count")
            )
            + ")",
        ),
        ("gaps", str(report["gaps"])),
        (
            "subscriptions",
            f"{subs['subscribed_at_connect']} at connect, {subs['changes']} changes by "
            f"{subs['subscribers_changed']} subscribers ({subs['unsubscribes']} unsubscribes); "
            f"relay read {'-' if subs['relay_control_messages'] is None else subs['relay_control_messages']} "
            "control messages",
        ),
        (
            "verified under a subscription",
            f"{subs['messages_verified']:,} (switch windows closed: {subs['windows_closed_by_message']} by a "
            f"message, {subs['windows_closed_by_echo']} by the echo; {subs['streams_skipped_ahead']} streams "
            "went on from the head after a change)",
        ),
        (
            "complete subscribers",
            "-"
            if expected is None
            else f"{len(missing)} verified {expected:,} each, missing {sum(abs(m) for m in missing.values())}",
        ),
        (
            "clients killed (SIGKILL)",
            f"{f['clients_killed']} ({f['publishers_killed']} pub, {f['subscribers_killed']} sub)",
        ),
        ("torn messages discarded", str(f["torn_messages_discarded"])),
        (
            "dropped as slow",
            f"{f['subscribers_dropped_slow']} sub, {f['publishers_dropped_slow']} pub "
            f"(relay's count: {f['relay_slow_dropped']})",
        ),
        ("stalls", f"{f['stalls']} ({f['stall_seconds']} s)"),
        ("SIGSTOP stalls", f"{f['sigstops']} ({f['sigstop_seconds']} s)"),
        (
            "positioned subscribers",
            f"{pos['positioned_subscribers']}, {pos['positions_recorded']:,} positions recorded; "
            f"{pos['resumes']} resumes after SIGKILL ({pos['killed_before_recording']} killed before recording); "
            f"{pos['set_aside_before_notice']} sent before the resume took effect, set aside; "
            f"{pos['dropped_as_slow']} dropped as slow",
        ),
        (
            "gap notices",
            f"{pos['gap_notices']} read (relay sent {'-' if relay_gaps is None else relay_gaps}), "
            f"{pos['messages_missed']:,} messages missed ({pos['missed_stream_messages']:,} of streams, "
            f"{pos['missed_soak_traffic']:,} soak traffic); {pos['gaps_checked']} gaps and {pos['streams_checked']} "
            f"streams checked against the witness, {pos['gap_count_failures']} wrong",
        ),
        *(
            (
                f"{kind} subscribers",
                f"{k['subscribers']} ({k['positioned']} positioned, {k['resumed']} resumed, {k['filtered']} "
                f"filtered; {k['killed']} killed, {k['sigstops']} SIGSTOPs), {k['messages_verified']:,} messages "
                f"verified, {k['failures']} failures; {k['gap_notices']} gaps ({k['messages_missed']:,} messages), "
                f"{k['cut_off']} cut off"
                + (
                    f"; {k['granted']} granted the log, {k['laps']} laps, {k['cut_off_by_lap']} by a lap"
                    if kind == "shm"
                    else ""
                ),
            )
            for kind, k in report["kinds"].items()
        ),
        ("relay received/forwarded", f"{summary.get('received', '-')} / {summary.get('forwarded', '-')}"),
        ("relay rejected / faults", f"{summary.get('rejected') or 0} / {summary.get('faults') or 0}"),
        (
            "relay RSS MiB",
            f"start {mib(r['start_mib'])}, warm-up {mib(r['warmup_mib'])}, max {mib(r['max_mib'])}, "
            f"end {mib(r['end_mib'])}",
        ),
        ("relay exit", "died" if relay["died"] else f"code {relay['exit_code']}"),
        ("result", "OK" if report["ok"] else "FAILED"),
    ]
    head = (
        f"jitrelay soak: {report['domain']} relay, {o['duration_s']:g} s at {o['rate']:g} msg/s, "
        f"{o['publishers']} publishers, {o['subscribers']} subscribers, churn {o['churn_per_s']:g}/s, "
        f"seed {report['seed']}"
    )
    width = max(len(k) for k, _ in rows)
    body = [f"  {k:<{width}}  {v}" for k, v in rows]
    for detail in report["failure_details"][:5]:
        body.append(f"  ! {json.dumps(detail)[:300]}")
    for line in relay["log_tail"]:
        body.append(f"  relay: {line}")
    return "\n".join([head, *body])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``jitrelay soak`` command line, which ``options`` reads; its defaults are ``SoakOptions``'."""
    d = SoakOptions
    parser.add_argument("--domain", choices=list(LOGICS), default=d.domain, help=f"relay domain ({d.domain})")
    parser.add_argument(
        "--duration", type=non_negative_float, default=d.duration, help=f"seconds of load ({d.duration:g})"
    )
    parser.add_argument("--rate", type=non_negative_float, default=d.rate, help="messages per second, all publishers")
    parser.add_argument(
        "--publishers", type=non_negative, default=d.publishers, help=f"publisher processes at a time ({d.publishers})"
    )
    parser.add_argument(
        "--subscribers",
        type=non_negative,
        default=d.subscribers,
        help=f"subscriber processes at a time ({d.subscribers})",
    )
    parser.add_argument(
        "--churn", type=non_negative_float, default=d.churn, help="clients killed and replaced per second"
    )
    parser.add_argument(
        "--stall-prob",
        type=non_negative_float,
        default=d.stall_prob,
        help=f"chance per second that a subscriber stalls ({d.stall_prob:g})",
    )
    parser.add_argument(
        "--stall-max", type=non_negative_float, default=d.stall_max, help=f"longest stall in seconds ({d.stall_max:g})"
    )
    parser.add_argument(
        "--filtered",
        type=non_negative_float,
        default=d.filtered,
        help=f"share of subscribers that subscribe at connect to some publishers' sources ({d.filtered:g})",
    )
    parser.add_argument(
        "--resubscribe",
        type=non_negative_float,
        default=d.resubscribe,
        help=f"chance per second that a subscriber changes its subscription ({d.resubscribe:g})",
    )
    parser.add_argument(
        "--resuming",
        type=non_negative_float,
        default=d.resuming,
        help=f"share of subscribers (the witness aside) that ask for positions, resumed when killed ({d.resuming:g})",
    )
    parser.add_argument(
        "--sigstop",
        type=non_negative_float,
        default=d.sigstop,
        help=f"subscriber processes stopped with SIGSTOP per second, for up to --stall-max ({d.sigstop:g})",
    )
    parser.add_argument(
        "--shm",
        type=non_negative_float,
        default=d.shm,
        help=f"share of subscribers (the witness aside) that read the relay's log from shared memory ({d.shm:g})",
    )
    add_byte_option(
        parser, "--log-size", "the relay's log (16MiB); a smaller one leaves stalled subscribers behind sooner", 0
    )
    parser.add_argument(
        "--max-size", type=non_negative, default=d.max_size, help=f"largest message in bytes ({d.max_size})"
    )
    parser.add_argument("--seed", type=non_negative, help="random seed, to repeat a run (default: random)")
    parser.add_argument("--json", type=Path, help="also write the report, with memory samples, as JSON here")
    parser.add_argument("--socket-dir", type=Path, help="where the relay's socket goes (default: a fresh /tmp folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def options(args: argparse.Namespace, argv: list[str] | None = None) -> SoakOptions:
    """The run the command line asks for; ``UsageError`` when it asks for something impossible."""
    if args.domain not in LOGICS:
        raise UsageError(f"unknown domain {args.domain!r}; choose one of {', '.join(LOGICS)}")
    if args.duration <= 0 or args.rate <= 0:
        raise UsageError("--duration and --rate must be positive")
    if args.publishers < 1 or args.subscribers < 1:
        raise UsageError("need at least one publisher and one subscriber")
    if not 0 <= args.stall_prob <= 1:
        raise UsageError("--stall-prob is a probability per second, 0..1")
    if not 0 <= args.filtered <= 1:
        raise UsageError("--filtered is a share of the subscribers, 0..1")
    if not 0 <= args.resubscribe <= 1:
        raise UsageError("--resubscribe is a probability per second, 0..1")
    if not 0 <= args.resuming <= 1:
        raise UsageError("--resuming is a share of the subscribers, 0..1")
    if not 0 <= args.shm <= 1:
        raise UsageError("--shm is a share of the subscribers, 0..1")
    if args.publishers > 255:
        raise UsageError("at most 255 publishers: each has a source byte of its own")
    if args.max_size < protocol.HEADER_SIZE + 2:
        raise UsageError(f"--max-size must be at least {protocol.HEADER_SIZE + 2} bytes (a header and one record)")
    if args.churn * args.duration > MAX_KEYS // 4:
        raise UsageError(f"--churn x --duration above {MAX_KEYS // 4} kills could run out of stream keys")
    return SoakOptions(
        domain=args.domain,
        duration=args.duration,
        rate=args.rate,
        publishers=args.publishers,
        subscribers=args.subscribers,
        churn=args.churn,
        stall_prob=args.stall_prob,
        stall_max=args.stall_max,
        filtered=args.filtered,
        resubscribe=args.resubscribe,
        resuming=args.resuming,
        sigstop=args.sigstop,
        shm=args.shm,
        log_size=args.log_size,
        max_size=args.max_size,
        seed=args.seed,
        json_path=args.json,
        socket_dir=args.socket_dir,
        progress=not args.quiet,
        argv=list(sys.argv[1:] if argv is None else argv),
    )


def run_soak(args: argparse.Namespace) -> int:
    """The ``jitrelay soak`` command: 0 when every message checked out and the relay survived, else 1."""
    opts = options(args)
    soak = Soak(opts)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = soak.run()
    except SoakError as exc:
        print(f"jitrelay soak: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_report(report))
    if opts.json_path is not None:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        opts.json_path.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends a soak as Ctrl-C does: stop, clean up, report."""
    raise KeyboardInterrupt
