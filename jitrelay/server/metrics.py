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
import contextlib
import functools
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar, cast
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from jitrelay.core import protocol
from jitrelay.core.domains import RelayLogic, stats_socket_path
from jitrelay.server.exposition import (
    call_on_loop,
    cumulative_buckets,
    domain_counter,
    domain_gauge,
    labelled,
    serve_http,
)
from jitrelay.server.figures import Figures
from jitrelay.server.health import Health
from jitrelay.server.sockets import RelayAlreadyRunning, bind_socket

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


def metric_families(figures: Figures) -> Iterator[Metric]:
    """The Prometheus metric families of one reading, every one labelled with the domain."""
    yield from _traffic_families(figures)
    yield from _connection_families(figures)
    yield from _log_families(figures)
    yield from _slow_families(figures)
    yield from _timing_families(figures)


def _traffic_families(figures: Figures) -> Iterator[Metric]:
    """Messages and bytes: received, forwarded, rejected by reason, control."""
    verdicts = figures.verdicts
    counter = functools.partial(domain_counter, figures.domain)
    yield counter("jitrelay_messages_received_total", "Complete messages read and judged.", sum(verdicts.values()))
    yield counter(
        "jitrelay_messages_forwarded_total",
        "Messages accepted and forwarded (each counted once, whatever the number of subscribers).",
        verdicts.get("forward", 0),
    )
    rejected = CounterMetricFamily(
        "jitrelay_messages_rejected_total", "Messages dropped, by reason.", labels=["domain", "reason"]
    )
    yield labelled(rejected, figures.domain, {r: verdicts.get(r, 0) for r in protocol.REJECT_NAMES})
    if "control" in verdicts:
        yield counter(
            "jitrelay_control_messages_total",
            "Control messages (domain 255) the relay acted on instead of forwarding.",
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
    yield counter(
        "jitrelay_subscription_changes_total",
        "Subscription control messages applied.",
        verdicts.get("control", 0),  # every control message the relay judged well formed is applied
    )


def _connection_families(figures: Figures) -> Iterator[Metric]:
    """Connections: open, accepted, refused and faulted by reason; subscription groups."""
    counter = functools.partial(domain_counter, figures.domain)
    gauge = functools.partial(domain_gauge, figures.domain)
    faults = CounterMetricFamily(
        "jitrelay_connection_faults_total",
        "Connections closed for a stream-fatal fault, by reason.",
        labels=["domain", "reason"],
    )
    fault_names = {name: figures.faults.get(name, 0) for name in protocol.FAULT_NAMES[1:]}
    yield labelled(faults, figures.domain, {**fault_names, **figures.faults})
    yield gauge("jitrelay_connections_open", "Connections open now.", figures.connections_open)
    yield counter("jitrelay_connections_accepted_total", "Connections accepted.", figures.connections_accepted)
    refused = CounterMetricFamily(
        "jitrelay_connections_refused_total",
        "Connections refused at accept, by reason.",
        labels=["domain", "reason"],
    )
    refusals = {name: figures.refused.get(name, 0) for name in REFUSAL_REASONS}
    yield labelled(refused, figures.domain, {**refusals, **figures.refused})
    yield gauge(
        "jitrelay_subscriber_groups",
        "Distinct subscription filters in force now (connections with the same filter share one).",
        figures.subscriber_groups,
    )
    yield counter("jitrelay_journal_errors_total", "Journal appends or fsyncs that failed.", figures.journal_errors)


def _log_families(figures: Figures) -> Iterator[Metric]:
    """The log and the cursors in it: size, use, head, who is behind and by how much."""
    counter = functools.partial(domain_counter, figures.domain)
    gauge = functools.partial(domain_gauge, figures.domain)
    yield gauge(
        "jitrelay_subscriber_pending_bytes_max",
        "The most bytes any one subscriber is behind the head of the log now.",
        figures.pending_max,
    )
    yield gauge("jitrelay_log_size_bytes", "Size of the relay's log.", figures.log_size)
    yield gauge("jitrelay_log_used_bytes", "Bytes the log retains now, oldest batch to head.", figures.log_used)
    yield counter(
        "jitrelay_log_head_bytes", "Stream offset of the log's head: bytes appended since start.", figures.log_head
    )
    yield gauge(
        "jitrelay_subscribers_behind", "Subscribers not at the head of the log now.", figures.subscribers_behind
    )
    yield gauge(
        "jitrelay_shared_memory_readers",
        "Subscribers reading the relay's log from shared memory.",
        figures.shared_readers,
    )
    yield counter(
        "jitrelay_subscribers_fell_behind_total",
        "Times a subscriber's socket took less than a batch, so that it caught up on its own.",
        figures.fell_behind,
    )
    yield counter(
        "jitrelay_reads_polled_total",
        "Reads the relay made from its own epoll set and forwarded in one compiled call.",
        figures.reads_polled,
    )
    for name, index, doc in (
        ("jitrelay_subscriber_lag_bytes", 1, "Bytes a subscriber that is behind has yet to catch up, by peer."),
        ("jitrelay_subscriber_lag_messages", 2, "Messages a subscriber that is behind has yet to catch up, by peer."),
    ):
        lag = GaugeMetricFamily(name, doc, labels=["domain", "peer"])
        for entry in figures.lags:
            lag.add_metric([figures.domain, str(entry[0])], float(entry[index]))
        yield lag


def _slow_families(figures: Figures) -> Iterator[Metric]:
    """What the slow-subscriber policy did, and what publishers that never read were not sent."""
    counter = functools.partial(domain_counter, figures.domain)
    gauge = functools.partial(domain_gauge, figures.domain)
    slow = CounterMetricFamily(
        "jitrelay_slow_subscriber_actions_total",
        "Slow-subscriber actions: hold (under block, a publisher waited for the slowest cursor to make room "
        "in the log), disconnect (a subscriber was cut off: it fell out of the log, or stayed past its limit), "
        "gap_notice (a subscriber that asked for positions was told what it missed instead).",
        labels=["domain", "action"],
    )
    yield labelled(slow, figures.domain, figures.slow_actions)
    yield counter(
        "jitrelay_never_reading_publishers_total",
        "Publishers found never to read their socket: detached from the log (never cut off, never holding anyone).",
        figures.never_reading,
    )
    yield gauge(
        "jitrelay_never_reading_publishers",
        "Publishers that never read their socket, connected now.",
        figures.never_reading_open,
    )
    yield counter(
        "jitrelay_never_reading_unsent_messages_total",
        "Messages publishers that never read would have been sent (others' messages) and were not.",
        figures.unread_messages,
    )
    yield counter(
        "jitrelay_never_reading_unsent_bytes_total",
        "Bytes of the messages publishers that never read would have been sent and were not.",
        figures.unread_bytes,
    )


def _timing_families(figures: Figures) -> Iterator[Metric]:
    """Forwarding time per batch as histograms: the whole, the relay's own part, the send loop's part."""
    domain = [figures.domain]
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
    for name, doc, buckets, total in (
        (
            "jitrelay_forwarding_own_seconds",
            "The relay's own part of a batch's forwarding time: from its bytes reaching the engine to the send loop.",
            figures.own_buckets,
            figures.own_total_ns,
        ),
        (
            "jitrelay_forwarding_send_seconds",
            "The part of a batch's forwarding time spent inside the send loop's system calls.",
            figures.send_buckets,
            figures.send_total_ns,
        ),
    ):
        if buckets:
            family = HistogramMetricFamily(name, doc, labels=["domain"])
            family.add_metric(domain, list(zip(les, cumulative_buckets(buckets, bounds_ns), strict=True)), total / 1e9)
            yield family


class RelayCollector(Collector):
    """Builds the relay's metric families at scrape time from a snapshot taken on the event loop."""

    def __init__(self, read: Callable[[], Figures | None], loop: asyncio.AbstractEventLoop) -> None:
        self.read = read
        self.loop = loop
        self._loop_thread = threading.get_ident()  # made on the loop's thread

    def snapshot(self) -> Figures | None:
        """The relay's figures, or None while it is still starting (before it has any)."""
        if threading.get_ident() == self._loop_thread:
            return self.read()
        return call_on_loop(self.loop, self.read)

    def collect(self) -> Iterator[Metric]:
        figures = self.snapshot()
        return iter(()) if figures is None else metric_families(figures)

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
        if not self.metrics.logic.admits(uid, gid):
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
    """The relay's registry, its control socket and, with ``logic.metrics_port`` set, its HTTP endpoint.

    It sees the relay only through ``read``, a snapshot of its figures taken on
    the event-loop thread, and through the relay's configuration.
    """

    def __init__(self, logic: RelayLogic, read: Callable[[], Figures | None], loop: asyncio.AbstractEventLoop) -> None:
        self.logic = logic
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RelayCollector(read, loop))
        ProcessCollector(registry=self.registry)
        self.stats_path = stats_socket_path(Path(logic.socket_path))
        self._stats_server: asyncio.AbstractServer | None = None
        self._stats_inode = 0
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self.http_port: int | None = None

    @classmethod
    async def start(
        cls, logic: RelayLogic, read: Callable[[], Figures | None], health: Health | None = None
    ) -> RelayMetrics:
        """Serve the HTTP endpoint (an OSError if it cannot) and the control socket (a warning if it cannot).

        The HTTP endpoint comes first, and with ``health`` it answers
        ``/healthz`` and ``/readyz`` too: started before the relay loads its
        kernels, it says "not ready" until every listener accepts.
        """
        loop = asyncio.get_running_loop()
        metrics = cls(logic, read, loop)
        port = logic.metrics_port
        if port is not None:
            checks = {} if health is None else {"/healthz": health.liveness, "/readyz": health.readiness}
            metrics._http = serve_http(metrics.registry, port, checks)
            metrics.http_port = metrics._http[0].server_port
        await metrics._serve_stats(loop)
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
