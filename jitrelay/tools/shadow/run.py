"""The I/O of ``jitrelay shadow``: read the source relay, republish into the local relay, read that back.

Three connections: a reader of the source relay (which sends it everything
it gets, in raw chunks), a ``Publisher`` into the local jitrelay relay, and
a ``Subscriber`` of that relay, on a thread of its own: jitrelay never
sends a message back to the connection it came from, so what it forwards is
seen on a second connection, and reading that one while the main thread
publishes keeps the relay from ever waiting on the shadow (or cutting it
off). The subscriber connects first, so that it is in the relay's fan-out
before the first message is republished.

The main thread reads the source into a ``SourceStream``, which frames and
judges it with the local relay's rules; every whole message is republished
byte for byte, rejects included, so the local relay's own counts can be
compared honestly; the bytes it should forward are handed to the
``StreamComparison`` before they are published, so the relay can never be
ahead of it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from jitrelay import kernels
from jitrelay.client import Publisher, RelayConnectionError, Subscriber
from jitrelay.core import protocol
from jitrelay.core.config import ConfigError, build_logic, read_config
from jitrelay.core.domains import RelayLogic
from jitrelay.tools.shadow.report import ShadowReport, StreamComparison, Tally, format_report
from jitrelay.tools.shadow.stream import SourceStream
from jitrelay.tools.usage import UsageError

POLL_SECONDS = 0.2  # how often the loops look at the clock and the stop flag
DRAIN_IDLE_SECONDS = 2.0  # at the end, how long the local relay may forward nothing before it is given up on
DRAIN_MAX_SECONDS = 30.0


def shadow_logic(args: argparse.Namespace) -> RelayLogic:
    """The local relay's rules: the domain's, with ``--config FILE`` and ``--max-payload`` as the relay has them."""
    overrides: dict[str, object] = {}
    if args.max_payload is not None:
        overrides["max_payload"] = args.max_payload
    try:
        from_file = read_config(args.config, args.domain) if args.config is not None else {}
        return build_logic(args.domain, from_file, overrides, source=None if args.config is None else str(args.config))
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc


class LocalReader:
    """The local relay's stream, read on a thread into the comparison until ``stop`` or the relay closes it."""

    def __init__(self, subscriber: Subscriber, comparison: StreamComparison, lock: threading.Lock) -> None:
        self.subscriber = subscriber
        self.comparison = comparison
        self.lock = lock
        self.error: str | None = None
        self.last_received = time.monotonic()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jitrelay-shadow-local", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                batch = self.subscriber.recv_batch(POLL_SECONDS)
                if batch is None:
                    continue
                with self.lock:
                    self.comparison.received(batch)
                self.last_received = time.monotonic()
        except EOFError:
            self.error = "the local relay closed the subscriber's connection"
        except (RelayConnectionError, protocol.ProtocolError) as exc:
            self.error = f"the subscriber's connection failed: {exc}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5.0)


