"""A running relay's figures in Prometheus text format: over HTTP when asked, and on a control socket always.

Nothing here touches the data path. The relay already keeps every figure as a
by-product of its batches (the kernel tallies verdicts per connection, the
engine adds up bytes and times each batch); a collector turns them into metric
families when someone scrapes. The HTTP server answers on its own threads, so
the collector takes its snapshot on the event-loop thread and waits for it:
the relay's dicts are never read while the loop changes them, and the figures
of one scrape are consistent with each other.

The control socket sits beside the relay socket (``stats_socket_path``) and
serves the same text to whoever connects, so ``jitrelay stats`` works without
a metrics port.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import protocol
from .engine import Relay, RelayAlreadyRunning, bind_socket
from .histogram import bucket_floor
from .stats import stats_socket_path

log = logging.getLogger("jitrelay.metrics")
T = TypeVar("T")

# Upper bounds of the exported forwarding-time buckets, in seconds.
FORWARDING_BUCKETS = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
SNAPSHOT_TIMEOUT = 5.0  # how long a scrape waits for the event loop
STATS_CLIENT_TIMEOUT = 5.0  # a control-socket reader that has not taken the text by then is dropped
REFUSAL_REASONS = ("not_allowed", "connection_limit")
_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Figures:
    """One consistent reading of a relay's counters, taken on its event-loop thread."""

    domain: str
    verdicts: dict[str, int]
    bytes_received: int
    bytes_forwarded: int
    faults: dict[str, int]
    connections_open: int
    connections_accepted: int
    refused: dict[str, int]
    pending_max: int
    slow_actions: dict[str, int]
    journal_errors: int
    forward_buckets: tuple[int, ...]  # the relay's log-linear histogram, nanoseconds
    forward_total_ns: int
    subscriber_groups: int = 0


def read_figures(relay: Relay) -> Figures:
    """Copy the relay's counters; call it on the relay's event-loop thread."""
    live = list(relay.connections.values())
    pending = [conn.transport.get_write_buffer_size() for conn in live if conn.transport is not None]
    timing = relay.forward_time
    return Figures(
        domain=relay.logic.name,
        verdicts=relay.verdict_counts(),
        bytes_received=relay.retired_bytes_in + sum(conn.bytes_in for conn in live),
        bytes_forwarded=relay.bytes_forwarded,
        faults=dict(relay.faults),
        connections_open=len(live),
        connections_accepted=relay.accepted,
        refused=dict(relay.refused),
        pending_max=max(pending, default=0),
        slow_actions={"pause": relay.slow_pauses, "disconnect": relay.slow_disconnects},
        journal_errors=relay.journal_errors,
        forward_buckets=tuple(timing.counts),
        forward_total_ns=timing.total,
        subscriber_groups=relay.subscriber_groups,
    )


def cumulative_buckets(counts: Sequence[int], bounds_ns: Sequence[int]) -> list[int]:
    """How many samples of a ``histogram.Histogram`` lie at or below each bound, then in all.

    A bucket of the relay's histogram counts under the first bound its whole
    range fits below, so a count at a bound never includes a sample above it;
    where a bound falls inside a bucket (at most 1/16 of the value wide) those
    samples count under the next bound.
    """
    per_bound = [0] * (len(bounds_ns) + 1)
    last = len(counts) - 1  # the last bucket also holds every larger sample
    for bucket, n in enumerate(counts):
        if not n:
            continue
        if bucket == last:
            per_bound[-1] += n
            continue
        ceiling = bucket_floor(bucket + 1) - 1
        index = next((i for i, bound in enumerate(bounds_ns) if ceiling <= bound), len(bounds_ns))
        per_bound[index] += n
    return list(itertools.accumulate(per_bound))


def _labelled(family: CounterMetricFamily, domain: str, values: dict[str, int]) -> Metric:
    for name, value in values.items():
        family.add_metric([domain, name], value)
    return family


def domain_counter(domain: str, name: str, doc: str, value: float) -> CounterMetricFamily:
    """A counter family with one sample, labelled with the domain."""
    family = CounterMetricFamily(name, doc, labels=["domain"])
    family.add_metric([domain], value)
    return family


def domain_gauge(domain: str, name: str, doc: str, value: float) -> GaugeMetricFamily:
    """A gauge family with one sample, labelled with the domain."""
    family = GaugeMetricFamily(name, doc, labels=["domain"])
    family.add_metric([domain], value)
    return family


