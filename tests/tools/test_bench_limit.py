"""The bench's baselines and W2's method: the compiled limit relay, the buffered raw forwarder, intended send times.

Real processes on real sockets, exact bytes; never a speed.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hdrh.log import HistogramLogReader
from test_bench import bench, bench_report, by_run, check_delivered_all

from jitrelay.core.protocol import OFF_SEQUENCE, SEQUENCE_TIMESTAMP_FIELDS
from jitrelay.testing.relay import ChildProcess
from jitrelay.tools.bench import hdr, limit_relay
from jitrelay.tools.bench.relays import Endpoint
from jitrelay.tools.bench.workers import publish_paced

PAYLOAD = os.urandom(3 << 20)  # random, so a region overwritten before it went out shows


def connect(path: Path, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(str(path))
    return sock


def read_all(sock: socket.socket, n: int, out: list[bytes], pause_s: float = 0.0) -> None:
    """``n`` bytes into ``out``; with ``pause_s``, first sit unread that long (a slow subscriber)."""
    time.sleep(pause_s)
    sock.settimeout(30)
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        got += chunk
    out.append(bytes(got))


def forwards_exactly(path: Path, pauses: tuple[float, ...]) -> None:
    """One publisher, a subscriber per pause: each subscriber gets exactly what was published, in order."""
    subscribers = [connect(path, rcvbuf=4096) for _ in pauses]
    time.sleep(0.2)  # both accepted before anything is published
    received: list[list[bytes]] = [[] for _ in pauses]
    readers = [
        threading.Thread(target=read_all, args=(sub, len(PAYLOAD), got, pause))
        for sub, got, pause in zip(subscribers, received, pauses, strict=True)
    ]
    for reader in readers:
        reader.start()
    with connect(path) as publisher:
        for at in range(0, len(PAYLOAD), 100_003):  # reads that do not line up with anything
            publisher.sendall(PAYLOAD[at : at + 100_003])
        for reader in readers:
            reader.join(60)
    for sub in subscribers:
        sub.close()
    assert [got[0] == PAYLOAD for got in received] == [True] * len(pauses)


@pytest.fixture
def limit_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("JITRELAY_CACHE_DIR", str(tmp_path / "cache"))
    binary = limit_relay.build()
    assert binary.parent == tmp_path / "cache" / "bench" and os.access(binary, os.X_OK)
    assert limit_relay.build() == binary  # the second time from the cache: same source, same compiler
    return binary


@pytest.fixture
def running(short_dir: Path) -> Iterator[list[ChildProcess]]:
    started: list[ChildProcess] = []
    yield started
    for child in started:
        child.kill()


def test_limit_relay_forwards_exact_bytes_to_two_subscribers(
    limit_binary: Path, short_dir: Path, running: list[ChildProcess]
) -> None:
    path = short_dir / "limit.sock"
    running.append(ChildProcess([str(limit_binary), str(path)], ready_marker=limit_relay.READY_MARKER))
    running[0].wait_ready(10)
    forwards_exactly(path, (0.0, 0.5))
    running[0].send_signal(15)
    assert running[0].wait_exit(10) == 0 and not path.exists()


@pytest.mark.parametrize("variant", [[], ["--per-read-bytes"]], ids=["buffered", "per-read-bytes"])
def test_raw_forwarder_forwards_exact_bytes_while_a_subscriber_lags(
    variant: list[str], short_dir: Path, running: list[ChildProcess]
) -> None:
    """A lagging subscriber keeps writes pending for seconds: the buffered forwarder must not reuse their memory."""
    path = short_dir / "raw.sock"
    command = [sys.executable, "-m", "jitrelay.tools.bench.raw_forwarder", "--socket", str(path), *variant]
    running.append(ChildProcess(command, ready_marker="raw forwarder listening on"))
    running[0].wait_ready(30)
    forwards_exactly(path, (0.0, 1.0))


def test_without_a_compiler_the_bench_says_so_and_runs_the_rest(tmp_path: Path) -> None:
    done = bench(
        f"--relays=raw,limit --workloads=w1 --subscribers=1 --duration=0.2 --json={tmp_path / 'b.json'}",
        env={"CC": "/nonexistent/cc"},
    )
    assert done.returncode == 0, done.stderr
    assert "jitrelay bench: no limit column: CC='/nonexistent/cc' names no compiler on the PATH" in done.stderr
    assert [r["relay"] for r in json.loads((tmp_path / "b.json").read_text())["runs"]] == ["raw"]


def test_limit_column_and_w2_histograms(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    options = "--relays=raw,limit --workloads=w1,w2 --subscribers=2 --duration=0.3 --rate=500 --startup-runs=0"
    report, printed = bench_report(path, options)
    runs = by_run(report)
    for run in runs.values():
        check_delivered_all(run)
    assert runs["limit", "w1"]["ratio_to_limit"] == {"delivered_msg_per_s": 1.0}
    raw, limit = runs["raw", "w1"], runs["limit", "w1"]
    ratio = raw["delivered_msg_per_s_mean"] / limit["delivered_msg_per_s_mean"]
    assert raw["ratio_to_limit"]["delivered_msg_per_s"] == pytest.approx(ratio)
    assert runs["raw", "w2"]["ratio_to_limit"]["p50"] == pytest.approx(
        runs["raw", "w2"]["latency_us"]["p50"] / runs["limit", "w2"]["latency_us"]["p50"]
    )
    assert "x limit" in printed.splitlines()[3]
    assert [line.split()[0] for line in printed.splitlines()[4:8]] == ["raw", "limit", "raw", "limit"]
    for relay in ("raw", "limit"):
        run = runs[relay, "w2"]
        assert run["latency_us"]["samples"] == 2 * run["sent"] == 2 * 150
        histogram = hdr.decode(run["latency_hdr"])
        assert histogram.get_total_count() == 2 * run["sent"]
        assert histogram.get_max_value() == pytest.approx(run["latency_us"]["max"] * 1e3, rel=1e-3)
        log = path.with_name(run["latency_hdr_log"])
        assert log == tmp_path / f"b.w2.{relay}.2sub.hlog"
        assert HistogramLogReader(str(log), hdr.decode(run["latency_hdr"])).get_next_interval_histogram() is not None
        assert "latency_hdr" not in runs[relay, "w1"]


class Stalling:
    """A relay stand-in that reads nothing for ``stall_s`` (the publisher's sends block), then everything."""

    def __init__(self, path: Path, stall_s: float):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.stall_s = stall_s
        self.data = bytearray()
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        time.sleep(self.stall_s)
        while chunk := conn.recv(1 << 16):
            self.data += chunk
        conn.close()


def test_paced_messages_carry_their_intended_send_times(short_dir: Path) -> None:
    """A publisher held up by its relay still stamps each message with its slot on the schedule."""
    path = short_dir / "stall.sock"
    relay = Stalling(path, stall_s=0.4)
    start, reports = threading.Event(), queue.Queue()  # type: ignore[var-annotated]
    start.set()
    result = publish_paced("pub", reports, Endpoint("unix", str(path)), 71, 1.0, start, 2000.0)
    relay.thread.join(10)
    relay.listener.close()
    assert len(relay.data) == 71 * result["sent"] == 71 * 2000
    stamps = [SEQUENCE_TIMESTAMP_FIELDS.unpack_from(relay.data, k * 71 + OFF_SEQUENCE) for k in range(2000)]
    assert [seq for seq, _ in stamps] == list(range(2000))
    first = stamps[0][1]
    assert [stamp - first for _, stamp in stamps] == [round(k / 2000 * 1e9) for k in range(2000)]
    assert result["late_us"]["max"] > 100_000  # the stall held the sends back; the stamps did not move
