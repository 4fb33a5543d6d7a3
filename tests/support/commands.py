"""The `jitrelay` command run as a child process, once or kept running."""

from __future__ import annotations

import contextlib
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from jitrelay.client import Subscriber
from support.relays import RelayProcess

JITRELAY = [sys.executable, "-m", "jitrelay"]


def jitrelay(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*JITRELAY, *args], capture_output=True, text=True, timeout=timeout)


class SubProcess:
    """``jitrelay sub`` in the background, its output read by threads; ready once it has connected."""

    def __init__(self, relay: RelayProcess, *options: str):
        self.proc = subprocess.Popen(
            [*JITRELAY, "sub", relay.domain, "--socket", str(relay.socket_path), *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        connected = threading.Event()

        def read_err() -> None:
            for line in self.proc.stderr:  # type: ignore[union-attr]
                self.stderr.append(line)
                if "connected to the" in line:
                    connected.set()
            connected.set()

        def read_out() -> None:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                self.stdout.put(line.rstrip("\n"))

        self._threads = [threading.Thread(target=f, daemon=True) for f in (read_err, read_out)]
        for t in self._threads:
            t.start()
        assert connected.wait(30), "sub did not start"
        assert self.proc.poll() is None, "".join(self.stderr)

    def lines(self, n: int) -> list[str]:
        return [self.stdout.get(timeout=10) for _ in range(n)]

    def wait(self) -> int:
        code = self.proc.wait(timeout=30)
        for t in self._threads:
            t.join(timeout=5)
        return code

    def rest(self) -> list[str]:
        return list(self.stdout.queue)


@contextlib.contextmanager
def running_relay(domain: str, *options: str) -> Iterator[RelayProcess]:
    """A relay for a whole module; tests that stop or load their relay start their own with ``start_relay``."""
    folder = tempfile.mkdtemp(prefix="jr-", dir="/tmp")  # short: a Unix socket path has ~107 bytes
    relay = RelayProcess(domain, Path(folder) / f"{domain}.sock", options)
    try:
        relay.wait_ready()
        yield relay
    finally:
        relay.kill()
        shutil.rmtree(folder, ignore_errors=True)


def stop(relay: RelayProcess, signum: int = signal.SIGTERM) -> int:
    relay.send_signal(signum)
    return relay.wait_exit(20)


def no_more(sub: Subscriber) -> None:
    """Nothing more arrives within a fifth of a second."""
    assert sub.recv_batch(timeout=0.2) is None


def receive(sub: Subscriber, nbytes: int, timeout: float = 10.0) -> bytes:
    """Exactly ``nbytes`` of whole messages, or fail."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    while len(got) < nbytes:
        batch = sub.recv_batch(max(0.0, deadline - time.monotonic()))
        assert batch is not None, f"received {len(got)} of {nbytes} bytes"
        got += batch.tobytes()
    assert len(got) == nbytes
    return bytes(got)


def stats(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jitrelay", "stats", *args], capture_output=True, text=True, timeout=timeout
    )


def tables(output: str) -> list[dict[str, list[str]]]:
    """Each table in ``stats`` output: row title -> its cells (total, then change and rate under --watch)."""
    found: list[dict[str, list[str]]] = []
    for line in output.splitlines():
        if line.startswith("jitrelay "):
            found.append({"title": [line]})
        elif found and line.strip() and not line.startswith("forwarding time"):
            cells = re.split(r"\s{2,}", line.rstrip())  # the header row starts blank
            found[-1][cells[0]] = cells[1:]
    return found


def total(table: dict[str, list[str]], row: str) -> int:
    return int(table[row][0].replace(",", ""))
