"""A relay's lifecycle: claim the socket, load the kernels, open the journal, bind, listen on all, stop on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from pathlib import Path

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.domains import TLS, RelayLogic, parse_listener
from jitrelay.server.engine import SHUTDOWN_FLUSH_SECONDS, Relay
from jitrelay.server.health import Health, Heartbeat
from jitrelay.server.journal import Journal
from jitrelay.server.metrics import RelayMetrics
from jitrelay.server.notify import Notifier
from jitrelay.server.retention import PruneTimer, prune_interval
from jitrelay.server.sockets import claim_socket
from jitrelay.server.tls import TlsFront

log = logging.getLogger("jitrelay.relay")


def warm_up(logic: RelayLogic) -> float:
    """Load (or build, or compile) the kernels before accepting traffic; return the seconds it took."""
    started = time.perf_counter()
    sample = np.frombuffer(protocol.build_message(logic.domain_id, [], timestamp_ns=0) * 3, dtype=np.uint8).copy()
    result, out = kernels.scan(sample, kernels.tables_for(logic))
    kernels.compact(sample, out.runs, result.runs)
    groups = kernels.group_tables([(frozenset({1}), None)])
    routed = kernels.RouteBuffers(len(sample), groups.groups)
    kernels.scan_and_route(sample, 0, len(sample), kernels.tables_for(logic), out, groups, routed)
    return time.perf_counter() - started


async def serve(logic: RelayLogic, stop: asyncio.Event | None = None) -> Relay:
    """Run a relay until ``stop`` is set or SIGINT/SIGTERM arrives; return it for its figures.

    The order is the point: claim the socket path (a second relay is refused
    before any compiling), load the kernels, open the journal, bind every TCP
    listener, and only then listen on all of them, TCP first, so that a client
    that sees the Unix socket accept finds the TCP listeners accepting too. A
    client that connects earlier is refused and can retry; none is left
    waiting on a relay that cannot serve it yet.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    path = Path(logic.socket_path)
    log.debug("configuration: %s", logic)
    claim = claim_socket(path)
    journal: Journal | None = None
    relay: Relay | None = None
    servers: list[asyncio.AbstractServer] = []
    front: TlsFront | None = None  # the TLS listeners' handshakes and pumps, when there are any
    figures = None
    notifier, health = Notifier.from_environ(), Health()
    heartbeat, pruning = Heartbeat(health, notifier, loop), None
    try:
        heartbeat.start()
        # The stats socket and the HTTP endpoint first: /readyz says "not ready" while the kernels load.
        figures = await RelayMetrics.start(logic, lambda: None if relay is None else relay.figures(), health)
        seconds = warm_up(logic)
        health.beat()  # the loop turns again: a build of the kernels may have held it for seconds
        loaded = kernels.backend()
        log.info("kernels ready in %.3f s (%s: %s)", seconds, loaded["name"], loaded["path"])
        if logic.journal:
            log.info("opening the journal in %s", logic.journal_dir)
            journal = open_journal(logic)
            health.journal = journal
            if journal.keep_seconds is not None:
                pruning = PruneTimer(journal.prune, prune_interval(journal.keep_seconds), loop)
        relay = Relay(logic, journal, kernel_load_seconds=seconds)
        loop.add_signal_handler(signal.SIGUSR1, relay.log_figures, "running")
        servers, schemes, front = await network_listeners(logic, relay)  # bound now, listening below
        servers.append(
            await loop.create_unix_server(relay.new_connection, sock=claim.sock, backlog=1024, start_serving=False)
        )
        for server in servers:  # TCP first, the Unix socket last
            await server.start_serving()
        log_listening(logic, servers[:-1], schemes)
        log.info("jitrelay %s relay listening on %s", logic.name, path)
        health.ready = True
        notifier.ready(f"listening on {path}")
        await stop.wait()
    finally:
        health.ready = False
        notifier.stopping()
        heartbeat.stop()
        if pruning is not None:
            pruning.stop()
        for server in servers:
            server.close()
        if relay is not None:
            await relay.drain_and_close(SHUTDOWN_FLUSH_SECONDS)
        if front is not None:
            front.close()  # handshakes under way; the pumps close as the engine closes their connections
        if figures is not None:
            await figures.close()
        claim.release()
        if journal is not None:
            journal.close()
        if relay is not None:
            relay.log_figures("stopped")
            if logic.summary_file is not None:
                write_summary(relay, Path(logic.summary_file))
        notifier.close()
    assert relay is not None
    return relay


async def network_listeners(
    logic: RelayLogic, relay: Relay
) -> tuple[list[asyncio.AbstractServer], list[str], TlsFront | None]:
    """Every ``tcp://`` and ``tls://`` listener bound, not listening yet; each one's scheme; the TLS front if any."""
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []
    schemes: list[str] = []
    front: TlsFront | None = None
    for address in logic.listen:
        scheme, host, port = parse_listener(address)
        if scheme == TLS:
            front = front or TlsFront(logic, relay.refused, relay.new_connection)
            servers.append(front.listener(host, port))
        else:
            servers.append(
                await loop.create_server(relay.new_connection, host, port, backlog=1024, start_serving=False)
            )
        schemes.append(scheme)
    return servers, schemes, front


def log_listening(logic: RelayLogic, servers: list[asyncio.AbstractServer], schemes: list[str]) -> None:
    """One line per bound address of each network listener, the port picked included."""
    for server, scheme in zip(servers, schemes, strict=True):
        for bound in server.sockets:  # type: ignore[attr-defined]  # an asyncio.Server's, not in AbstractServer
            where = bound.getsockname()
            shown = f"[{where[0]}]" if bound.family == socket.AF_INET6 else where[0]
            log.info("jitrelay %s relay listening on %s://%s:%d", logic.name, scheme, shown, where[1])


def open_journal(logic: RelayLogic) -> Journal:
    """The relay's journal, with its retention limits applied once at the start; logged."""
    journal = Journal(
        Path(logic.journal_dir),
        logic.name,
        fsync=logic.journal_fsync,
        rotate_bytes=logic.journal_rotate_bytes,
        keep_bytes=logic.journal_keep_bytes,
        keep_seconds=logic.journal_keep_seconds,
    )
    keeps = [f"{journal.keep_bytes} bytes"] if journal.keep_bytes is not None else []
    keeps += [f"{journal.keep_seconds:g} s"] if journal.keep_seconds is not None else []
    kept = f"keeping at most {' and '.join(keeps)}" if keeps else "keeping every segment"
    log.info("journaling forwarded messages to %s (fsync %s, %s)", journal.path, logic.journal_fsync, kept)
    journal.prune()
    return journal


def write_summary(relay: Relay, path: Path) -> None:
    """The stopped relay's figures as JSON in ``path``: what tools read instead of its log lines."""
    try:
        relay.figures().write(path)
    except OSError as exc:
        log.error("cannot write the summary file %s: %s", path, exc)
        return
    log.debug("final figures written to %s", path)


def run_relay(logic: RelayLogic) -> int:
    """Serve ``logic`` on uvloop until SIGINT/SIGTERM; the exit code."""
    import resource

    import uvloop

    # Two descriptors per connection (the transport's and the spare): take the hard limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve(logic))
    return 0
