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

from jitrelay.core import protocol

from . import common

READY_MARKER = "relay listening on"
STARTUP_SECONDS = 120.0  # a fresh environment compiles the kernels before the relay listens
IO_TIMEOUT = 30.0
SIZE = 71
BATCH_BYTES = 1 * common.MiB
BATCHES_PER_BURST = 20
BURSTS = 5


class _RelayUnderLoad:
    """A ``jitrelay run market_data`` process for the benchmarks below, and bursts of W1 through it."""

    timeout = 300.0
    SUBSCRIBERS = 1

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
        self.inboxes = [memoryview(bytearray(4 * common.MiB)) for _ in range(self.SUBSCRIBERS)]  # one per reader

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

    def _burst(self, pub: socket.socket, subs: list[socket.socket], nbytes: list[int]) -> float:
        """Seconds from the first send until every subscriber has its ``nbytes``.

        One thread sends the batch ``BATCHES_PER_BURST`` times while one thread per subscriber reads.
        """
        errors: list[BaseException] = []

        def run(fn, *args):
            try:
                fn(*args)
            except BaseException as exc:
                errors.append(exc)

        def publish():
            for _ in range(BATCHES_PER_BURST):
                pub.sendall(self.batch)

        readers = [
            threading.Thread(target=run, args=(_receive, sub, want, inbox))
            for sub, want, inbox in zip(subs, nbytes, self.inboxes, strict=True)
        ]
        for reader in readers:
            reader.start()  # each waits in recv_into until the first bytes arrive
        sender = threading.Thread(target=run, args=(publish,))
        start = time.perf_counter()
        sender.start()
        for reader in readers:
            reader.join()
        elapsed = time.perf_counter() - start
        sender.join()
        if errors:
            raise errors[0]
        return elapsed


class EndToEndW1(_RelayUnderLoad):
    """Delivered messages per second of 71-byte market_data, 1 MiB batches, one subscriber: best of 5 bursts."""

    def track_w1_messages_per_second(self):
        with _connect(self.path) as sub, _connect(self.path) as pub:
            probe = protocol.build_message(protocol.MARKET_DATA, [(1, b"probe")], timestamp_ns=0)
            pub.sendall(probe)
            _receive(sub, len(probe), self.inboxes[0])
            nbytes = BATCHES_PER_BURST * len(self.batch)
            return max(nbytes // SIZE / self._burst(pub, [sub], [nbytes]) for _ in range(BURSTS))

    track_w1_messages_per_second.unit = "messages/s"


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


class EndToEndW1Filtered(_RelayUnderLoad):
    """W1 with four subscribers: each subscribed to one of four TLV types (a quarter of the stream), or unfiltered.

    Tracks delivered messages per second per subscriber in both cases on the
    same relay, and the filtered stream's rate over the unfiltered one: the
    stream cycles through types 1..4, so each filtered subscriber receives
    every fourth message while the relay still judges and routes them all.
    """

    SUBSCRIBERS = 4

    def setup(self):
        super().setup()
        self.batch = common.quartered_batch(SIZE, BATCH_BYTES)

    def track_filtered_messages_per_second_per_subscriber(self):
        return self._delivered(filtered=True)

    track_filtered_messages_per_second_per_subscriber.unit = "messages/s"

    def track_unfiltered_messages_per_second_per_subscriber(self):
        return self._delivered(filtered=False)

    track_unfiltered_messages_per_second_per_subscriber.unit = "messages/s"

    def track_filtered_over_unfiltered_stream_rate(self):
        """Published messages per second the relay carries with the four filters, over without them."""
        filtered = self._delivered(filtered=True) * self.SUBSCRIBERS
        return filtered / self._delivered(filtered=False)

    track_filtered_over_unfiltered_stream_rate.unit = "ratio"

    def _delivered(self, filtered: bool) -> float:
        """Best of the bursts: messages each subscriber received per second."""
        subs = [_connect(self.path) for _ in range(self.SUBSCRIBERS)]
        try:
            with _connect(self.path) as pub:
                probe = protocol.build_message(protocol.MARKET_DATA, [(t, b"p") for t in (1, 2, 3, 4)], timestamp_ns=0)
                for k, sub in enumerate(subs):
                    if filtered:
                        sub.sendall(protocol.subscribe_message(tlv_types=[1 + k]))
                pub.sendall(probe)
                for sub in subs:
                    _receive(sub, len(probe), self.inboxes[0])
                count = len(self.batch) // SIZE
                n = self.SUBSCRIBERS
                shares = [(count - k + n - 1) // n if filtered else count for k in range(n)]
                best = min(
                    self._burst(pub, subs, [BATCHES_PER_BURST * s * SIZE for s in shares]) for _ in range(BURSTS)
                )
                return BATCHES_PER_BURST * sum(shares) / n / best
        finally:
            for sub in subs:
                sub.close()
