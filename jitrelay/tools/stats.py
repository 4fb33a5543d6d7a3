"""``jitrelay stats``: a running relay's or bridge's figures as a table, once or refreshed with per-second rates.

The relay serves its figures in Prometheus text format on a control socket
beside its own socket (and over HTTP when run with ``--metrics-port``); a
``jitrelay bridge`` serves its own over HTTP only. This module reads that
text, from either place, tells a bridge's from a relay's by its
``jitrelay_bridge_`` families, and lays it out for a person.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

from jitrelay.core.domains import logic_for, stats_socket_path
from jitrelay.tools.options import add_target, non_negative, non_negative_float
from jitrelay.tools.usage import UsageError

BRIDGE_PREFIX = "jitrelay_bridge_"
READ_TIMEOUT = 5.0
INTERVAL = 1.0  # seconds between --watch tables
CLEAR_SCREEN = "\x1b[H\x1b[2J"

Labels = tuple[tuple[str, str], ...]


class StatsUnavailable(Exception):
    """The figures cannot be read: no relay, a refused reader, or not a jitrelay endpoint."""


def read_socket(path: Path, timeout: float = READ_TIMEOUT) -> str:
    """The exposition text the relay writes to a connection on its control socket."""
    chunks = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def metrics_url(url: str) -> str:
    """``127.0.0.1:9108`` -> ``http://127.0.0.1:9108/metrics``; a full URL stays as it is."""
    if "://" not in url:
        url = "http://" + url
    scheme, _, rest = url.partition("://")
    if "/" not in rest:
        url = f"{scheme}://{rest}/metrics"
    return url


def read_url(url: str, timeout: float = READ_TIMEOUT) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


@dataclass(frozen=True)
class Reading:
    """One domain's samples from one scrape, and when it was taken (monotonic seconds)."""

    domain: str
    taken: float
    samples: dict[tuple[str, Labels], float]

    @property
    def kind(self) -> str:
        """``bridge`` when the figures are a ``jitrelay bridge``'s, else ``relay``."""
        return "bridge" if any(name.startswith(BRIDGE_PREFIX) for name, _ in self.samples) else "relay"

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def label_values(self, name: str, key: str) -> list[str]:
        """The values label ``key`` takes on sample ``name``, in the order they were served."""
        found = []
        for sample, labels in self.samples:
            value = dict(labels).get(key)
            if sample == name and value is not None and value not in found:
                found.append(value)
        return found


def parse_reading(text: str, domain: str, taken: float) -> Reading:
    """The samples of ``domain`` (and of the process) in exposition ``text``."""
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if sample.name.startswith("jitrelay_") and labels.pop("domain", None) != domain:
                continue
            samples[sample.name, tuple(sorted(labels.items()))] = sample.value
    if not any(name.startswith("jitrelay_") for name, _ in samples):
        raise StatsUnavailable(f"no jitrelay figures for the {domain} domain there")
    return Reading(domain, taken, samples)


@dataclass(frozen=True)
class Row:
    """One line of the table: what it shows, and whether it counts up (and so has a rate)."""

    title: str
    name: str
    labels: Labels = ()
    counter: bool = True


def table_rows(reading: Reading) -> list[Row]:
    if reading.kind == "bridge":
        return bridge_rows(reading)

    def each(title: str, name: str, key: str, counter: bool = True) -> list[Row]:
        return [Row(f"{title} {v}", name, ((key, v),), counter) for v in reading.label_values(name, key)]

    rows = [
        Row("messages received", "jitrelay_messages_received_total"),
        Row("messages forwarded", "jitrelay_messages_forwarded_total"),
        *each("messages rejected", "jitrelay_messages_rejected_total", "reason"),
    ]
    if ("jitrelay_control_messages_total", ()) in reading.samples:
        rows.append(Row("control messages", "jitrelay_control_messages_total"))
    rows += [
        Row("bytes received", "jitrelay_bytes_received_total"),
        Row("bytes forwarded", "jitrelay_bytes_forwarded_total"),
        Row("batches forwarded", "jitrelay_forwarding_seconds_count"),
        *each("connection faults", "jitrelay_connection_faults_total", "reason"),
        Row("connections open", "jitrelay_connections_open", counter=False),
        Row("connections accepted", "jitrelay_connections_accepted_total"),
        *each("connections refused", "jitrelay_connections_refused_total", "reason"),
        Row("subscriber pending bytes max", "jitrelay_subscriber_pending_bytes_max", counter=False),
        *each("slow subscriber actions", "jitrelay_slow_subscriber_actions_total", "action"),
        Row("never-reading publishers", "jitrelay_never_reading_publishers_total"),
        Row("never-reading publishers connected", "jitrelay_never_reading_publishers", counter=False),
        Row("messages not sent to never-reading publishers", "jitrelay_never_reading_unsent_messages_total"),
        Row("bytes not sent to never-reading publishers", "jitrelay_never_reading_unsent_bytes_total"),
        Row("log used bytes", "jitrelay_log_used_bytes", counter=False),
        Row("log size bytes", "jitrelay_log_size_bytes", counter=False),
        Row("subscribers behind", "jitrelay_subscribers_behind", counter=False),
        Row("subscribers fell behind", "jitrelay_subscribers_fell_behind_total"),
        Row("shared-memory readers", "jitrelay_shared_memory_readers", counter=False),
        *each("lag bytes", "jitrelay_subscriber_lag_bytes", "peer", counter=False),
        *each("lag messages", "jitrelay_subscriber_lag_messages", "peer", counter=False),
        Row("journal errors", "jitrelay_journal_errors_total"),
    ]
    return rows + process_rows(reading)


