"""What ``jitrelay shadow`` finds, as data: the tallies of both sides, the comparison of their streams, the report.

Pure: no sockets, no clock. The I/O loop (``run``) feeds three things in:
each batch of source messages with the verdicts the local relay's rules give
them (``Tally.add_source``), the bytes among them that jitrelay should
forward (``StreamComparison.expect``), and each batch the local relay
forwarded back (``StreamComparison.received``). ``ShadowReport`` is a
snapshot of it all; ``format_report`` lays it out for a person and
``ShadowReport.as_json`` for a program.

The comparison: both streams are hashed as they go (blake2b, running), and
the bytes jitrelay should forward but has not sent back yet wait in one
buffer; each received batch is compared with the front of that buffer (one
``bytes`` comparison, not one per message) and taken off it. At the first
byte that differs, the message that holds it is where the streams diverged;
from then on only the counts and digests go on. So the buffer holds what
the local relay is behind by, never the whole run (capped at
``MAX_PENDING``: a relay that far behind is counted as diverged).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from jitrelay.core import protocol
from jitrelay.core.views import message_offsets

SAMPLE_BYTES = 64  # bytes of a rejected message shown in hex: the header and the first 32 of its payload
MAX_PENDING = 256 * 1024 * 1024
DIGEST_SIZE = 32  # blake2b-256


@dataclass(frozen=True)
class Sample:
    """The first message rejected for one reason: where it was in the source stream, its header, its first bytes."""

    message_index: int
    header: dict[str, int]
    head_hex: str

    @classmethod
    def of(cls, raw: bytes | memoryview, message_index: int) -> Sample:
        head = protocol.Header.unpack(raw)
        fields = {name: getattr(head, name) for name in protocol.HEADER_FIELDS}
        return cls(message_index, fields, bytes(raw[:SAMPLE_BYTES]).hex())

    def describe(self) -> str:
        h = self.header
        return (
            f"#{self.message_index} domain={h['relay_domain']} version={h['version']} source={h['source']} "
            f"seq={h['sequence']} payload={h['payload_size']} checksum={h['checksum']:#010x} {self.head_hex}"
        )


@dataclass
class Tally:
    """What the source relay sent: messages and bytes, and what the local relay's rules make of them."""

    messages: int = 0
    bytes: int = 0
    forward_messages: int = 0
    forward_bytes: int = 0
    controls: int = 0
    rejects: dict[str, int] = field(default_factory=lambda: dict.fromkeys(protocol.REJECT_NAMES, 0))
    samples: dict[str, Sample] = field(default_factory=dict)

    def add_source(self, batch: np.ndarray, starts: np.ndarray, verdicts: np.ndarray) -> None:
        """A batch of whole messages (``batch``, each starting at ``starts``) and each one's verdict."""
        count = len(starts)
        first = self.messages
        self.messages += count
        self.bytes += len(batch)
        ends = np.append(starts[1:], len(batch))
        sizes = ends - starts
        forwarded = verdicts == protocol.FORWARD
        self.forward_messages += int(forwarded.sum())
        self.forward_bytes += int(sizes[forwarded].sum())
        self.controls += int((verdicts == protocol.CONTROL).sum())
        for code, name in enumerate(protocol.VERDICT_NAMES):
            if name not in self.rejects:
                continue
            hits = np.flatnonzero(verdicts == code)
            if len(hits):
                self.rejects[name] += len(hits)
                if name not in self.samples:
                    k = int(hits[0])
                    self.samples[name] = Sample.of(batch.data[starts[k] : ends[k]], first + k)


@dataclass
class StreamComparison:
    """The stream jitrelay should forward against the one it forwarded, message by message."""

    expected_messages: int = 0
    expected_bytes: int = 0
    local_messages: int = 0
    local_bytes: int = 0
    diverged_at: int | None = None  # the index, in the stream jitrelay should forward, of the first difference
    _pending: bytearray = field(default_factory=bytearray)
    _matched: int = 0  # messages of the local stream found equal so far
    _expected_hash: hashlib.blake2b = field(default_factory=lambda: hashlib.blake2b(digest_size=DIGEST_SIZE))
    _local_hash: hashlib.blake2b = field(default_factory=lambda: hashlib.blake2b(digest_size=DIGEST_SIZE))

    def expect(self, data: bytes, messages: int) -> None:
        """``messages`` whole messages, back to back, that the local relay should forward next."""
        self.expected_messages += messages
        self.expected_bytes += len(data)
        self._expected_hash.update(data)
        if self.diverged_at is None:
            if len(self._pending) + len(data) > MAX_PENDING:
                self.diverged_at = self._matched  # the local relay is this far behind: it is not forwarding
                self._pending.clear()
                return
            self._pending += data

    def received(self, data: bytes | np.ndarray) -> None:
        """A batch of whole messages the local relay forwarded."""
        raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        starts = message_offsets(raw)
        self.local_messages += len(starts)
        self.local_bytes += len(raw)
        self._local_hash.update(raw)
        if self.diverged_at is not None:
            return
        if self._pending[: len(raw)] == raw:
            del self._pending[: len(raw)]
            self._matched += len(starts)
            return
        common = min(len(raw), len(self._pending))
        mine = np.frombuffer(raw, dtype=np.uint8, count=common)
        theirs = np.frombuffer(bytes(self._pending[:common]), dtype=np.uint8)  # a copy: the buffer is cleared next
        differing = np.flatnonzero(mine != theirs)
        at = int(differing[0]) if len(differing) else common  # else the local relay sent more than it was given
        self.diverged_at = self._matched + int(np.searchsorted(starts, at, side="right")) - 1
        self._pending.clear()

    @property
    def behind(self) -> int:
        """Bytes the local relay has been given to forward and has not forwarded yet (0 once diverged)."""
        return len(self._pending)

    def finish(self) -> None:
        """No more is coming: a message still owed is where the streams diverge."""
        if self.diverged_at is None and self._pending:
            self.diverged_at = self._matched

    @property
    def identical(self) -> bool:
        return self.diverged_at is None and not self._pending

    @property
    def digests(self) -> tuple[str, str]:
        return self._expected_hash.hexdigest(), self._local_hash.hexdigest()