def call_on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], T]) -> T:
    """``fn()`` run on ``loop``'s thread for a caller on another (an HTTP scrape), waited for up to SNAPSHOT_TIMEOUT."""

    async def call() -> T:
        return fn()

    future = asyncio.run_coroutine_threadsafe(call(), loop)
    try:
        return future.result(SNAPSHOT_TIMEOUT)
    except concurrent.futures.TimeoutError:  # the builtin TimeoutError only from Python 3.11
        future.cancel()
        raise


def serve_http(registry: CollectorRegistry, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` on http://127.0.0.1:PORT/metrics (0 picks a port); an OSError that names the address."""
    try:
        server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on 127.0.0.1:{port}: {exc.strerror or exc}") from exc
    log.info("metrics on http://127.0.0.1:%d/metrics", server.server_port)
    return server, thread


def metric_families(figures: Figures) -> Iterator[Metric]:
    """The Prometheus metric families of one reading, every one labelled with the domain."""
    domain = [figures.domain]
    verdicts = figures.verdicts
    counter = functools.partial(domain_counter, figures.domain)
    gauge = functools.partial(domain_gauge, figures.domain)

    yield counter("jitrelay_messages_received_total", "Complete messages read and judged.", sum(verdicts.values()))
    yield counter(
        "jitrelay_messages_forwarded_total",
        "Messages accepted and forwarded (each counted once, whatever the number of subscribers).",
        verdicts.get("forward", 0),
    )
    rejected = CounterMetricFamily(
        "jitrelay_messages_rejected_total", "Messages dropped, by reason.", labels=["domain", "reason"]
    )
    yield _labelled(rejected, figures.domain, {r: verdicts.get(r, 0) for r in protocol.REJECT_NAMES})
    if "control" in verdicts:
        yield counter(
            "jitrelay_control_messages_total",
            "Control messages (system domain) the relay acted on instead of forwarding.",
            verdicts["control"],
        )
    yield counter(
        "jitrelay_bytes_received_total",
        "Bytes read from connections, partial and rejected messages included.",
        figures.bytes_received,
    )
    yield counter(
        "jitrelay_bytes_forwarded_total",
        "Bytes of forwarded messages (each counted once, whatever the number of subscribers).",
        figures.bytes_forwarded,
    )
    faults = CounterMetricFamily(
        "jitrelay_connection_faults_total",
        "Connections closed for a stream-fatal fault, by reason.",
        labels=["domain", "reason"],
    )
    fault_names = {name: figures.faults.get(name, 0) for name in protocol.FAULT_NAMES[1:]}
    yield _labelled(faults, figures.domain, {**fault_names, **figures.faults})
    yield gauge("jitrelay_connections_open", "Connections open now.", figures.connections_open)
    yield counter("jitrelay_connections_accepted_total", "Connections accepted.", figures.connections_accepted)
    refused = CounterMetricFamily(
        "jitrelay_connections_refused_total",
        "Connections refused at accept, by reason.",
        labels=["domain", "reason"],
    )
    refusals = {name: figures.refused.get(name, 0) for name in REFUSAL_REASONS}
    yield _labelled(refused, figures.domain, {**refusals, **figures.refused})
    yield gauge(
        "jitrelay_subscriber_pending_bytes_max",
        "The most bytes waiting to be written to any one connection now.",
        figures.pending_max,
    )
    slow = CounterMetricFamily(
        "jitrelay_slow_subscriber_actions_total",
        "Slow-subscriber actions: pause (a subscriber passed its pending limit and publishers paused), "
        "disconnect (a subscriber was dropped for staying over it).",
        labels=["domain", "action"],
    )
    yield _labelled(slow, figures.domain, figures.slow_actions)
    yield counter("jitrelay_journal_errors_total", "Journal appends or fsyncs that failed.", figures.journal_errors)
    yield gauge(
        "jitrelay_subscriber_groups",
        "Distinct subscription filters in force now (connections with the same filter share one).",
        figures.subscriber_groups,
    )
    yield counter(
        "jitrelay_subscription_changes_total",
        "Subscription control messages applied.",
        verdicts.get("control", 0),  # every control message the relay judged well formed is applied
    )
    timing = HistogramMetricFamily(
        "jitrelay_forwarding_seconds",
        "Time per batch from its bytes reaching the engine to the last subscriber write issued.",
        labels=["domain"],
    )
    bounds_ns = [round(bound * 1e9) for bound in FORWARDING_BUCKETS]
    cumulative = cumulative_buckets(figures.forward_buckets, bounds_ns)
    les = [floatToGoString(bound) for bound in FORWARDING_BUCKETS] + ["+Inf"]
    timing.add_metric(domain, list(zip(les, cumulative, strict=True)), figures.forward_total_ns / 1e9)
    yield timing


class RelayCollector(Collector):
    """Builds the relay's metric families at scrape time from a snapshot taken on the event loop."""

    def __init__(self, relay: Relay, loop: asyncio.AbstractEventLoop) -> None:
        self.relay = relay
        self.loop = loop
        self._loop_thread = threading.get_ident()  # made on the loop's thread

    def snapshot(self) -> Figures:
        if threading.get_ident() == self._loop_thread:
            return read_figures(self.relay)
        return call_on_loop(self.loop, lambda: read_figures(self.relay))

    def collect(self) -> Iterator[Metric]:
        return metric_families(self.snapshot())

    def describe(self) -> Iterator[Metric]:
        return iter(())  # registering must not take a snapshot


class _StatsConnection(asyncio.Protocol):
    """Write the exposition text to whoever connects to the control socket, then close.

    The text is made on a worker thread, like an HTTP scrape, so the event
    loop only takes the snapshot.
    """

    def __init__(self, metrics: RelayMetrics) -> None:
        self.metrics = metrics
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass asyncio's
        uid = gid = -1
        with contextlib.suppress(OSError, AttributeError):
            sock = transport.get_extra_info("socket")
            _, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if not self.metrics.relay.logic.admits(uid, gid):
            log.warning("refusing stats reader uid=%d gid=%d: not allowed", uid, gid)
            transport.abort()
            return
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(STATS_CLIENT_TIMEOUT, transport.abort)
        loop.run_in_executor(None, generate_latest, self.metrics.registry).add_done_callback(self._send)

    def _send(self, text: asyncio.Future[bytes]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if text.cancelled() or text.exception() is not None:
            log.warning("stats reader dropped: %s", "cancelled" if text.cancelled() else text.exception())
            transport.abort()
            return
        transport.write(text.result())
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass  # the control socket takes no requests

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


class RelayMetrics:
    """The relay's registry, its control socket and, with ``logic.metrics_port`` set, its HTTP endpoint."""

    def __init__(self, relay: Relay, loop: asyncio.AbstractEventLoop) -> None:
        self.relay = relay
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RelayCollector(relay, loop))
        ProcessCollector(registry=self.registry)
        self.stats_path = stats_socket_path(Path(relay.logic.socket_path))
        self._stats_server: asyncio.AbstractServer | None = None
        self._stats_inode = 0
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self.http_port: int | None = None

    @classmethod
    async def start(cls, relay: Relay) -> RelayMetrics:
        """Serve the control socket (a warning if it cannot be made) and the HTTP endpoint (an OSError if not)."""
        loop = asyncio.get_running_loop()
        metrics = cls(relay, loop)
        await metrics._serve_stats(loop)
        port = relay.logic.metrics_port
        if port is not None:
            try:
                metrics._http = serve_http(metrics.registry, port)
            except OSError:
                await metrics.close()
                raise
            metrics.http_port = metrics._http[0].server_port
        return metrics

    async def _serve_stats(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            sock = bind_socket(self.stats_path)
        except (OSError, RelayAlreadyRunning) as exc:
            log.warning("no stats socket: %s", exc)
            return
        self._stats_inode = os.stat(self.stats_path).st_ino
        self._stats_server = await loop.create_unix_server(lambda: _StatsConnection(self), sock=sock)
        log.info("stats on %s", self.stats_path)

    async def close(self) -> None:
        """Stop serving; remove the control socket if it is still ours."""
        if self._http is not None:
            server, thread = self._http
            self._http = None
            await asyncio.get_running_loop().run_in_executor(None, server.shutdown)
            server.server_close()
            thread.join(1.0)
        if self._stats_server is not None:
            self._stats_server.close()
            self._stats_server = None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.stats_path).st_ino == self._stats_inode:
                    self.stats_path.unlink()