def bridge_rows(reading: Reading) -> list[Row]:
    """A bridge's traffic and gaps, each way, then its NATS connection."""
    rows = []
    for way, label in (("to NATS", "to_nats"), ("from NATS", "from_nats")):
        direction = (("direction", label),)
        rows += [
            Row(f"messages {way}", "jitrelay_bridge_messages_total", direction),
            Row(f"bytes {way}", "jitrelay_bridge_bytes_total", direction),
            Row(
                f"NATS messages {'sent' if label == 'to_nats' else 'received'}",
                "jitrelay_bridge_nats_messages_total",
                direction,
            ),
            Row(f"gap {way} messages", "jitrelay_bridge_gap_messages_total", direction),
            Row(f"gap {way} bytes", "jitrelay_bridge_gap_bytes_total", direction),
            Row(f"gaps {way}", "jitrelay_bridge_gaps_total", direction),
        ]
    rows += [
        Row("NATS messages refused", "jitrelay_bridge_refused_total"),
        Row("NATS messages dropped by the client", "jitrelay_bridge_client_drops_total"),
        Row("NATS pending bytes", "jitrelay_bridge_nats_pending_bytes", counter=False),
        Row("reconnects", "jitrelay_bridge_reconnects_total"),
        Row("seconds disconnected", "jitrelay_bridge_disconnected_seconds_total"),
        Row("connected to NATS", "jitrelay_bridge_connected", counter=False),
    ]
    if ("jitrelay_bridge_js_publishes_in_flight", ()) in reading.samples:  # a bridge on JetStream
        rows += [
            Row("publishes awaiting ack", "jitrelay_bridge_js_publishes_in_flight", counter=False),
            Row("publishes sent again", "jitrelay_bridge_js_republished_total"),
            Row("duplicates dropped by the stream", "jitrelay_bridge_js_duplicates_total"),
            Row("publishes refused: stream full", "jitrelay_bridge_js_stream_full_total"),
            Row("consumer lag messages", "jitrelay_bridge_js_consumer_pending", counter=False),
            Row("consumer unacknowledged", "jitrelay_bridge_js_consumer_ack_pending", counter=False),
            Row("redelivered, not written again", "jitrelay_bridge_js_redelivered_total"),
            Row("held for the one before", "jitrelay_bridge_js_held", counter=False),
            Row("journal echoes skipped", "jitrelay_bridge_js_echoes_total"),
            Row("stream messages", "jitrelay_bridge_js_stream_messages", counter=False),
            Row("stream bytes", "jitrelay_bridge_js_stream_bytes", counter=False),
        ]
    return rows + process_rows(reading)


def process_rows(reading: Reading) -> list[Row]:
    rows = []
    if ("process_resident_memory_bytes", ()) in reading.samples:
        rows.append(Row("resident memory bytes", "process_resident_memory_bytes", counter=False))
    if ("process_cpu_seconds_total", ()) in reading.samples:
        rows.append(Row("cpu seconds", "process_cpu_seconds_total"))
    return rows


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.2f}"


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def forwarding_summary(reading: Reading) -> str:
    """Mean and percentiles (as the bucket bound they fall under) of the forwarding time per batch."""
    name = "jitrelay_forwarding_seconds"
    count = reading.value(f"{name}_count")
    if not count:
        return "forwarding time per batch: no batches yet"
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (sample, labels), value in reading.samples.items()
        if sample == f"{name}_bucket"
    )
    parts = [f"mean {_duration(reading.value(f'{name}_sum') / count)}"]
    for q in (50, 99, 99.9):
        bound = next((b for b, seen in buckets if seen >= count * q / 100), float("inf"))
        finite = [b for b, _ in buckets if b != float("inf")]
        shown = f"<= {_duration(bound)}" if bound != float("inf") else f"> {_duration(finite[-1])}" if finite else "?"
        parts.append(f"p{q:g} {shown}")
    return f"forwarding time per batch: {', '.join(parts)} over {_number(count)} batches"


