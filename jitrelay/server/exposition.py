"""Prometheus helpers the relay's and the bridge's metrics share: families labelled by domain, a loop snapshot, HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from jitrelay.core.histogram import bucket_floor

log = logging.getLogger("jitrelay.metrics")

T = TypeVar("T")
SNAPSHOT_TIMEOUT = 5.0  # how long a scrape waits for the event loop


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


def labelled(family: CounterMetricFamily, domain: str, values: dict[str, int]) -> Metric:
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


# A check served beside /metrics (``/healthz``, ``/readyz``): whether all is well, and a line saying why.
Check = Callable[[], tuple[bool, str]]


class _QuietHandler(WSGIRequestHandler):
    """No line per request on stderr: probes come every few seconds."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class names it so
        pass


def _app(registry: CollectorRegistry, checks: Mapping[str, Check]) -> Callable[..., Iterable[bytes]]:
    """Prometheus's WSGI app, with each check answering 200 or 503 and its line of text at its own path."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        check = checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            return metrics(environ, start_response)
        ok, text = check()
        body = (text + "\n").encode()
        status = "200 OK" if ok else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def serve_http(
    registry: CollectorRegistry, port: int, checks: Mapping[str, Check] | None = None
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` on http://127.0.0.1:PORT/metrics (0 picks a port), and ``checks`` at their paths.

    The server answers on its own threads, whatever the event loop does; an
    OSError names the address.
    """
    try:
        server = make_server(
            "127.0.0.1", port, _app(registry, checks or {}), ThreadingWSGIServer, handler_class=_QuietHandler
        )
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on 127.0.0.1:{port}: {exc.strerror or exc}") from exc
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    log.info("metrics on http://127.0.0.1:%d/metrics", server.server_port)
    return server, thread
