"""``jitrelay replay FILE --to DOMAIN``: publish a capture into a relay, paced as it was received or at full speed.

The capture (``tools.capture``) is mapped, never copied: what is sent is a
slice of the mapped segment, byte for byte as recorded, headers included
(sequence numbers and timestamps are the original publishers'). Batches are
the unit: a recorded batch is sent whole, and consecutive batches go out in
one write where their times allow.

- ``--speed max``: contiguous selected batches in writes of about
  ``CHUNK_BYTES``, as fast as the relay takes them (``publish_batch``).
- ``--speed S``: batch ``i`` goes out when ``(t_i - t_0) / S`` seconds have
  passed since the first one (``t`` the recorded receive times); every batch
  already due goes out in one write, so a replay that falls behind catches
  up without sleeping rather than drifting.

``--from`` / ``--until`` select batches by their receive time, ``[from,
until)``, as ``audit --since/--until`` select by header time.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jitrelay import kernels
from jitrelay.client import Publisher
from jitrelay.core import protocol
from jitrelay.core.domains import LOGICS
from jitrelay.core.units import MiB
from jitrelay.tools.capture import Segment, read_capture
from jitrelay.tools.options import time_ns_arg
from jitrelay.tools.usage import UsageError

log = logging.getLogger("jitrelay.replay")

CHUNK_BYTES = 4 * MiB  # what one write at --speed max holds at most (one recorded batch may be larger)
MAX = 0.0  # --speed max


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``jitrelay replay`` command line, which ``run`` reads; raises nothing."""
    domains = list(LOGICS)
    parser.add_argument("file", type=Path, metavar="FILE", help="a capture: its path prefix, folder, or one segment")
    parser.add_argument("--to", required=True, choices=domains, metavar="DOMAIN", help=f"one of: {', '.join(domains)}")
    parser.add_argument("--socket", type=Path, help="the relay's Unix socket (default: as for the other commands)")
    parser.add_argument(
        "--speed",
        type=speed_arg,
        default=1.0,
        help="1 as recorded (default), 10 ten times faster, any positive number, or max",
    )
    parser.add_argument(
        "--from", dest="since", type=time_ns_arg, metavar="T", help="batches received at or after T (ns or ISO-8601)"
    )
    parser.add_argument("--until", type=time_ns_arg, metavar="T", help="batches received before T")


def speed_arg(text: str) -> float:
    """``max`` (0.0 here) or a positive factor; ``argparse.ArgumentTypeError`` for anything else."""
    if text.strip().lower() == "max":
        return MAX
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"not a speed: {text!r} (a positive number such as 1 or 10, or max)")
    return value


@dataclass
class Sent:
    """What a replay has sent so far."""

    messages: int = 0
    bytes: int = 0
    segments: int = 0


def run(args: argparse.Namespace) -> int:
    """Replay the capture into the relay of ``--to``: 0; 1 when the capture cannot be read.

    Raises ``UsageError`` for a capture of another domain or one without
    receive times at a paced speed, ``RelayConnectionError`` when the relay
    cannot be reached or goes away.
    """
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="jitrelay replay: %(message)s")
    try:
        segments = read_capture(args.file)
    except OSError as exc:
        reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        print(f"jitrelay replay: {reason}", file=sys.stderr)
        return 1
    sent = Sent()
    begun = time.monotonic()
    with Publisher(args.to, args.socket, reconnect=False) as publisher:  # a relay gone ends the replay (exit 1)
        pacer = Pacer(args.speed)
        for segment in segments:
            _check(segment, args)
            batches = _selected(segment, args)
            whole = len(batches) == len(segment.ends)  # then the count is the segment's, known without a walk
            for chunk in _chunks(segment, batches, args.speed, pacer):
                publisher.publish_batch(chunk)
                sent.messages += 0 if whole else kernels.frame(chunk)[0]
                sent.bytes += len(chunk)
            sent.messages += segment.messages if whole else 0
            sent.segments += 1
    took = time.monotonic() - begun
    log.info(
        "replayed %d messages (%d bytes) from %d segments in %.3f s (%.0f msg/s)",
        sent.messages,
        sent.bytes,
        sent.segments,
        took,
        sent.messages / took if took > 0 else 0.0,
    )
    return 0


def _check(segment: Segment, args: argparse.Namespace) -> None:
    """Refuse a segment the relay would reject whole (another domain) or that cannot be paced (no times)."""
    if len(segment.data) >= protocol.HEADER_SIZE:
        domain = int(segment.data[protocol.OFF_DOMAIN])
        if domain != LOGICS[args.to].domain_id:
            raise UsageError(f"{segment.path} holds messages of domain {domain}, not of {args.to}")
    if args.speed != MAX and not segment.timed and len(segment.ends):
        raise UsageError(f"{segment.path} has no receive times (no .times file beside it): replay it with --speed max")


class Pacer:
    """When each recorded time is due: ``(t - t_0) / speed`` seconds after the first batch went out."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self._first_ns: int | None = None
        self._started = 0.0

    def due(self, times: np.ndarray) -> np.ndarray:
        """The monotonic clock's time at which each of ``times`` (ns) is due; the first time seen is due now."""
        if self._first_ns is None:
            self._first_ns = int(times[0])
            self._started = time.monotonic()
        return self._started + (times - self._first_ns) / (self.speed * 1e9)


def _selected(segment: Segment, args: argparse.Namespace) -> np.ndarray:
    """The numbers of the segment's batches received in ``[--from, --until)``."""
    selected = np.ones(len(segment.ends), dtype=bool)
    if args.since is not None:
        selected &= segment.times >= args.since
    if args.until is not None:
        selected &= segment.times < args.until
    return np.flatnonzero(selected)


def _chunks(segment: Segment, batches: np.ndarray, speed: float, pacer: Pacer) -> Iterator[np.ndarray]:
    """The slices of the segment that hold ``batches``, in order, each when it is due."""
    if not len(batches):
        return
    starts, ends = segment.starts, segment.ends
    if speed == MAX:
        for first, last in _runs(batches, starts, ends, 0, len(batches)):
            yield segment.data[starts[first] : ends[last]]
        return
    due = np.maximum.accumulate(pacer.due(segment.times[batches]))  # a clock stepped back: never out of order
    i = 0
    while i < len(batches):
        wait = due[i] - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        k = int(np.searchsorted(due, time.monotonic(), side="right"))
        k = max(k, i + 1)
        for first, last in _runs(batches, starts, ends, i, k):
            yield segment.data[starts[first] : ends[last]]
        i = k


def _runs(batches: np.ndarray, starts: np.ndarray, ends: np.ndarray, i: int, k: int) -> Iterator[tuple[int, int]]:
    """``batches[i:k]`` as (first, last) batch numbers of contiguous runs of at most about ``CHUNK_BYTES``."""
    first = last = int(batches[i])
    for b in batches[i + 1 : k].tolist():
        if b == last + 1 and ends[b] - starts[first] <= CHUNK_BYTES:
            last = b
        else:
            yield first, last
            first = last = b
    yield first, last
