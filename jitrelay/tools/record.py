"""``jitrelay record DOMAIN FILE``: capture a relay's stream to disk, each batch with the time it was received.

A client like any subscriber: it subscribes (with ``--types``/``--sources``
at the relay), takes whole batches (``Subscriber.recv_batch``), and appends
each with its receive time to a capture (``tools.capture``: journal segments
with a side file of times), rotating segments at ``--rotate``. It asks for
positions, so what it misses is known: a gap the relay announces is logged
and counted, and after a lost connection it resumes right after the last
message it wrote.

Relay restarts: the client's subscriber reconnects by itself
(``client.reconnect``) and resumes from its position; a restarted relay says
it cannot tell what was missed and sends what its log holds. This command
only counts the reconnects, logs them and bounds them with ``--give-up``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import numpy as np

from jitrelay import kernels
from jitrelay.client import Reconnect, RelayConnectionError, Subscriber
from jitrelay.core import protocol
from jitrelay.core.domains import JOURNAL_FSYNC
from jitrelay.core.units import MiB
from jitrelay.core.views import message_offsets
from jitrelay.tools.capture import CaptureWriter
from jitrelay.tools.options import add_byte_option, add_target, byte_list, non_negative, non_negative_float

log = logging.getLogger("jitrelay.record")

DEFAULT_ROTATE_BYTES = 256 * MiB


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``jitrelay record`` command line, which ``run`` reads; raises nothing."""
    add_target(parser)
    parser.add_argument("file", type=Path, metavar="FILE", help="capture path prefix: writes FILE-NNNNNN.journal")
    parser.add_argument("--types", type=byte_list, metavar="T,T", help="record only messages with these TLV types")
    parser.add_argument("--sources", type=byte_list, metavar="S,S", help="record only messages from these sources")
    add_byte_option(parser, "--rotate", "start a new segment before one would pass this size", DEFAULT_ROTATE_BYTES)
    parser.add_argument(
        "--fsync", choices=JOURNAL_FSYNC, default="none", help="when segments are synced to disk (default: none)"
    )
    parser.add_argument("--count", type=non_negative, default=0, help="stop after this many messages (0: never)")
    parser.add_argument(
        "--duration", type=non_negative_float, default=0.0, help="stop after this many seconds (0: never)"
    )
    parser.add_argument(
        "--give-up",
        type=non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="stop when the relay stays unreachable this long (0: keep trying)",
    )


class Stop(Exception):
    """SIGTERM (or SIGINT) asked the recorder to stop: it closes the capture and reports."""


GAP_LOG_INTERVAL = 1.0  # seconds: gaps closer together than this are logged as one line


@dataclass
class Tally:
    """What a recording did, for its last line; gaps are logged as they come, at most one line a second.

    A recorder that cannot keep up with its relay is told of a gap each time
    it falls out of the relay's log, which at full rate can be many times a
    second: the first gap after a quiet second is logged at once, the ones
    that follow within the second are summed into one line.
    """

    reconnects: int = 0
    gaps: int = 0
    missed: int = 0  # messages the relay said this capture misses
    missed_bytes: int = 0
    restarts: int = 0  # gaps of a restarted relay: what it never sent is not known
    _pending: list[protocol.Gap] = field(default_factory=list)
    _logged_at: float = float("-inf")

    def gap(self, gap: protocol.Gap) -> None:
        """Count one gap the relay announced, and log it (or it with others, once a second has passed)."""
        self.gaps += 1
        if gap.reason == protocol.GAP_UNKNOWN_EPOCH:
            self.restarts += 1
        else:
            self.missed += gap.messages
            self.missed_bytes += gap.bytes
        self._pending.append(gap)
        if time.monotonic() - self._logged_at >= GAP_LOG_INTERVAL:
            self.flush()

    def flush(self) -> None:
        """Log the gaps not logged yet."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        self._logged_at = time.monotonic()
        known = [g for g in pending if g.reason != protocol.GAP_UNKNOWN_EPOCH]
        if len(known) < len(pending):
            log.warning("gap: the relay restarted; what it took before restarting and never sent is not known")
        if known:
            messages, size = sum(g.messages for g in known), sum(g.bytes for g in known)
            several = f" in {len(known)} gaps" if len(known) > 1 else ""
            log.warning("gap: %d messages (%d bytes) of the relay's stream missed%s", messages, size, several)

    def summary(self) -> str:
        """The counts for the recorder's last line."""
        return (
            f"{self.reconnects} reconnects, {self.gaps} gaps ({self.missed} messages, {self.missed_bytes} bytes "
            f"missed; {self.restarts} across restarts, not known)"
        )