class Shadow:
    """One run: the connections, the figures, and why it stopped."""

    def __init__(self, args: argparse.Namespace, logic: RelayLogic) -> None:
        self.domain = args.domain
        self.source_path = Path(args.source)
        self.local_path = Path(args.socket) if args.socket is not None else logic.socket_path
        self.report_every = args.report_every
        self.duration = args.duration
        self.stream = SourceStream(kernels.tables_for(logic), logic.buffer_size)
        self.tally = Tally()
        self.comparison = StreamComparison()
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.ended: str | None = None
        self.source_fault: dict[str, object] | None = None
        self.local_error: str | None = None
        self.stop_signal = threading.Event()

    def report(self, final: bool = False) -> ShadowReport:
        return ShadowReport(
            self.domain,
            str(self.source_path),
            str(self.local_path),
            time.monotonic() - self.started,
            self.tally,
            self.comparison,
            final=final,
            ended=self.ended,
            source_fault=self.source_fault,
            local_error=self.local_error,
            source_unfinished_bytes=self.stream.buffered if final else 0,
        )

    def run(self, source: socket.socket, publisher: Publisher, local: LocalReader) -> None:
        """Read, judge and republish until the duration, a signal, the source's end, or a failure."""
        poller = select.poll()
        poller.register(source, select.POLLIN)
        deadline = self.started + self.duration if self.duration else None
        next_report = self.started + self.report_every if self.report_every else None
        while self.ended is None:
            now = time.monotonic()
            if self.stop_signal.is_set():
                self.ended = "signal"
            elif deadline is not None and now >= deadline:
                self.ended = "duration"
            elif local.error is not None:
                self.ended, self.local_error = "local relay", local.error
            if self.ended is not None:
                break
            if next_report is not None and now >= next_report:
                self._live_report()
                next_report = now + self.report_every
            if not poller.poll(POLL_SECONDS * 1000):
                continue
            try:
                received = source.recv_into(self.stream.space())
            except InterruptedError:
                continue
            except OSError as exc:
                self.ended = f"source connection failed ({exc.strerror or exc})"
                break
            if received == 0:
                self.ended = "source closed"
                break
            self.stream.commit(received)
            self._judge_and_republish(publisher)

    def _judge_and_republish(self, publisher: Publisher) -> None:
        offset = self.stream.judged_bytes
        judged = self.stream.judge()
        if judged is None:
            return
        first = self.tally.messages
        with self.lock:
            self.tally.add_source(judged.batch, judged.starts, judged.verdicts)
            if judged.forwarded:
                self.comparison.expect(judged.forwarded, judged.forwarded_count)
        if len(judged.batch):
            try:
                publisher.publish_batch(judged.batch)
            except RelayConnectionError as exc:
                self.ended, self.local_error = "local relay", f"the relay stopped taking messages: {exc}"
                return
        if judged.fault != protocol.NO_FAULT:
            at = offset + len(judged.batch)
            self.source_fault = {
                "reason": protocol.FAULT_NAMES[judged.fault],
                "message_index": first + len(judged.starts),
                "stream_offset": at,
                "head_hex": self.stream.unjudged(protocol.HEADER_SIZE).hex(),
            }
            self.ended = "source fault"
            print(
                f"jitrelay shadow: the source stream is broken: {protocol.FAULT_NAMES[judged.fault]} at byte {at} "
                f"(message #{first + len(judged.starts)}); nothing after it can be framed, so the source side stops",
                file=sys.stderr,
                flush=True,
            )

    def _live_report(self) -> None:
        with self.lock:
            text = format_report(self.report())
        sys.stderr.write(text)
        sys.stderr.flush()

    def drain(self, local: LocalReader) -> None:
        """Wait for the local relay to forward what it was given, while it makes progress."""
        started = time.monotonic()
        while local.running and time.monotonic() - started < DRAIN_MAX_SECONDS:
            with self.lock:
                if self.comparison.behind == 0 or self.comparison.diverged_at is not None:
                    return
            if time.monotonic() - local.last_received > DRAIN_IDLE_SECONDS:
                return
            time.sleep(0.02)


def connect_source(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def write_json(path: Path, report: ShadowReport) -> None:
    """The report as one JSON object, replacing ``path`` atomically."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(report.dumps())
    os.replace(temporary, path)


def run_shadow(args: argparse.Namespace) -> int:
    """``jitrelay shadow``: 0 when the streams are identical, 1 when not (or a side failed), 2 for a bad command."""
    if args.report_every < 0 or args.duration < 0:
        raise UsageError("--report-every and --duration must not be negative")
    logic = shadow_logic(args)
    shadow = Shadow(args, logic)
    previous = {
        signum: signal.signal(signum, lambda *_: shadow.stop_signal.set()) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        with Subscriber(args.domain, shadow.local_path, reconnect=False) as subscriber:  # its own relay: a loss ends it
            local = LocalReader(subscriber, shadow.comparison, shadow.lock)
            try:
                with Publisher(args.domain, shadow.local_path, reconnect=False) as publisher:
                    try:
                        source = connect_source(shadow.source_path)
                    except OSError as exc:
                        print(
                            f"jitrelay shadow: cannot connect to the source relay at {shadow.source_path} "
                            f"({exc.strerror or exc})",
                            file=sys.stderr,
                        )
                        return 1
                    print(
                        f"jitrelay shadow {args.domain}: reading the source relay at {shadow.source_path}, "
                        f"republishing into the local relay at {shadow.local_path}",
                        file=sys.stderr,
                        flush=True,
                    )
                    with source:
                        shadow.run(source, publisher, local)
                    with contextlib.suppress(RelayConnectionError):
                        publisher.flush()
                shadow.drain(local)
            finally:
                local.stop()
            if shadow.local_error is None and local.error is not None and shadow.comparison.behind:
                shadow.local_error = local.error
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    with shadow.lock:
        shadow.comparison.finish()
        report = shadow.report(final=True)
    sys.stdout.write(format_report(report))
    sys.stdout.flush()
    if args.json is not None:
        write_json(args.json, report)
    return 0 if report.clean else 1
