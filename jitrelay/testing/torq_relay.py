"""A stand-in for Torq's relay: raw read chunks, unframed and unchecked, to every connection, the sender included.

What it copies from Torq's generic relay (``dawsh2/Torq``,
``libs/messaging/relays/core/src/common/client.rs``, ``handle_connection``,
accepted in ``libs/messaging/relays/core/src/common/mod.rs``, ``Relay::run``):
every connection gets a read task and a write task at once, with no
handshake; the read task reads up to 64 KiB at a time and puts each read
chunk, as read (never cut into messages), on one broadcast channel; every
connection's write task writes every chunk on that channel to its socket,
so a publisher receives its own bytes back. A stale socket file is removed
before binding.

What it leaves out, so that tests see the stream itself: Torq's read task
looks at the first 32 bytes of each chunk as a header and drops the whole
chunk when it is shorter than a header, when those bytes do not start with
the magic, or when the domain logic's ``should_forward`` refuses that first
header; and its broadcast channel holds 10,000 chunks, a reader lagging
further loses the oldest (``RecvError::Lagged``). This stand-in forwards
every chunk and holds what a slow reader has not taken yet, so a test knows
exactly which bytes each reader should get. (A chunk that starts in the
middle of a message is dropped by Torq's relay whole, which tears the
stream of every reader: ``jitrelay shadow`` reports that as a stream fault.)

Run it as ``python -m jitrelay.testing.torq_relay PATH``: it says
``torq stand-in relay listening on PATH`` on stderr once it accepts, and on
SIGTERM or SIGINT reads what its connections have already sent, writes out
what it holds for them (for at most a few seconds) and exits 0.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

READ_SIZE = 64 * 1024  # Torq's read buffer: ``vec![0u8; 65536]``
FLUSH_SECONDS = 5.0  # on stopping, how long to keep writing out what readers have not taken


class _Connection:
    def __init__(self, sock: socket.socket, number: int) -> None:
        self.sock = sock
        self.number = number
        self.outgoing = bytearray()
        self.received = 0


class TorqRelay:
    """The relay: one listening socket, and every accepted connection both a publisher and a subscriber."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # as Torq's relay does: a stale socket file is replaced
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.connections: dict[int, _Connection] = {}
        self.accepted = 0
        self.stopping = False

    def serve(self) -> None:
        print(f"torq stand-in relay listening on {self.path}", file=sys.stderr, flush=True)
        while not self.stopping:
            for key, events in self.selector.select(0.2):
                if key.fileobj is self.listener:
                    self._accept()
                    continue
                connection = self.connections.get(key.fd)
                if connection is None:
                    continue
                if events & selectors.EVENT_READ:
                    self._read(connection)
                if events & selectors.EVENT_WRITE and key.fd in self.connections:
                    self._write(connection)
        self._finish()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            connection = _Connection(sock, self.accepted)
            self.accepted += 1
            self.connections[sock.fileno()] = connection
            self.selector.register(sock, selectors.EVENT_READ)
            print(f"torq stand-in relay: connection {connection.number} accepted", file=sys.stderr, flush=True)

    def _read(self, connection: _Connection) -> bool:
        """One read of at most ``READ_SIZE``, broadcast as it is; whether it read anything."""
        try:
            chunk = connection.sock.recv(READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self._close(connection)
            return False
        connection.received += len(chunk)
        for other in list(self.connections.values()):  # the sender too, as Torq's broadcast channel does
            other.outgoing += chunk
            self._write(other)
        return True

    def _write(self, connection: _Connection) -> None:
        try:
            while connection.outgoing:
                sent = connection.sock.send(connection.outgoing)
                del connection.outgoing[:sent]
        except BlockingIOError:
            pass
        except OSError:  # the reader went away: Torq's write task ends, and the connection with it
            self._close(connection)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if connection.outgoing else 0)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.modify(connection.sock, events)

    def _close(self, connection: _Connection) -> None:
        if self.connections.pop(connection.sock.fileno(), None) is None:
            return
        self.selector.unregister(connection.sock)
        connection.sock.close()
        print(
            f"torq stand-in relay: connection {connection.number} closed after {connection.received} bytes",
            file=sys.stderr,
            flush=True,
        )

    def _finish(self) -> None:
        """Read what was sent before the stop, write out what readers are owed, then close everything."""
        for connection in list(self.connections.values()):
            while self._read(connection):
                pass
        deadline = time.monotonic() + FLUSH_SECONDS
        while any(c.outgoing for c in self.connections.values()) and time.monotonic() < deadline:
            for key, _ in self.selector.select(0.1):
                waiting = self.connections.get(key.fd)
                if waiting is not None:
                    self._write(waiting)
        for connection in list(self.connections.values()):
            self._close(connection)
        self.selector.close()
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def stop(self, *_: object) -> None:
        self.stopping = True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m jitrelay.testing.torq_relay SOCKET_PATH", file=sys.stderr)
        return 2
    relay = TorqRelay(Path(args[0]))
    signal.signal(signal.SIGTERM, relay.stop)
    signal.signal(signal.SIGINT, relay.stop)
    relay.serve()
    print(f"torq stand-in relay stopped ({os.getpid()})", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
