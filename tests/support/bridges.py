"""Two hosts joined by bridges through a NATS cluster: the bridge processes and the streams the bridge tests send."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from jitrelay.core.protocol import build_message, decode_messages
from jitrelay.testing.nats_cluster import NatsCluster
from support.clients import Reader
from support.relays import READY_TIMEOUT, RelayProcess, relay_environ

WAIT = 30.0  # generous: two relays, two bridges and three NATS servers share two cores


STREAM_SOURCE = 1


MARK_SOURCE = 0xEF  # end markers, sent after a stream until the far host has seen one


GAP_FROM = re.compile(r"gap from NATS: (\d+) messages \((\d+) bytes\)")


GAP_TO = re.compile(r"gap to NATS: (\d+) messages \((\d+) bytes\)")


CONNECTED = re.compile(r"(?:re)?connected to NATS at (nats://\S+?)(?: |$)")


GAP_SUMMARY = re.compile(r"from NATS (\d+) messages \(\d+ bytes\) in \d+; reconnects")


RECONNECTED = re.compile(r"reconnected to NATS at nats://\S+ after ([\d.]+) s")


class BridgeProcess(RelayProcess):
    """One ``jitrelay bridge`` subprocess and its stderr lines (the line machinery of ``RelayProcess``)."""

    def __init__(self, domain: str, socket_path: Path, servers: str, options: tuple[str, ...] = ()) -> None:
        self.domain = domain
        self.socket_path = socket_path
        self.args = [sys.executable, "-m", "jitrelay", "bridge", domain, "--socket", str(socket_path)]
        self.args += ["--nats", servers, "--metrics-port", "0", *options]
        self.lines = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=relay_environ()
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        self.wait_line(f"jitrelay bridge {self.domain} ready", timeout=timeout)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample its metrics endpoint serves now, keyed by name and labels (domain left out)."""
        url = re.search(r"metrics on (http://\S+)", self.wait_line("metrics on http://")).group(1)
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = dict(sample.labels)
                assert labels.pop("domain", self.domain) == self.domain
                samples[sample.name, tuple(sorted(labels.items()))] = sample.value
        return samples

    def figure(self, name: str, **labels: str) -> int:
        return int(self.metrics()[f"jitrelay_bridge_{name}", tuple(sorted(labels.items()))])

    def gap(self, direction: str) -> tuple[int, int]:
        """Messages and bytes its metrics count as lost in one direction."""
        figures = self.metrics()
        labels = (("direction", direction),)
        return int(figures["jitrelay_bridge_gap_messages_total", labels]), int(
            figures["jitrelay_bridge_gap_bytes_total", labels]
        )

    def nats_node(self, cluster: NatsCluster) -> int:
        """The cluster node the bridge is connected to now, from its last (re)connected line."""
        urls = [m.group(1) for line in list(self.lines) if (m := CONNECTED.search(line))]
        assert urls, self.stderr
        return cluster.node_at(urls[-1])

    def gap_lines(self, pattern: re.Pattern[str]) -> tuple[int, int]:
        """Messages and bytes summed over its gap lines of one kind."""
        found = [tuple(map(int, m.groups())) for line in list(self.lines) if (m := pattern.search(line))]
        return sum(f[0] for f in found), sum(f[1] for f in found)


@dataclass
class Host:
    relay: RelayProcess
    bridge: BridgeProcess


StartHosts = Callable[..., list[Host]]


def numbered(sequence: int, source: int = STREAM_SOURCE) -> bytes:
    """Stream message ``sequence``: 71 bytes of market data, the bytes a function of the number alone."""
    value = sequence.to_bytes(8, "little") * 4 + b"strm!"
    return build_message(1, [(1, value)], source=source, sequence=sequence, timestamp_ns=sequence)


class Stream:
    """Publishes numbered messages on a thread, 50 every 2 ms, until stopped; counts what it sent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.sock.sendall(b"".join(numbered(self.sent + k) for k in range(50)))
                self.sent += 50
                time.sleep(0.002)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(WAIT)
        assert self.error is None, self.error
        return self.sent


def end_markers(publisher: socket.socket, readers: list[Reader], timeout: float = WAIT) -> int:
    """Send markers after a stream until every reader has one; how many were sent."""
    deadline = time.monotonic() + timeout
    sent = 0
    marker_bytes = numbered(0, MARK_SOURCE)[:8]
    while True:
        publisher.sendall(numbered(sent, MARK_SOURCE))
        sent += 1
        if all(r.wait_for(lambda r=r: marker_bytes in bytes(r.data[-2000:]), 0.05) for r in readers):
            for reader in readers:  # markers sent before the first one arrived may still be on their way
                settle(reader, deadline)
            return sent
        assert time.monotonic() < deadline, "no end marker reached every reader"


def settle(reader: Reader, deadline: float, quiet: float = 0.5) -> None:
    """Until ``reader`` has received nothing more for ``quiet`` seconds."""
    last, since = reader.received, time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the reader kept receiving"
        time.sleep(0.05)
        if reader.received != last:
            last, since = reader.received, time.monotonic()


def split_stream(data: bytes) -> tuple[list[int], int]:
    """The sequence numbers of the stream messages in ``data`` (each checked byte for byte) and the markers."""
    sequences, markers = [], 0
    for message in decode_messages(data):
        if message.header.source == MARK_SOURCE:
            assert message.raw == numbered(message.header.sequence, MARK_SOURCE)
            markers += 1
            continue
        assert message.raw == numbered(message.header.sequence), f"message {message.header.sequence} altered"
        sequences.append(message.header.sequence)
    assert sequences == sorted(set(sequences)), "stream messages duplicated or out of order"
    return sequences, markers