@dataclass(frozen=True)
class ShadowReport:
    """One look at a shadow run: both sides' figures, the rejects and the verdict on the streams."""

    domain: str
    source_socket: str
    local_socket: str
    elapsed: float
    tally: Tally
    comparison: StreamComparison
    final: bool = False
    ended: str | None = None  # why the run stopped: duration, signal, source closed, source fault, local relay
    source_fault: dict[str, object] | None = None
    local_error: str | None = None
    source_unfinished_bytes: int = 0

    @property
    def identical(self) -> bool:
        return self.comparison.identical

    @property
    def clean(self) -> bool:
        """Identical, and neither side ended in an error: what exit code 0 means."""
        return self.identical and self.source_fault is None and self.local_error is None

    def as_json(self) -> dict[str, object]:
        tally, comparison = self.tally, self.comparison
        expected_digest, local_digest = comparison.digests
        return {
            "domain": self.domain,
            "source_socket": self.source_socket,
            "local_socket": self.local_socket,
            "elapsed_seconds": round(self.elapsed, 3),
            "final": self.final,
            "ended": self.ended,
            "source": {"messages": tally.messages, "bytes": tally.bytes},
            "local": {"messages": comparison.local_messages, "bytes": comparison.local_bytes},
            "should_forward": {"messages": comparison.expected_messages, "bytes": comparison.expected_bytes},
            "rejects": {
                name: {"count": count, "sample": _sample_json(tally.samples.get(name))}
                for name, count in tally.rejects.items()
            },
            "controls": tally.controls,
            "digest": {
                "algorithm": f"blake2b-{8 * DIGEST_SIZE}",
                "should_forward": expected_digest,
                "local": local_digest,
            },
            "identical": self.identical,
            "diverged_at": comparison.diverged_at,
            "behind_bytes": comparison.behind,
            "source_fault": self.source_fault,
            "source_unfinished_bytes": self.source_unfinished_bytes,
            "local_error": self.local_error,
        }

    def dumps(self) -> str:
        return json.dumps(self.as_json(), indent=2) + "\n"


def _sample_json(sample: Sample | None) -> dict[str, object] | None:
    if sample is None:
        return None
    return {"message_index": sample.message_index, "header": sample.header, "head_hex": sample.head_hex}


def format_report(report: ShadowReport) -> str:
    """The report as a person reads it: both sides in two columns, the rejects, and whether the streams agree."""
    tally, comparison = report.tally, report.comparison
    title = "final" if report.final else "so far"
    lines = [
        f"jitrelay shadow {report.domain} ({title}, {report.elapsed:.1f} s): "
        f"source relay {report.source_socket}, local jitrelay {report.local_socket}",
        f"{'':<24}{'source relay':>16}{'local jitrelay':>16}",
        f"{'messages':<24}{tally.messages:>16,}{comparison.local_messages:>16,}",
        f"{'bytes':<24}{tally.bytes:>16,}{comparison.local_bytes:>16,}",
        f"{'should forward':<24}{comparison.expected_messages:>16,}{'':>16}",
        f"{'should forward (bytes)':<24}{comparison.expected_bytes:>16,}{'':>16}",
    ]
    rejected = {name: count for name, count in tally.rejects.items() if count}
    if rejected:
        lines.append("rejects by the local relay's rules (first message of each: index, header, first bytes):")
        for name, count in rejected.items():
            lines.append(f"  {name:<18}{count:>10,}  {tally.samples[name].describe()}")
    else:
        lines.append("rejects by the local relay's rules: none")
    if tally.controls:
        lines.append(f"jitrelay control messages (taken by the local relay, never forwarded): {tally.controls:,}")
    if report.source_fault is not None:
        fault = report.source_fault
        lines.append(
            f"source stream fault: {fault['reason']} at message #{fault['message_index']} "
            f"(byte {fault['stream_offset']}, bytes there: {fault.get('head_hex', '')}): the source side stopped there"
        )
    if report.source_unfinished_bytes:
        lines.append(f"source ended in the middle of a message: {report.source_unfinished_bytes} bytes of it discarded")
    if report.local_error is not None:
        lines.append(f"local relay: {report.local_error}")
    lines.append(f"streams: {_verdict(report)}")
    if report.ended:
        lines.append(f"ended: {report.ended}")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _verdict(report: ShadowReport) -> str:
    comparison = report.comparison
    expected_digest, local_digest = comparison.digests
    if comparison.diverged_at is not None:
        return (
            f"differ from message {comparison.diverged_at} of the stream jitrelay should forward "
            f"(blake2b should forward {expected_digest[:16]}…, local {local_digest[:16]}…)"
        )
    if comparison.behind:
        return (
            f"identical so far; the local relay has {comparison.behind:,} bytes still to forward"
            if not report.final
            else f"differ: the local relay never forwarded the last {comparison.behind:,} bytes"
        )
    return f"identical ({comparison.local_messages:,} messages, blake2b {local_digest[:16]}…)"