def bridge_summary(reading: Reading) -> str:
    """Each way: the share of messages lost to gaps, and the mean size of the NATS messages that carried the rest."""
    parts = []
    for way, label in (("to NATS", "to_nats"), ("from NATS", "from_nats")):
        carried = reading.value("jitrelay_bridge_messages_total", direction=label)
        lost = reading.value("jitrelay_bridge_gap_messages_total", direction=label)
        payloads = reading.value("jitrelay_bridge_nats_messages_total", direction=label)
        size = reading.value("jitrelay_bridge_bytes_total", direction=label) / payloads if payloads else 0.0
        share = 100 * lost / (carried + lost) if carried + lost else 0.0
        parts.append(f"{way} {share:.2f}% of messages lost, {_number(round(size))} bytes per NATS message")
    return "; ".join(parts)


def format_table(reading: Reading, previous: Reading | None = None, source: str = "") -> str:
    """The figures as aligned columns; with an earlier reading, the change since it and the rate per second."""
    rows = table_rows(reading)
    elapsed = reading.taken - previous.taken if previous is not None else 0.0
    header = [""] + ["total"] + (["change", "per second"] if previous is not None else [])
    lines = [header]
    for row in rows:
        value = reading.samples.get((row.name, row.labels), 0.0)
        cells = [row.title, _number(value)]
        if previous is not None:
            if row.counter:
                change = value - previous.samples.get((row.name, row.labels), 0.0)
                rate = change / elapsed if elapsed > 0 else 0.0
                cells += [("+" if change >= 0 else "") + _number(change), f"{rate:,.1f}"]
            else:
                cells += ["", ""]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    kind = reading.kind
    title = f"jitrelay {reading.domain} {kind}" + (f" ({source})" if source else "")
    if previous is not None:
        title += f", over the last {elapsed:.2f} s"
    body = [
        "  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]).rstrip()
        for line in lines
    ]
    summary = bridge_summary(reading) if kind == "bridge" else forwarding_summary(reading)
    return "\n".join([title, *body, summary])


def watch(fetch: Callable[[], Reading], source: str, out: TextIO, *, interval: float, count: int, clear: bool) -> None:
    """Print a table every ``interval`` seconds with rates since the one before; stop after ``count`` (0: never)."""
    previous: Reading | None = None
    shown = 0
    due = time.monotonic()
    while True:
        reading = fetch()
        table = format_table(reading, previous, source)
        out.write((CLEAR_SCREEN if clear else "\n" if shown else "") + table + "\n")
        out.flush()
        shown += 1
        if count and shown >= count:
            return
        previous = reading
        due += interval
        time.sleep(max(0.0, due - time.monotonic()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``jitrelay stats`` command line, which ``run_stats`` reads."""
    add_target(parser)
    parser.add_argument(
        "--url",
        help="read this Prometheus endpoint instead of the stats socket: a relay's or a bridge's --metrics-port "
        "(a bridge's figures get the bridge's table)",
    )
    parser.add_argument("--watch", action="store_true", help="redraw every interval, with the rate of each counter")
    parser.add_argument(
        "--interval", type=non_negative_float, default=INTERVAL, help=f"seconds between --watch tables ({INTERVAL:g})"
    )
    parser.add_argument("--count", type=non_negative, default=0, help="with --watch, stop after N tables (0: never)")


def run_stats(args: argparse.Namespace) -> int:
    """``jitrelay stats``: 0 on success, 1 when no figures can be read."""
    if args.interval <= 0:
        raise UsageError("--interval must be positive")
    domain = args.domain
    if args.url:
        url = metrics_url(args.url)
        source = url

        def text() -> str:
            try:
                return read_url(url)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise StatsUnavailable(f"cannot read {url}: {reason}") from exc

    else:
        relay_socket = Path(args.socket) if args.socket is not None else Path(logic_for(domain).socket_path)
        path = stats_socket_path(relay_socket)
        source = str(path)

        def text() -> str:
            try:
                served = read_socket(path)
            except OSError as exc:
                raise StatsUnavailable(
                    f"no {domain} relay is running at {relay_socket} (cannot read {path}: {exc.strerror or exc})"
                ) from exc
            if not served:
                raise StatsUnavailable(f"the {domain} relay at {relay_socket} sent no figures (not an allowed user?)")
            return served

    def fetch() -> Reading:
        served = text()
        try:
            return parse_reading(served, domain, time.monotonic())
        except StatsUnavailable as exc:
            raise StatsUnavailable(f"{source}: {exc}") from None
        except ValueError as exc:
            raise StatsUnavailable(f"{source} did not serve Prometheus text: {exc}") from exc

    try:
        if args.watch:
            watch(fetch, source, sys.stdout, interval=args.interval, count=args.count, clear=sys.stdout.isatty())
        else:
            print(format_table(fetch(), source=source))
    except StatsUnavailable as exc:
        print(f"jitrelay stats: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
