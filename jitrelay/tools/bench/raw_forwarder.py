"""The ceiling for a Python relay: a uvloop Unix-socket server that forwards raw bytes.

Every byte a connection sends is written to every other connection, with no
framing and no validation. Each connection reads into a large buffer of its
own (``asyncio.BufferedProtocol``) and hands uvloop a view of what it read.
uvloop keeps that view when it cannot write it all at once, so a region is
never read into again until every peer's socket has taken it (each peer
counts the bytes written to it; those not yet taken are its transport's
``get_write_buffer_size()``, the last ones written): the next read goes past
it, a full buffer is set aside, and a set-aside one is reused (else a new one
made) once all of it has gone out. ``--per-read-bytes`` forwards the
``bytes`` object uvloop hands to ``data_received`` instead (a new one per
read): the forwarder as it was, kept to measure the difference. The relay
does strictly more work than this per byte; how close it comes to this
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

from jitrelay.core.units import KiB, MiB

BUFFER_BYTES = 4 * MiB  # each connection's read buffer
MIN_ROOM = 64 * KiB  # less room than this left in it: a fresh buffer


class Hub:
    """The set of live connections and whether they are being read."""

    def __init__(self, high: int, low: int):
        self.high = high
        self.low = low
        self.peers: list[Peer] = []
        self.blocked: set[Peer] = set()

    def add(self, peer: Peer) -> None:
        """A new connection: paused at once while anyone is blocked."""
        self.peers.append(peer)
        if self.blocked:
            peer.transport.pause_reading()

    def remove(self, peer: Peer) -> None:
        """A closed connection: it no longer holds the others back."""
        if peer in self.peers:
            self.peers.remove(peer)
        self.unblock(peer)

    def block(self, peer: Peer) -> None:
        """``peer`` has too much pending: stop reading every connection until it drains."""
        if not self.blocked:
            self._set_reading(False)
        self.blocked.add(peer)

    def unblock(self, peer: Peer) -> None:
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


class Peer:
    """One connection in the hub: its transport, paused and resumed with the hub."""

    def __init__(self, hub: Hub):
        self.hub = hub
        self.transport: asyncio.Transport
        self.queued = 0  # bytes ever written to this connection's transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Join the hub, pausing writes past the hub's high mark."""
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=self.hub.high, low=self.hub.low)
        self.hub.add(self)

    def sent_past(self, mark: int) -> bool:
        """Whether the socket has taken every byte written to it up to ``mark`` (or it is closing: it takes no more).

        Transports write in order, so the bytes not yet taken are the last
        ``get_write_buffer_size()`` written: uvloop's own queue and libuv's.
        """
        return self.transport.is_closing() or self.queued - self.transport.get_write_buffer_size() >= mark

    def send_on(self, data: bytes | memoryview, marks: dict[Peer, int] | None = None) -> None:
        """Write ``data`` to every other connection, noting in ``marks`` where it ends in each one's stream."""
        for peer in self.hub.peers:
            if peer is not self:
                peer.transport.write(data)
                peer.queued += len(data)
                if marks is not None:
                    marks[peer] = peer.queued

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


class Forwarder(Peer, asyncio.BufferedProtocol):
    """One connection reading into its own buffer: whatever it sends goes to everyone else, as views of it."""

    def __init__(self, hub: Hub, buffer_bytes: int = BUFFER_BYTES):
        super().__init__(hub)
        self.buffer_bytes = buffer_bytes
        self.view = memoryview(b"")
        self.start = 0  # where the next read lands: the bytes before it may still be pending somewhere
        self.marks: dict[Peer, int] = {}  # where the current buffer's bytes end in each peer's stream
        self.spares: list[tuple[memoryview, dict[Peer, int]]] = []  # full buffers, reused once every peer took them

    def get_buffer(self, sizehint: int) -> memoryview:
        """Room past every region a transport may still hold: the start again once every peer took all of it."""
        if self.start and all(peer.sent_past(mark) for peer, mark in self.marks.items()):
            self.start, self.marks = 0, {}
        if len(self.view) - self.start < MIN_ROOM:
            self.spares.append((self.view, self.marks))
            self.view, self.marks, self.start = self._free_buffer(), {}, 0
        return self.view[self.start :]

    def _free_buffer(self) -> memoryview:
        """A spare buffer no transport holds any more, else a new one."""
        for k, (view, marks) in enumerate(self.spares):
            if len(view) and all(peer.sent_past(mark) for peer, mark in marks.items()):
                del self.spares[k]
                return view
        return memoryview(bytearray(self.buffer_bytes))

    def buffer_updated(self, nbytes: int) -> None:
        """Forward what was read, as a view: its region stays untouched until every peer's socket has taken it."""
        self.send_on(self.view[self.start : self.start + nbytes], self.marks)
        self.start += nbytes


class BytesForwarder(Peer, asyncio.Protocol):
    """One connection forwarding the new ``bytes`` object of each read (``--per-read-bytes``)."""

    def data_received(self, data: bytes) -> None:
        """Copy the bytes to every other connection, unparsed."""
        self.send_on(data)


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


async def serve(path: str, high: int, low: int, per_read_bytes: bool = False) -> None:
    """Forward on ``path`` until SIGINT or SIGTERM; raises ``SystemExit`` when ``path`` is taken."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    _claim(path)
    hub = Hub(high, low)
    kind = BytesForwarder if per_read_bytes else Forwarder
    server = await loop.create_unix_server(lambda: kind(hub), path, backlog=1024)
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
    parser.add_argument(
        "--per-read-bytes", action="store_true", help="forward the new bytes object of each read, not views of a buffer"
    )
    args = parser.parse_args(argv)
    uvloop.run(serve(args.socket, args.high, args.low, args.per_read_bytes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
