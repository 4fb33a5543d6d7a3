"""The soak's checks on what a subscriber received: framing, CRC-32, sequences, subscriptions, positions, gaps.

Pure: ``StreamVerifier`` is fed bytes and counts failures; ``check_gaps``
compares the gaps a positioned subscriber heard of with the witness's record
of every message's stream. Neither opens a socket or a file, so tests feed
them exact bytes.
"""

from __future__ import annotations

import array
import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from jitrelay.core import protocol
from jitrelay.core.units import MiB
from jitrelay.tools.soak.counters import FAILURE_KINDS

MAX_DETAILS = 10  # failure details kept per subscriber
# Source 0 carries the soak's own traffic, told apart by flags; every subscription includes it.
SOAK_SOURCE = 0
PROBE_FLAGS, BEACON_FLAGS, ECHO_FLAGS = 0, 1, 2
PROBE_KEY = SOAK_SOURCE | PROBE_FLAGS << 8

Sources = frozenset[int] | None  # the source bytes a subscription allows; None: every source


def allows(sources: Sources, source: int) -> bool:
    """Whether a subscription to ``sources`` lets a message of ``source`` through; raises nothing."""
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
        on_failure: Callable[[dict], object] | None = None,
        positioned: bool = False,
        resume: tuple[protocol.Position, dict[int, int]] | None = None,
        on_gap: Callable[[dict], object] | None = None,
        record_keys: bool = False,
    ):
        self.domain_id = domain_id
        self.max_payload = max_payload
        self.from_start = from_start
        self.on_failure = on_failure
        self.positioned = positioned or resume is not None
        self.on_gap = on_gap
        # (epoch, offset, message) after the last message; None until the first notice
        self.position: tuple[int, int, int] | None = None
        if resume is not None:
            self.position = (resume[0].epoch, resume[0].offset, resume[0].message)
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
        """``nbytes`` more have landed in ``space()``: check every message now whole."""
        self._end += nbytes
        self._check()

    def feed(self, data: bytes | memoryview) -> None:
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
        Call it only with the previous window closed: a subscriber waits
        (``ValueError`` otherwise).
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
        buf, view = self._buf, self._view
        pos, end = self._start, self._end
        unpack = protocol.HEADER_STRUCT.unpack_from
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
            if self.positioned and not self._place(view[pos:stop], domain, version, source | flags << 8, seq):
                pos = stop
                continue
            if version != protocol.VERSION or domain != self.domain_id:
                self._fail("framing", why=f"version {version}, domain {domain}", key=source | flags << 8, seq=seq)
            elif self._crc(view[pos:stop]) != checksum:
                self._fail("crc", key=source | flags << 8, seq=seq, size=stop - pos)
            else:
                self._message(source, flags, seq)
            self.seen += 1
            pos = stop
        self._start = pos

    @staticmethod
    def _crc(data: memoryview) -> int:
        """The CRC-32 a message should carry: its covered header bytes, then its payload."""
        crc32 = zlib.crc32
        return crc32(data[protocol.HEADER_SIZE :], crc32(data[: protocol.CHECKSUM_COVERED]))

    def _place(self, data: memoryview, domain: int, version: int, key: int, seq: int) -> bool:
        """Follow the position through one message of a positioned stream: False when it is not to be checked.

        A notice is the relay's, and a message sent before the resume took
        effect comes again after it; every other message moves the position on.
        """
        if domain == protocol.CONTROL_DOMAIN and version == protocol.VERSION:
            self._notice(data)
            return False
        if self.resuming:  # sent before the relay read where to resume: it comes again after the notice
            self.before_notice += 1
            return False
        at = self.position
        if at is not None:
            self.position = (at[0], at[1] + len(data), at[2] + 1)
            if self.keys is not None and self.keys_base is not None:
                self.keys.append(key)
        watch = self._gap_watch
        if watch and key in watch and self.on_gap is not None:
            before = watch.pop(key)
            self.on_gap({"gap": self._gap_id, "key": key, "before": before, "first": seq})
        return True

    def _message(self, source: int, flags: int, seq: int) -> None:
        """A whole message with a good CRC: is it allowed, and does it continue its stream?"""
        allowed, key = self.allowed, source | flags << 8
        if allowed is not None and source not in allowed:
            self._fail("subscription", key=key, seq=seq, allowed=sorted(allowed))
        elif source == SOAK_SOURCE:
            self._marker(flags, seq)
        else:
            if self.switching and self._old is not None and source not in self._old:
                self._settle()  # only the new set allows it: the relay forwarded it under the new one
                self.closed_by_message += 1
            self._sequence(source, key, seq)
            self.verified += 1
            if allowed is not None:
                self.filtered_verified += 1

    def _marker(self, flags: int, seq: int) -> None:
        """A message of the soak's own source: a probe, or a beacon or echo (an echo may close the window)."""
        if flags == PROBE_FLAGS:
            self.probes += 1
            return
        self.markers += 1
        if self.switching and flags == ECHO_FLAGS and seq == self._echo:
            self._settle()
            self.closed_by_echo += 1

    def _sequence(self, source: int, key: int, seq: int) -> None:
        """Stream ``key`` goes on with ``seq``: the previous one plus 1, or 0 for a stream seen from its start."""
        previous = self.last.get(key)
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
        self.last[key] = seq

    def figures(self) -> dict[str, int]:
        """What it has counted so far, by the names of the subscriber's ``Counters``; raises nothing."""
        failures = self.failures
        return {
            "verified": self.verified,
            "probes": self.probes,
            "streams": len(self.last),
            "filtered_verified": self.filtered_verified,
            "markers": self.markers,
            "by_message": self.closed_by_message,
            "by_echo": self.closed_by_echo,
            "skipped_ahead": self.skipped_ahead,
            "notices": self.notices,
            "position_failures": failures["position"],
            "gap_notices": self.gaps,
            "gap_messages": self.gap_messages,
            "before_notice": self.before_notice,
            **{kind: failures[kind] for kind in FAILURE_KINDS},
        }


