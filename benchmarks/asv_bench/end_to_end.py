"""A small W1: one publisher, one subscriber, a real market_data relay process between them.

Small on purpose (a few bursts of 20 MiB), so that it runs in seconds and a
commit that slows the relay down shows up in the history. The full W1/W2 with
baselines and several subscribers is ``jitrelay bench`` / benchmarks/workloads.py.

The relay starts in ``setup`` and is stopped with SIGTERM in ``teardown``.
The subscriber connects first and proves it is attached by receiving a probe
message from the publisher; only then are bursts timed, so every byte sent must
arrive. Publisher and subscriber are two threads of this process: both spend
their time in ``sendall``/``recv_into``, which release the GIL.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from jitrelay import protocol

from . import common

READY_MARKER = "relay listening on"
STARTUP_SECONDS = 120.0  # a fresh environment compiles the kernels before the relay listens
IO_TIMEOUT = 30.0
SIZE = 71
BATCH_BYTES = 1 * common.MiB
BATCHES_PER_BURST = 20
BURSTS = 5


class EndToEndW1:
    """Delivered messages per second of 71-byte market_data, 1 MiB batches, one subscriber: best of 5 bursts."""

    timeout = 300.0

    def setup(self):
        self.tmp = tempfile.mkdtemp(prefix="jitrelay-asv-")
        self.path = os.path.join(self.tmp, "market_data.sock")
        self.log: collections.deque[str] = collections.deque(maxlen=50)
        self.ready = threading.Event()
        self.relay = subprocess.Popen(
            [sys.executable, "-m", "jitrelay", "run", "market_data", "--socket", self.path, "--log-level", "INFO"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + STARTUP_SECONDS
        while not self.ready.wait(0.05):
            if self.relay.poll() is not None or time.monotonic() > deadline:
                self.teardown()
                raise RuntimeError(f"relay not ready (exit code {self.relay.returncode}): {' | '.join(self.log)}")
        self.batch = common.market_batch(SIZE, BATCH_BYTES)
        self.inbox = memoryview(bytearray(4 * common.MiB))

    def _drain(self):
        # Read stderr to the end, or the relay would block once the pipe is full.
        for line in self.relay.stderr:
            self.log.append(line.rstrip())
            if READY_MARKER in line:
                self.ready.set()

    def teardown(self):
        if self.relay.poll() is None:
            self.relay.send_signal(signal.SIGTERM)
            try:
                self.relay.wait(10)
            except subprocess.TimeoutExpired:
                self.relay.kill()
                self.relay.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def track_w1_messages_per_second(self):
        with _connect(self.path) as sub, _connect(self.path) as pub:
            probe = protocol.build_message(protocol.MARKET_DATA, [(1, b"probe")], timestamp_ns=0)
            pub.sendall(probe)
            _receive(sub, len(probe), self.inbox)
            per_burst = BATCHES_PER_BURST * (len(self.batch) // SIZE)
            return max(per_burst / self._burst(pub, sub) for _ in range(BURSTS))

    track_w1_messages_per_second.unit = "messages/s"

    def _burst(self, pub: socket.socket, sub: socket.socket) -> float:
        """Seconds from the first send to the last byte received."""
        errors: list[BaseException] = []

        def publish():
            try:
                for _ in range(BATCHES_PER_BURST):
                    pub.sendall(self.batch)
            except BaseException as exc:
                errors.append(exc)

        sender = threading.Thread(target=publish)
        start = time.perf_counter()
        sender.start()
        try:
            _receive(sub, BATCHES_PER_BURST * len(self.batch), self.inbox)
            elapsed = time.perf_counter() - start
        finally:
            sender.join()
        if errors:
            raise errors[0]
        return elapsed


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(IO_TIMEOUT)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * common.MiB)
    sock.connect(path)
    return sock


def _receive(sock: socket.socket, nbytes: int, inbox: memoryview) -> None:
    """Read exactly ``nbytes`` into ``inbox``, over and over; only the count matters."""
    got = 0
    while got < nbytes:
        n = sock.recv_into(inbox[: min(len(inbox), nbytes - got)])
        if n == 0:
            raise ConnectionError(f"relay closed the connection after {got} of {nbytes} bytes")
        got += n
