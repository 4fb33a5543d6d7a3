"""The bridge's figures as Prometheus metrics, on ``--metrics-port``."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator
from typing import Any

from jitrelay.bridge.figures import BridgeFigures, StreamFigures


class _BridgeCollector:
    """The bridge's figures as Prometheus metric families, read on the event-loop thread at scrape time."""

    def __init__(self, domain: str, snapshot: Callable[[], BridgeFigures], loop: asyncio.AbstractEventLoop) -> None:
        self.domain = domain
        self.snapshot = snapshot
        self.loop = loop

    def collect(self) -> Iterator[object]:
        from prometheus_client.metrics_core import CounterMetricFamily

        from jitrelay.server.exposition import call_on_loop, domain_counter, domain_gauge

        f = call_on_loop(self.loop, self.snapshot)
        domain = self.domain
        counter = functools.partial(domain_counter, domain)
        gauge = functools.partial(domain_gauge, domain)

        def by_direction(name: str, doc: str, to_nats: float, from_nats: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["domain", "direction"])
            family.add_metric([domain, "to_nats"], to_nats)
            family.add_metric([domain, "from_nats"], from_nats)
            return family

        to, back = f.to_nats, f.from_nats
        yield by_direction("jitrelay_bridge_messages_total", "Protocol messages carried.", to.messages, back.messages)
        yield by_direction("jitrelay_bridge_bytes_total", "Bytes of protocol messages carried.", to.bytes, back.bytes)
        yield by_direction(
            "jitrelay_bridge_nats_messages_total", "NATS messages that carried them.", to.payloads, back.payloads
        )
        lost, missed = f.gap_to_nats, f.gap_from_nats
        yield by_direction(
            "jitrelay_bridge_gap_messages_total",
            "Protocol messages lost: not handed to NATS (to_nats), or missing from a remote bridge's stream.",
            lost.messages,
            missed.messages,
        )
        yield by_direction(
            "jitrelay_bridge_gap_bytes_total", "Bytes of the messages counted as lost.", lost.bytes, missed.bytes
        )
        yield by_direction("jitrelay_bridge_gaps_total", "Separate gaps.", lost.events, missed.events)
        yield counter(
            "jitrelay_bridge_refused_total",
            "NATS messages not written to the relay: not whole messages, oversize, or holding control messages.",
            f.refused_payloads,
        )
        yield counter("jitrelay_bridge_reconnects_total", "Reconnections to NATS.", f.reconnects)
        yield counter(
            "jitrelay_bridge_disconnected_seconds_total", "Time spent reconnecting to NATS.", f.disconnected_seconds
        )
        yield counter(
            "jitrelay_bridge_client_drops_total",
            "NATS messages the NATS client dropped because the relay was behind (their messages are a gap from NATS).",
            f.client_drops,
        )

        yield gauge("jitrelay_bridge_connected", "1 while connected to NATS.", 1.0 if f.connected else 0.0)
        yield gauge("jitrelay_bridge_nats_pending_bytes", "Bytes the NATS client holds for the relay.", f.pending_bytes)
        if f.stream is not None:
            yield from _stream_families(f.stream, counter, gauge)


def _stream_families(s: StreamFigures, counter: Callable, gauge: Callable) -> Iterator[object]:
    """The JetStream side's figures: publishes awaiting acknowledgement, the consumer's lag, the stream's size."""
    yield gauge("jitrelay_bridge_js_publishes_in_flight", "Publishes awaiting acknowledgement.", s.in_flight)
    yield counter("jitrelay_bridge_js_republished_total", "NATS messages published again, in order.", s.republished)
    yield counter("jitrelay_bridge_js_duplicates_total", "Publishes the stream had already stored.", s.duplicates)
    yield counter("jitrelay_bridge_js_stream_full_total", "Publishes the stream refused as full.", s.stream_full)
    yield gauge(
        "jitrelay_bridge_js_consumer_pending", "Stream messages not given to this host yet.", s.consumer_pending
    )
    yield gauge("jitrelay_bridge_js_consumer_ack_pending", "Delivered, not acknowledged yet.", s.consumer_ack_pending)
    yield counter(
        "jitrelay_bridge_js_redelivered_total", "NATS messages given again and not written again.", s.redelivered
    )
    yield gauge("jitrelay_bridge_js_held", "NATS messages waiting for the one they follow.", s.held)
    yield counter("jitrelay_bridge_js_echoes_total", "Journal messages not sent: this bridge wrote them.", s.echoes)
    yield gauge("jitrelay_bridge_js_stream_messages", "Messages the stream holds.", s.stream_messages)
    yield gauge("jitrelay_bridge_js_stream_bytes", "Bytes the stream holds.", s.stream_bytes)


def serve_metrics(
    domain: str, snapshot: Callable[[], BridgeFigures], loop: asyncio.AbstractEventLoop, port: int
) -> Any:
    """Serve the bridge's figures on http://127.0.0.1:PORT/metrics (port 0 picks one); the server.

    ``snapshot`` is called on ``loop`` at each scrape. Raises OSError when the port cannot be bound.
    """
    from prometheus_client import CollectorRegistry, ProcessCollector

    from jitrelay.server.exposition import serve_http

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_BridgeCollector(domain, snapshot, loop))  # type: ignore[arg-type]
    ProcessCollector(registry=registry)
    server, _ = serve_http(registry, port)
    return server
