"""A raw subscriber connection for tests of what reaches whom, and the marker messages that fence a test's rounds."""

from __future__ import annotations

import random
import socket
import time

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol as p
from jitrelay.testing.relay import RelayProcess
from support import reference as ref
from support.streams import ThreadedReader

MARK = 0xEE  # source and flags of the test's own markers; streams never use both
WAIT = 15.0


def marker(sequence: int, flags: int = MARK, domain: int = p.SIGNAL) -> bytes:
    return ref.message(domain, b"", source=MARK, flags=flags, sequence=sequence)


def is_marker(message: bytes) -> bool:
    return message[6] == MARK and message[7] in (MARK, MARK + 1)


class Peer(ThreadedReader):
    """A raw connection whose reader thread cuts what arrives into whole messages."""

    def __init__(self, relay: RelayProcess) -> None:
        self.sock = relay.connect(WAIT)
        super().__init__(self.sock, 1 << 20)
        self.messages: list[bytes] = []
        self._pending = bytearray()
        self.start()

    def _received(self, chunk: memoryview) -> None:
        self._pending += chunk
        _, consumed, fault = kernels.frame(np.frombuffer(bytes(self._pending), dtype=np.uint8))
        assert fault == p.NO_FAULT, "the relay sent bytes that are not whole messages"
        found = [m.raw for m in p.decode_messages(bytes(self._pending[:consumed]))]
        del self._pending[:consumed]
        with self.changed:
            self.messages += found
            self.changed.notify_all()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_count(self, count: int, timeout: float = WAIT) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.messages) >= count, timeout), f"fewer than {count} messages"

    def wait_for(self, message: bytes, timeout: float = WAIT) -> list[bytes]:
        """Everything received before ``message`` (dropping markers), once ``message`` has arrived."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while message not in self.messages:
                left = deadline - time.monotonic()
                assert left > 0, f"{message.hex()} did not arrive within {timeout} s"
                self.changed.wait(left)
            before = self.messages[: self.messages.index(message)]
            del self.messages[: self.messages.index(message) + 1]
        return [m for m in before if not is_marker(m)]

    def close(self) -> None:
        self.stop()
        self.sock.close()


def publish_all(relay: RelayProcess, data: bytes, rng: random.Random) -> None:
    """Send ``data`` in random pieces and close gracefully: when this returns, the relay has handled every byte."""
    with relay.connect(WAIT) as sock:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            n = rng.choice((1, 7, 64, 500, 4096))
            sock.sendall(view[pos : pos + n])
            pos += n
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 16):
            pass


def settle(witness: Peer, subscribers: list[Peer], controls: list[bytes], round_: int, domain: int = p.SIGNAL) -> None:
    """Each subscriber sends its control bytes then a marker; wait until the witness has every marker."""
    marks = []
    for k, (peer, control) in enumerate(zip(subscribers, controls, strict=True)):
        mark = marker(round_ * 1000 + k, domain=domain)
        peer.send(control + mark)
        marks.append(mark)
    for mark in marks:
        witness.wait_for(mark)
