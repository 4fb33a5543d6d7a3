"""Subscribers as processes of their own, for what a test must do to a whole process: SIGSTOP, SIGKILL."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, TypeVar

from jitrelay.core.protocol import HEADER_SIZE, OFF_PAYLOAD_SIZE, OFF_SOURCE
from support.clients import PROBE_MARK


class Killable(Protocol):
    """Anything a test starts that a fixture kills: a process, a bridge, a child."""

    def kill(self) -> object: ...


_Killable = TypeVar("_Killable", bound=Killable)


def killed_at_teardown() -> Iterator[list[_Killable]]:
    """The body of a fixture that yields a list a test adds its processes to, and kills each of them at teardown."""
    started: list[_Killable] = []
    yield started
    for process in started:
        process.kill()


# Connects, then appends everything it reads to a file until the relay closes the connection.
_READER = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(sys.argv[3]))
sock.connect(sys.argv[1])
with open(sys.argv[2], "ab", buffering=0) as out:
    while True:
        try:
            data = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not data:
            break
        out.write(data)
"""


class ReaderProcess:
    """A subscriber process that writes what it receives to ``out``; started connected, stopped at teardown."""

    def __init__(self, socket_path: Path, out: Path, receive_buffer: int = 1 << 16) -> None:
        self.out = out
        out.write_bytes(b"")
        self.proc = subprocess.Popen([sys.executable, "-c", _READER, str(socket_path), str(out), str(receive_buffer)])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def received(self) -> bytes:
        return self.out.read_bytes()

    def wait_probe(self, timeout: float = 10.0) -> None:
        """Until it has received a sync probe: it is attached, and the relay forwards to it."""
        deadline = time.monotonic() + timeout
        while not any(data[at + OFF_SOURCE] == PROBE_MARK for at, data in _starts(self.received())):
            assert time.monotonic() < deadline, "the reader process received no probe"
            time.sleep(0.02)

    def stream(self) -> bytes:
        """What it received after the leading sync probes."""
        data = self.received()
        for at, _ in _starts(data):
            if data[at + OFF_SOURCE] != PROBE_MARK:
                return data[at:]
        return b""

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _starts(data: bytes) -> list[tuple[int, bytes]]:
    """Where each complete message of ``data`` starts (the file may end in the middle of one)."""
    found, at = [], 0
    while at + HEADER_SIZE <= len(data):
        end = at + HEADER_SIZE + int.from_bytes(data[at + OFF_PAYLOAD_SIZE : at + OFF_PAYLOAD_SIZE + 4], "little")
        if end > len(data):
            break
        found.append((at, data))
        at = end
    return found
