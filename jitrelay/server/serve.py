"""A relay's lifecycle: claim the socket, load the kernels, open the journal, listen, and stop on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.domains import RelayLogic, parse_listen
from jitrelay.server.engine import SHUTDOWN_FLUSH_SECONDS, Relay
from jitrelay.server.journal import Journal
from jitrelay.server.metrics import RelayMetrics
from jitrelay.server.sockets import bind_socket

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
    """Run a relay until ``stop`` is set or SIGINT/SIGTERM arrives; return it for its figures."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    path = Path(logic.socket_path)
    log.debug("configuration: %s", logic)
    sock = bind_socket(path)  # first: a second relay on a live path is refused before any compiling
    inode = os.stat(path).st_ino
    seconds = warm_up(logic)
    loaded = kernels.backend()
    log.info("kernels ready in %.3f s (%s: %s)", seconds, loaded["name"], loaded["path"])
    try:
        journal = (
            Journal(
                Path(logic.journal_dir), logic.name, fsync=logic.journal_fsync, rotate_bytes=logic.journal_rotate_bytes
            )
            if logic.journal
            else None
        )
    except OSError:
        sock.close()
        path.unlink()
        raise
    if journal is not None:
        log.info("journaling forwarded messages to %s (fsync %s)", journal.path, logic.journal_fsync)
    relay = Relay(logic, journal, kernel_load_seconds=seconds)
    loop.add_signal_handler(signal.SIGUSR1, relay.log_figures, "running")
    server = await loop.create_unix_server(relay.new_connection, sock=sock)
    tcp_servers: list[asyncio.AbstractServer] = []
    figures = None
    try:
        for address in logic.listen:
            host, port = parse_listen(address)
            tcp_servers.append(await loop.create_server(relay.new_connection, host, port, backlog=1024))
            for bound in tcp_servers[-1].sockets:
                where = bound.getsockname()
                shown = f"[{where[0]}]" if bound.family == socket.AF_INET6 else where[0]
                log.info("jitrelay %s relay listening on tcp://%s:%d", logic.name, shown, where[1])
        figures = await RelayMetrics.start(logic, relay.figures)  # the stats socket, and the HTTP endpoint if asked for
        log.info("jitrelay %s relay listening on %s", logic.name, path)
        await stop.wait()
    finally:
        server.close()
        for tcp_server in tcp_servers:
            tcp_server.close()
        await relay.drain_and_close(SHUTDOWN_FLUSH_SECONDS)
        if figures is not None:
            await figures.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == inode:
                path.unlink()
        if journal is not None:
            journal.close()
        relay.log_figures("stopped")
        if logic.summary_file is not None:
            write_summary(relay, Path(logic.summary_file))
    return relay


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