# Checking the gaps positioned subscribers heard of against the witness's record


@dataclass(frozen=True)
class WitnessRecord:
    """The stream key of every message the witness read, by message number from ``base``."""

    base: int
    keys: array.array

    @classmethod
    def parse(cls, raw: bytes) -> WitnessRecord:
        """The witness's keys file: ``base`` (8 bytes, little-endian), then one int per message; raises nothing."""
        return cls(int.from_bytes(raw[:8], "little"), array.array("i", raw[8:]))

    def counts(self, p: int, q: int) -> Counter[int] | None:
        """Messages per stream key between message numbers ``p`` and ``q``; None where the record does not reach."""
        lo, hi = p - self.base, q - self.base
        if lo < 0 or hi > len(self.keys):
            return None
        return Counter(self.keys[lo:hi])


@dataclass
class GapCheck:
    """One subscriber's gaps checked against the witness's record: how many, what they took, what was wrong.

    ``stream_details`` are the streams that went on the wrong number of
    sequences after a gap; ``gap_details`` the gaps whose own count the record
    contradicts. Each is a ``gap_count`` mismatch.
    """

    gaps_checked: int = 0
    gaps_unchecked: int = 0
    streams_checked: int = 0
    missed_stream_messages: int = 0
    missed_soak_traffic: int = 0
    mismatches: int = 0
    stream_details: list[dict] = field(default_factory=list)
    gap_details: list[dict] = field(default_factory=list)


def check_gaps(record: WitnessRecord | None, lines: Iterable[str], client: str) -> GapCheck:
    """Check the gaps one positioned subscriber told of (its JSON lines) against the witness's ``record``.

    For each gap (message numbers ``p`` to ``q``) the record says how many
    messages of each stream, and of the soak's own traffic, the relay left
    out; a stream the subscriber saw on both sides must go on exactly that
    many sequences on. A line a SIGKILL cut short is skipped; raises nothing.
    """
    check = GapCheck()
    gaps: dict[int, dict] = {}
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:  # a line a SIGKILL cut short
            continue
        if "count" in entry:
            gaps[entry["gap"]] = {**entry, "counts": None}
        elif (gap := gaps.get(entry["gap"])) is not None:
            _check_stream(check, record, gap, entry, client)
    for gap in gaps.values():
        counts = None if record is None else record.counts(gap["p"], gap["q"])
        if counts is None:
            check.gaps_unchecked += 1
            continue
        soak = sum(n for k, n in counts.items() if k & 0xFF == SOAK_SOURCE)
        check.gaps_checked += 1
        check.missed_soak_traffic += soak
        check.missed_stream_messages += sum(counts.values()) - soak
        if sum(counts.values()) != gap["count"]:
            check.mismatches += 1
            check.gap_details.append({"client": client, "kind": "gap_count", **gap, "counts": None})
    return check


def _check_stream(check: GapCheck, record: WitnessRecord | None, gap: dict, entry: dict, client: str) -> None:
    """A stream's first sequence after ``gap`` must be its last before it, plus what the gap took, plus 1."""
    if gap["counts"] is None:
        counts = None if record is None else record.counts(gap["p"], gap["q"])
        gap["counts"] = False if counts is None else counts
    if gap["counts"] is False:
        return
    check.streams_checked += 1
    took = gap["counts"][entry["key"]]
    if entry["first"] != entry["before"] + took + 1:
        check.mismatches += 1
        check.stream_details.append({"client": client, "kind": "gap_count", **entry, "took": took})