def run(args: argparse.Namespace) -> int:
    """Record until ``--count``, ``--duration``, SIGINT or SIGTERM: 0; 1 when the relay is gone past ``--give-up``.

    Raises ``RelayConnectionError`` when the relay cannot be reached at the
    start, ``OSError`` when the capture cannot be written.
    """
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="jitrelay record: %(message)s")
    if args.rotate <= 0:
        print("jitrelay record: error: --rotate must be positive", file=sys.stderr)
        return 2

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Stop(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    tally = Tally()
    subscriber = _subscriber(args, tally)  # a relay that is not there at the start is an error, not a wait
    try:
        writer = CaptureWriter(args.file, rotate_bytes=args.rotate, fsync=args.fsync)
    except OSError as exc:
        subscriber.close()
        print(f"jitrelay record: cannot write a capture at {args.file}: {exc}", file=sys.stderr)
        return 1
    code = 0
    try:
        log.info("recording the %s relay at %s into %s", args.domain, subscriber.socket_path, writer.path)
        code = _record(subscriber, args, writer, tally)
    except (Stop, KeyboardInterrupt):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(Exception):
            writer.sync()
        writer.close()
    tally.flush()
    log.info(
        "recorded %d messages (%d bytes) in %d batches into %d segments ending %s; %s",
        writer.messages,
        writer.bytes_written,
        writer.batches,
        writer.segments,
        writer.path,
        tally.summary(),
    )
    return code


def _record(subscriber: Subscriber, args: argparse.Namespace, writer: CaptureWriter, tally: Tally) -> int:
    """Drain the subscriber into the capture until a limit is reached (0) or the relay is gone for good (1)."""
    limits = Limits(time.monotonic() + args.duration if args.duration else None, args.count or None)
    with subscriber:
        return 0 if _drain(subscriber, writer, tally, limits) else 1


@dataclass
class Limits:
    """When recording stops: a monotonic deadline, and how many messages are still wanted (None: no limit)."""

    deadline: float | None
    left: int | None

    def timeout(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


def _drain(subscriber: Subscriber, writer: CaptureWriter, tally: Tally, limits: Limits) -> bool:
    """Append each batch with its receive time: True once a limit is reached, False when the connection ends."""
    seen = 0  # of this subscriber's gaps
    while not limits.expired():
        try:
            batch = subscriber.recv_batch(limits.timeout())  # reconnects by itself, resuming where it stood
        except (EOFError, RelayConnectionError) as exc:
            log.error("giving up: %s", exc)
            return False
        received_ns = time.time_ns()
        for gap in subscriber.gaps[seen:]:
            tally.gap(gap)
        seen = len(subscriber.gaps)
        if batch is None:
            continue
        count = kernels.frame(batch)[0]
        if limits.left is not None and count >= limits.left:
            batch, count = batch[: _end_of(batch, limits.left)], limits.left
        writer.append(batch, received_ns, count)
        if limits.left is not None:
            limits.left -= count
            if not limits.left:
                return True
    return True


def _reconnect(args: argparse.Namespace, tally: Tally) -> Reconnect:
    """The client's reconnect policy, with this command's log lines, tally and ``--give-up``."""

    def lost(error: RelayConnectionError) -> None:
        log.info("reconnecting to the %s relay (%s)", args.domain, error)

    def back(tries: int) -> None:
        tally.reconnects += 1
        log.info("reconnected to the %s relay after %d tries", args.domain, tries)

    return Reconnect(attempts=None, give_up_after=args.give_up or None, on_disconnected=lost, on_reconnected=back)


def _subscriber(args: argparse.Namespace, tally: Tally) -> Subscriber:
    """A subscriber with positions: after a relay restart it resumes where it stood, or is told it cannot."""
    return Subscriber(
        args.domain,
        args.socket,
        tlv_types=args.types,
        sources=args.sources,
        positions=True,
        reconnect=_reconnect(args, tally),
    )


def _end_of(batch: np.ndarray, messages: int) -> int:
    """The byte length of the first ``messages`` messages of ``batch``."""
    starts = message_offsets(batch)
    return int(starts[messages]) if messages < len(starts) else len(batch)
