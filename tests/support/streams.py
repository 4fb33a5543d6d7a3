"""Raw-socket plumbing shared by the end-to-end tests: a connection read on a thread, and sending in pieces.

What a test makes of the bytes it reads (probes dropped, whole messages,
a stream cut at markers) stays in the test module; this holds only the
mechanism they share.
"""

from __future__ import annotations

import random
import socket
import threading
import time


class ThreadedReader:
    """Reads a connection on a daemon thread until EOF, an error or ``stop``; subclasses say what a chunk means.

    It reads a dup of the socket with its own 0.1 s timeout, so the test may
    still send on the original (and give that one a timeout of its own) and
    ``stop`` is seen within 0.1 s. Each chunk goes to ``_received`` on the
    reader thread, as a view into a buffer the next read reuses. ``changed``
    is notified when the reader ends; subclasses notify it for what they make
    of the chunks. Subclasses call ``start`` once ``_received`` has what it needs.
    """

    def __init__(self, sock: socket.socket, recv_size: int) -> None:
        self.changed = threading.Condition()
        self.eof = False
        self.error: OSError | None = None
        self._sock = sock.dup()
        self._sock.settimeout(0.1)
        self._recv_size = recv_size
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _may_read(self) -> bool:
        """Whether to read now; False skips a turn (at most 0.1 s, so ``stop`` is still seen)."""
        return True

    def _read_size(self) -> int:
        return self._recv_size

    def _received(self, chunk: memoryview) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        view = memoryview(bytearray(self._recv_size))
        try:
            while not self._stopping:
                if not self._may_read():
                    continue
                try:
                    n = self._sock.recv_into(view[: self._read_size()])
                except TimeoutError:
                    continue
                except OSError as exc:
                    self.error = exc
                    return
                if n == 0:
                    self.eof = True
                    return
                self._received(view[:n])
        finally:
            with self.changed:
                self.changed.notify_all()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait_ended(self, timeout: float) -> bool:
        """Wait for the reader thread to end (EOF, an error or ``stop``); whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Stop reading and close the dup; the original socket is the caller's."""
        self._stopping = True
        self._thread.join(5)
        self._sock.close()


def send_chunked(
    sock: socket.socket, data: bytes, rng: random.Random, sizes: tuple[int, ...], pause_chance: float = 0.2
) -> None:
    """Send ``data`` in pieces of sizes drawn from ``sizes``, pausing now and then so the relay sees the pieces."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        n = rng.choice(sizes)
        sock.sendall(view[pos : pos + n])
        pos += n
        if rng.random() < pause_chance:
            time.sleep(0.0002)


def drain(sock: socket.socket) -> bytes:
    """Everything ``sock`` holds now, without waiting: what a send put there, up to EOF if it came."""
    sock.setblocking(False)
    got = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(got)
        if not chunk:
            return bytes(got)
        got += chunk
