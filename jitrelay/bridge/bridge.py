"""``jitrelay bridge``: one domain's relays on several hosts, joined through a NATS cluster.

The bridge is an ordinary client of the local relay and a client of NATS, and
nothing more. Every batch the relay forwards to it goes out on the subject
(``jitrelay.<domain>`` by default) as NATS messages that hold whole protocol
messages only, each no larger than the server's ``max_payload``; every NATS
message on the subject is written into the relay, which validates it again,
so an invalid message never crosses. There are no loops: the NATS connection
is made with ``no_echo``, and the relay never echoes a message to its sender.
Run one bridge per relay and host.

Core NATS delivers at most once, so the bridge accounts for what it cannot
deliver instead of hiding it, in messages and bytes:

- gap to NATS: messages the relay gave the bridge that it could not hand to
  the NATS client: while disconnected, once the reconnect buffer is full
  (publishes that fail), and any message larger than a NATS message can hold.
  Logged as a WARNING with its size when the gap closes (or every few seconds
  while it lasts).
- gap from NATS: every NATS message the bridge sends carries headers with the
  bridge's id, the index of its first protocol message and its byte offset in
  that bridge's outgoing stream. A receiving bridge that sees the index jump
  counts the messages and bytes it never got, whatever lost them: a node that
  died with them in flight, its own subscription being away while it
  reconnected, or the sender's own gap. Logged as a WARNING at once.

Both figures, with the traffic counts and reconnects, are served to Prometheus
with ``--metrics-port`` and logged on SIGUSR1 and at exit.

With ``--jetstream`` (the default for execution) the same batches go through
a replicated JetStream stream instead, without loss; ``jetstream/`` says how.

This module is the bridge's one lifecycle: connect to the relay, connect to
NATS, pump both ways, keep the figures, stop. What differs between core NATS
(``core_nats.py``) and JetStream (``jetstream/``) is the carrier, which the
options choose once, at start (``options.py``); ``figures.py`` counts,
``metrics.py`` serves the counts, ``relay.py`` is the side facing the relay.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import numpy as np

from jitrelay import kernels
from jitrelay.bridge.carrier import Carrier, SenderPosition
from jitrelay.bridge.core_nats import CoreCarrier
from jitrelay.bridge.figures import BridgeFigures, GapToNats
from jitrelay.bridge.jetstream.carrier import JetStreamCarrier
from jitrelay.bridge.metrics import serve_metrics
from jitrelay.bridge.options import BridgeOptions, CarrierKind
from jitrelay.bridge.relay import PayloadCheck, RelayLink
from jitrelay.core import protocol
from jitrelay.core.domains import logic_for
from jitrelay.core.units import MiB

log = logging.getLogger("jitrelay.bridge")

HEADER_ROOM = 256  # bytes of max_payload kept for the header block
NATS_READ_SIZE = 1 * MiB  # what nats-py reads from its socket at once; its own 32 KiB costs twice the CPU per byte
ERROR_LOG_INTERVAL = 5.0  # the same NATS client error is logged at most this often
STOP_FLUSH_SECONDS = 1.0
CARRIERS: dict[CarrierKind, type[CoreCarrier] | type[JetStreamCarrier]] = {
    CarrierKind.CORE: CoreCarrier,
    CarrierKind.JETSTREAM: JetStreamCarrier,
}
T = TypeVar("T")


class BridgeError(RuntimeError):
    """The bridge cannot start or cannot go on: no relay, the relay went away, or NATS closed for good."""


class Bridge:
    """Joins the local relay of one domain to NATS, both ways, over the carrier the options chose; ``run`` until
    told to stop."""

    def __init__(self, options: BridgeOptions) -> None:
        self.options = options
        self.domain = options.domain
        assert options.subject is not None
        self.subject: str = options.subject
        self.carrier: Carrier = CARRIERS[options.carrier](options)  # chosen here, once
        self.id = self.carrier.id
        self.figures = BridgeFigures(stream=self.carrier.stream_figures)
        self.position = SenderPosition()  # where this bridge's outgoing stream stands
        self.gaps = GapToNats(self.figures.gap_to_nats)
        self.check = PayloadCheck(self.domain, options.max_payload, self.subject, self.figures)
        self.nc: Any = None  # the nats.aio.client.Client, once connected
        self.nats_url = ""
        self.link: RelayLink | None = None
        self._outbox: collections.deque[np.ndarray] = collections.deque()
        self._outbox_bytes = 0
        self._outbox_ready = asyncio.Event()
        self._reading = True
        self._disconnected_at: float | None = None
        self._last_error: tuple[str, float] = ("", 0.0)
        self._stopping = False
        self.carrier.attach(self)

    # relay -> NATS

    def _from_relay(self, batch: np.ndarray) -> None:
        if not self.carrier.on_relay_batch(batch):
            self.queue_for_nats(batch)

    def queue_for_nats(self, batch: np.ndarray) -> None:
        """A batch of whole messages from the relay: queue it for NATS, and stop reading if too much waits."""
        self._outbox.append(batch)
        self._outbox_bytes += len(batch)
        self._outbox_ready.set()
        if self._outbox_bytes > self.carrier.outbox_high and self._reading and self.link is not None:
            self._reading = False
            assert self.link.transport is not None
            self.link.transport.pause_reading()

    async def _pump_to_nats(self) -> None:
        while True:
            while not self._outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
            batch = self._outbox.popleft()
            self._outbox_bytes -= len(batch)
            if self.carrier.coalesces and self._outbox:  # one publish for the batches waiting
                batch = self._coalesce(batch)
            if not self._reading and self._outbox_bytes < self.carrier.outbox_low and self.link is not None:
                self._reading = True
                assert self.link.transport is not None
                self.link.transport.resume_reading()
            await self.publish_batch(batch)

    def _coalesce(self, batch: np.ndarray) -> np.ndarray:
        """The batch with the ones queued behind it, up to what one NATS message holds.

        Every JetStream publish waits for the stream's replicas, and only so
        many may wait at once; small batches (a paced publisher) would queue
        behind the window, so those that wait travel together.
        """
        limit = self.nc.max_payload - HEADER_ROOM
        parts, size = [batch], len(batch)
        while self._outbox and size + len(self._outbox[0]) <= limit:
            parts.append(self._outbox.popleft())
            size += len(parts[-1])
            self._outbox_bytes -= len(parts[-1])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    async def publish_batch(self, batch: np.ndarray, journal_at: tuple[int, int] | None = None) -> None:
        """Publish whole messages as NATS messages of at most max_payload, each cut at a message boundary.

        ``journal_at`` is where the batch starts in the journal it was read
        from, if it was. What cannot go out is counted as a gap to NATS, never
        raised.
        """
        end = len(batch)
        if self.nc is None:
            self._drop(kernels.frame(batch)[0], end, "not connected to NATS yet")
            return
        view = batch.data
        pos = 0
        while pos < end:
            limit = self.nc.max_payload - HEADER_ROOM
            count, stop, _ = kernels.frame(batch, pos, min(end, pos + limit))
            if count == 0:  # one message larger than a NATS message can carry
                at = pos + protocol.OFF_PAYLOAD_SIZE
                size = protocol.HEADER_SIZE + int(batch[at : at + 4].view("<u4")[0])
                self._drop(1, size, f"a message of {size} bytes is larger than NATS max_payload {self.nc.max_payload}")
                self.gaps.close()  # not a state: report it at once
                pos += size
                continue
            journal_end = None if journal_at is None else (journal_at[0], journal_at[1] + stop)
            await self.carrier.send(view[pos:stop], count, journal_end)
            pos = stop

    def _drop(self, count: int, size: int, reason: str) -> None:
        self.gaps.count(count, size, reason)
        self.position.advance(count, size)

    # NATS connection events

    async def _on_disconnected(self) -> None:
        self.figures.connected = False
        if self._stopping:
            return
        self._disconnected_at = time.monotonic()
        log.warning(
            "disconnected from NATS at %s; reconnecting, buffering up to %d bytes meanwhile",
            self.nats_url,
            self.options.reconnect_buffer,
        )

    async def _on_reconnected(self) -> None:
        self.figures.connected = True
        self.figures.reconnects += 1
        outage = time.monotonic() - self._disconnected_at if self._disconnected_at is not None else 0.0
        self.figures.disconnected_seconds += outage
        self._disconnected_at = None
        self.nats_url = _url(self.nc)
        log.warning("reconnected to NATS at %s after %.3f s", self.nats_url, outage)

    async def _on_error(self, exc: Exception) -> None:
        from nats.errors import SlowConsumerError

        if isinstance(exc, SlowConsumerError):  # one NATS message dropped; its messages become a gap from NATS
            self.figures.client_drops += 1
            limit = self.options.nats_pending_limit
            text = f"the relay is behind and {limit} bytes wait for it; the NATS client drops NATS messages"
        else:
            text = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if text != self._last_error[0] or now - self._last_error[1] > ERROR_LOG_INTERVAL:
            self._last_error = (text, now)
            log.warning("NATS: %s", text)

    # running

    async def run(self, stop: asyncio.Event) -> None:
        """Connect to the relay and to NATS, bridge until ``stop`` is set; BridgeError if either goes away."""
        loop = asyncio.get_running_loop()
        self._warm_up()
        link = await self._connect_relay()
        # Core NATS: until NATS is reached, what the relay sends is a gap. JetStream: it waits in the outbox.
        pump = loop.create_task(self._pump_to_nats() if self.carrier.sends_before_connected else asyncio.sleep(0))
        tasks: list[asyncio.Task] = []
        closed: asyncio.Future[None] = loop.create_future()
        metrics = None
        try:
            self.nc = await _unless_stopped(stop, self._connect_nats(closed))
            if self.nc is None:
                return
            self.nats_url = _url(self.nc)
            self.figures.connected = True
            log.info("connected to NATS at %s (max_payload %d)", self.nats_url, self.nc.max_payload)
            where = await _unless_stopped(stop, self.carrier.start())
            if where is None:
                return
            if not self.carrier.sends_before_connected:
                pump = loop.create_task(self.carrier.pump() or self._pump_to_nats())
            tasks = [loop.create_task(work) for work in self.carrier.tasks()]
            await self.nc.flush()
            metrics = self._serve_metrics(loop)
            path = self.options.socket_path
            log.info("jitrelay bridge %s ready: relay %s <-> %s (bridge id %s)", self.domain, path, where, self.id)
            await self._until_stopped(stop, link, closed, pump, tasks)
        finally:
            await self._shut_down(pump, tasks, link, metrics)

    async def _connect_relay(self) -> RelayLink:
        """The connection to the local relay; BridgeError if there is none."""
        path = self.options.socket_path
        try:
            _, link = await asyncio.get_running_loop().create_unix_connection(
                lambda: RelayLink(self._from_relay), str(path)
            )
        except OSError as exc:
            raise BridgeError(
                f"no {self.domain} relay at {path} ({exc.strerror or exc}); start one with `jitrelay run {self.domain}`"
            ) from exc
        self.link = link
        return link

    async def _until_stopped(
        self, stop: asyncio.Event, link: RelayLink, closed: asyncio.Future[None], pump: asyncio.Task, tasks: list
    ) -> None:
        """Bridge until ``stop`` is set, then flush; BridgeError if the relay or NATS went away first."""
        stopping = asyncio.get_running_loop().create_task(stop.wait())
        await asyncio.wait([stopping, link.lost, closed, pump, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        for task in (pump, *tasks):
            if task.done():
                task.result()  # raises what stopped it
        if not stop.is_set():
            if link.lost.done():
                raise BridgeError(f"the {self.domain} relay at {self.options.socket_path} closed the connection")
            raise BridgeError("the NATS connection closed and will not reconnect")
        await self._flush_outbox(pump)

    async def _shut_down(self, pump: asyncio.Task, tasks: list[asyncio.Task], link: RelayLink, metrics: Any) -> None:
        """Stop every task, keep the carrier's state, report an open gap, close NATS, the relay and the metrics."""
        self._stopping = True
        pump.cancel()
        for task in tasks:
            task.cancel()
        self.carrier.close()
        self.gaps.close()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), STOP_FLUSH_SECONDS)
        if link.transport is not None:
            link.transport.close()
        if metrics is not None:
            await asyncio.get_running_loop().run_in_executor(None, metrics.shutdown)
            metrics.server_close()

    def _serve_metrics(self, loop: asyncio.AbstractEventLoop) -> Any:
        """The metrics server, if a port was given; BridgeError if it cannot listen there."""
        if self.options.metrics_port is None:
            return None
        try:
            return serve_metrics(self.domain, self.snapshot, loop, self.options.metrics_port)
        except OSError as exc:
            raise BridgeError(exc.strerror or str(exc)) from exc

    def snapshot(self) -> BridgeFigures:
        """A copy of the figures, with what nats-py holds for the relay now; call it on the event loop."""
        return self.figures.snapshot(self.carrier.pending_bytes())

    async def _connect_nats(self, closed: asyncio.Future[None]) -> Any:
        """A nats-py client with no echo that reconnects forever, to the next server of the cluster at once.

        ``closed`` is set if the client ever gives up for good.
        """
        import nats

        _widen_nats_reads()

        async def on_closed() -> None:
            if not closed.done():
                closed.set_result(None)

        return await nats.connect(
            list(self.options.servers),
            tls=nats_tls(self.options),
            user_credentials=str(self.options.nats_creds) if self.options.nats_creds is not None else None,
            name=f"jitrelay-bridge {self.domain} {socket.gethostname()} {os.getpid()}",
            no_echo=True,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=self.options.reconnect_wait,
            connect_timeout=2,
            pending_size=self.options.reconnect_buffer,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=on_closed,
        )

    async def _flush_outbox(self, pump: asyncio.Task) -> None:
        """On a stop, give what the relay already handed over up to a second to reach NATS."""
        if self.link is not None and self.link.transport is not None:
            self.link.transport.pause_reading()
        deadline = time.monotonic() + STOP_FLUSH_SECONDS
        while self._outbox and not pump.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self.carrier.drain(max(0.01, deadline - time.monotonic()))
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=max(0.1, deadline - time.monotonic()))

    def _warm_up(self) -> None:
        """Compile (or load) the kernels the bridge calls, for writable and read-only buffers, before traffic."""
        sample = protocol.build_message(logic_for(self.domain).domain_id, [], timestamp_ns=0) * 2
        kernels.frame(np.frombuffer(sample, dtype=np.uint8).copy(), 0, len(sample))
        self.check.whole_messages(sample)

    def log_figures(self, state: str) -> None:
        """Log every figure on one line (SIGUSR1, and at exit); raises nothing."""
        log.info("jitrelay bridge %s %s: %s", self.domain, state, self.figures.summary())


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[T]) -> T | None:
    """The result of ``work``, or None if ``stop`` is set first (``work`` is then cancelled)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


def nats_tls(options: BridgeOptions) -> ssl.SSLContext | None:
    """The TLS context for NATS: the servers checked against ``tls_ca`` (or the system's), ours if given; else None."""
    if not options.uses_tls:
        return None
    context = ssl.create_default_context(cafile=str(options.tls_ca) if options.tls_ca is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if options.tls_cert is not None:
        context.load_cert_chain(str(options.tls_cert), str(options.tls_key) if options.tls_key is not None else None)
    return context


def _widen_nats_reads() -> None:
    """Make nats-py read its socket ``NATS_READ_SIZE`` bytes at a time instead of 32 KiB.

    nats-py has no option for it: its read loop and its transports look up
    the module constant ``DEFAULT_BUFFER_SIZE`` each time. With 32 KiB reads a
    receiving bridge spends about twice the CPU per byte (a read-loop turn,
    a StreamReader pause and resume and a growth of the parser's buffer per
    32 KiB), and at full speed the server drops it as a slow consumer sooner.
    """
    import nats.aio.client

    if getattr(nats.aio.client, "DEFAULT_BUFFER_SIZE", NATS_READ_SIZE) < NATS_READ_SIZE:
        nats.aio.client.DEFAULT_BUFFER_SIZE = NATS_READ_SIZE


def _url(nc: object) -> str:
    url = getattr(nc, "connected_url", None)
    return f"nats://{url.hostname}:{url.port}" if url is not None else "?"


async def serve_bridge(options: BridgeOptions) -> Bridge:
    """Run a bridge until SIGINT/SIGTERM; return it for its figures. Raises BridgeError as ``Bridge.run`` does."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    bridge = Bridge(options)
    loop.add_signal_handler(signal.SIGUSR1, bridge.log_figures, "running")
    try:
        await bridge.run(stop)
    finally:
        bridge.log_figures("stopped")
    return bridge


def run_bridge(options: BridgeOptions) -> int:
    """``jitrelay bridge`` on uvloop: 0 after SIGINT/SIGTERM, 1 when the relay or NATS cannot be used.

    Raises nothing: every failure is logged and turned into the exit status.
    """
    import uvloop

    try:
        import nats  # noqa: F401  (an extra: the relay itself does not need it)
    except ImportError:
        log.error("the bridge needs nats-py, which is not installed: pip install 'jitrelay[bridge]'")
        return 1
    try:
        uvloop.run(serve_bridge(options))
    except BridgeError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot reach NATS at %s: %s", ",".join(options.servers), exc)
        return 1
    return 0
