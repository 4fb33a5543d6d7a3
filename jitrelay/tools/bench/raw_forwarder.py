"""The ceiling for a Python relay: a uvloop Unix-socket server that forwards raw bytes.

Every byte a connection sends is written to every other connection, with no
framing, no validation and no copy beyond the ``bytes`` object uvloop hands to
``data_received`` (immutable, so uvloop may keep it for a pending write). The
relay does strictly more work than this per byte; how close it comes to this
forwarder on the same workload is the figure that matters.

Memory stays bounded the way the relay's ``block`` policy bounds it: when a
connection has more than ``--high`` bytes pending, every connection stops being
read until all are back under ``--low``. Nothing is dropped.

    python -m jitrelay.tools.bench.raw_forwarder --socket /tmp/raw.sock
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import stat
import sys

import uvloop

from jitrelay.core.units import MiB


class Hub:
    """The set of live connections and whether they are being read."""

    def __init__(self, high: int, low: int):
        self.high = high
        self.low = low
        self.peers: list[Forwarder] = []
        self.blocked: set[Forwarder] = set()

    def add(self, peer: Forwarder) -> None:
        """A new connection: paused at once while anyone is blocked."""
        self.peers.append(peer)
        if self.blocked:
            peer.transport.pause_reading()

    def remove(self, peer: Forwarder) -> None:
        """A closed connection: it no longer holds the others back."""
        if peer in self.peers:
            self.peers.remove(peer)
        self.unblock(peer)

    def block(self, peer: Forwarder) -> None:
        """``peer`` has too much pending: stop reading every connection until it drains."""
        if not self.blocked:
            self._set_reading(False)
        self.blocked.add(peer)

    def unblock(self, peer: Forwarder) -> None:
        """``peer`` has drained: resume reading once no one is blocked."""
        if peer in self.blocked:
            self.blocked.discard(peer)
            if not self.blocked:
                self._set_reading(True)

    def _set_reading(self, reading: bool) -> None:
        for peer in self.peers:
            if peer.transport.is_closing():
                continue
            if reading:
                peer.transport.resume_reading()
            else:
                peer.transport.pause_reading()

    def close_all(self) -> None:
        """Abort every connection (on the way out)."""
        for peer in list(self.peers):
            peer.transport.abort()


class Forwarder(asyncio.Protocol):
    """One connection: whatever it sends goes to everyone else."""

    def __init__(self, hub: Hub):
        self.hub = hub
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Join the hub, pausing writes past the hub's high mark."""
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=self.hub.high, low=self.hub.low)
        self.hub.add(self)

    def data_received(self, data: bytes) -> None:
        """Copy the bytes to every other connection, unparsed."""
        for peer in self.hub.peers:
            if peer is not self:
                peer.transport.write(data)

    def eof_received(self) -> bool:
        """Close on EOF."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Leave the hub."""
        self.hub.remove(self)

    def pause_writing(self) -> None:
        """This connection is over the high mark: block the hub."""
        self.hub.block(self)

    def resume_writing(self) -> None:
        """This connection is under the low mark: unblock the hub."""
        self.hub.unblock(self)


def _claim(path: str) -> None:
    """Remove a stale socket file at ``path``; refuse to replace anything alive or not a socket."""
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise SystemExit(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise SystemExit(f"something is already listening on {path}")


async def serve(path: str, high: int, low: int) -> None:
    """Forward on ``path`` until SIGINT or SIGTERM; raises ``SystemExit`` when ``path`` is taken."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    _claim(path)
    hub = Hub(high, low)
    server = await loop.create_unix_server(lambda: Forwarder(hub), path, backlog=1024)
    inode = os.stat(path).st_ino
    print(f"raw forwarder listening on {path}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        hub.close_all()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == inode:
                os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    """``python -m jitrelay.tools.bench.raw_forwarder --socket PATH``: serve until stopped; 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--high", type=int, default=8 * MiB, help="pending bytes per connection that pause reading")
    parser.add_argument("--low", type=int, default=2 * MiB, help="pending bytes under which reading resumes")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.socket, args.high, args.low))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
