"""``jitrelay bench``: the relay against its ceiling and against pyzmq, on the same workloads, in one run.

Relays measured (``--relays``), each started by the benchmark as a child process:

- ``jitrelay``: ``python -m jitrelay run market_data`` (``jitrelay:block`` and
  ``jitrelay:disconnect`` pass ``--slow-policy``);
- ``raw``: ``raw_forwarder.py`` (beside this module), a uvloop relay that copies bytes
  from each connection to all others with no parsing: the ceiling for a Python
  relay on this machine;
- ``zmq`` and ``zmq-default``: ``zmq_proxy.py`` (beside this module), a pyzmq XSUB/XPUB
  proxy, one frame per message; ``zmq`` with unlimited high-water marks on
  every socket (loses nothing), ``zmq-default`` with libzmq's defaults (loses
  what does not fit, and the figure says how much);
- ``bridge``: two "hosts" on this machine, each a ``jitrelay run
  market_data`` in its own folder with a ``jitrelay bridge`` to a three-node
  NATS cluster on loopback; the publisher is on host A and the subscribers on
  host B. Its W1 figure is also given over the local relay's (``jitrelay``) in
  the same run, and its W2 latency minus the local relay's: what the bridges
  and the cluster add.
- ``bridge-js``: the same two hosts with the bridges on JetStream
  (``--jetstream --when-full hold``) and both relays under ``block``: nothing
  is lost, the publisher on host A is held back to what the stream takes.

Workloads (ARCHITECTURE.md), each with one publisher process and N subscriber
processes, spawned:

- W1 throughput: market_data messages of ``--size`` bytes (one type-1 record),
  built once and renumbered before each 1 MiB batch with
  ``kernels.stamp_batch``, published as fast as the relay takes them for
  ``--duration`` seconds. A stream subscriber counts bytes / size and checks
  the one header that starts in each read; a zmq publisher sends the same
  messages one frame each and a zmq subscriber counts frames.
- W1f, W1 filtered (jitrelay relays only): four subscribers, each
  subscribed at the relay to one of four TLV types; the publisher's messages
  cycle through types 1..4, so each subscriber receives every fourth message.
  Set against the unfiltered W1 with four subscribers of the same run: per
  subscriber (``ratio_to_unfiltered``) and as the stream rate the relay
  carries (``stream_ratio_to_unfiltered``).
- W2 latency: ``--rate`` messages per second, one per send, each stamped with
  ``time.time_ns()``; every subscriber records receive time minus that stamp
  for every message.

"Lost" is exact: every subscriber is attached before the timed run starts, so
it is messages sent minus messages received. On a stream relay each subscriber
connects and receives a probe message before the publisher connects; PUB/SUB
has a slow-joiner problem (a subscription takes a moment to reach the
publisher), so the zmq publisher repeats the probe until every subscriber has
seen one, and subscribers skip the extra probes.

For the jitrelay relay the benchmark also reports its resident memory
(VmRSS sampled every 50 ms during the run, and VmHWM), the forwarding-time
figures of the summary file it writes when it stops (``--summary-file``), and
how long ``jitrelay run`` takes until it is listening, with its kernels already
built and with an empty cache (the one-off build a fresh install pays).

The relay, publisher and subscribers share the machine's cores, so absolute
figures move with anything else running; relays run side by side on each
workload and the figures to read are their ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from jitrelay.client.shared_log import CutOff
from jitrelay.core import protocol
from jitrelay.core.protocol import (
    MAGIC,
    MAGIC_FIELD,
    MARKET_DATA,
    OFF_MAGIC,
    OFF_SEQUENCE,
    SEQUENCE_FIELD,
    SEQUENCE_TIMESTAMP_FIELDS,
)
from jitrelay.core.units import MiB
from jitrelay.server.figures import read_figures
from jitrelay.testing.processes import die_with_parent
from jitrelay.testing.procfs import MemorySampler, cpu_seconds, proc_status
from jitrelay.testing.relay import ChildProcess, ProcessFailed
from jitrelay.tools.options import MESSAGE_SIZE, non_negative, non_negative_float
from jitrelay.tools.usage import UsageError

BATCH_BYTES = 1 * MiB
RECV_BUFFER = 4 * MiB
POLL_SECONDS = 0.2  # subscriber receive timeout: how often it looks at the control values while idle
IDLE_SECONDS = 1.0  # after the publisher is done, a subscriber silent this long has received all it will
STARTUP_SECONDS = 60.0  # relay ready, processes spawned and connected (a first run may compile kernels)
PROBE_INTERVAL = 0.05  # seconds between the zmq publisher's probes
RSS_INTERVAL = 0.05
SEQUENCE_CHECK_EVERY = 1024  # a zmq W1 subscriber checks the sequence of one frame in this many
PROBE_SEQUENCE = (1 << 64) - 1

RELAYS = ("jitrelay", "jitrelay-shm", "raw", "zmq", "zmq-default", "bridge", "bridge-js")
JITRELAYS = ("jitrelay", "jitrelay-shm")  # a jitrelay relay: its subscribers on sockets, or on its log in shared memory
BRIDGED = ("bridge", "bridge-js")
POLICIES = ("block", "disconnect")
WORKLOADS = ("w1", "w2", "w1f", "w3", "fanout", "client")
LATENCY_WORKLOADS = ("w2", "w3", "fanout")  # figures are latency percentiles, not a rate
FANOUT_RELAYS = ("jitrelay", "jitrelay-shm", "raw")  # fanout: stream relays whose subscribers a host process polls
FILTERED_SUBSCRIBERS = 4  # W1f: one subscriber per TLV type 1..4
STUCK_RATE = 200_000  # W3: messages per second, in sends of STUCK_BATCH, to STUCK_HEALTHY subscribers and a stuck one
STUCK_BATCH = 100
STUCK_HEALTHY = 3
IDLE_SOURCE = 254  # what idle subscribers select: no workload publishes from it
DEFAULT_RELAYS = ",".join(name for name in RELAYS if name != "jitrelay-shm")  # shared memory when asked for
DEFAULT_WORKLOADS = "w1,w2,w1f,w3"  # ``fanout`` and ``client`` (clients.py) when asked for
DEFAULT_SUBSCRIBERS = "1,4"  # W1 subscriber counts
DEFAULT_DURATION = 5.0  # seconds of publishing per run
DEFAULT_RATE = 5000.0  # W2 messages per second
DEFAULT_STARTUP_RUNS = 3
DEFAULT_FANOUT_SUBSCRIBERS = "1,10,100,200"
DEFAULT_FANOUT_INTERVAL_MS = 5.0  # fanout: one message every this many milliseconds
DEFAULT_FANOUT_HOSTS = 4  # fanout: subscriber processes, each polling its share of the subscribers in one loop
FANOUT_BUFFER = 64 * 1024  # fanout: a host's receive buffer (sockets: one for all; shared memory: each reader's)
RESULTS_DIR = Path("bench-results")  # where the JSON report goes unless --json says
BRIDGE_MAX_PENDING = 256 * MiB  # the servers' queue per client: the bench measures throughput, not their 64 MiB
PATH_CHECK_SECONDS = 0.2  # a bridged run's path check waits this long for each check message


class BenchError(RuntimeError):
    """A run that could not produce figures: a process died, hung or misbehaved."""


# The relays


@dataclass(frozen=True)
class Endpoint:
    """Where a worker connects: a Unix stream socket path, or a zmq endpoint and its high-water mark."""

    transport: str  # "unix", "shm" (a Unix socket whose subscribers read the relay's log in shared memory) or "zmq"
    address: str
    hwm: int | None = None  # zmq only: None keeps libzmq's default, 0 is unlimited


@dataclass
class RelaySpec:
    """How to start one relay and where its publishers and subscribers connect."""

    name: str
    command: list[str]
    marker: str  # a stderr line containing this says it is ready
    publish: Endpoint
    subscribe: Endpoint
    summary: str | None = None  # a jitrelay relay's summary file: its final figures, once it has stopped


def jitrelay_run(path: str, summary: str | None = None) -> list[str]:
    """The command line of a market_data relay on ``path``, writing its final figures to ``summary`` if given."""
    command = [sys.executable, "-m", "jitrelay", "run", "market_data", "--socket", path]
    return command + (["--summary-file", summary] if summary else [])


def relay_spec(name: str, folder: str) -> RelaySpec:
    base, _, policy = name.partition(":")
    summary = os.path.join(folder, "relay-figures.json")
    if base in BRIDGED:  # the relay of host A; host B, the bridges and the cluster come from ``bridged_hosts``
        path_a, path_b = (os.path.join(folder, host, "relay.sock") for host in ("a", "b"))
        # Under block: its bridge is a subscriber that must not be cut off for falling behind at full speed,
        # or the other host's figures would measure a cut-off instead of the bridge (publishers wait for it).
        command = jitrelay_run(path_a, summary) + ["--slow-policy", "block"]
        return RelaySpec(
            name, command, "relay listening on", Endpoint("unix", path_a), Endpoint("unix", path_b), summary
        )
    if base in (*JITRELAYS, "raw"):
        path = os.path.join(folder, "relay.sock")
        end = Endpoint("unix", path)
        if base in JITRELAYS:
            command = jitrelay_run(path, summary) + (["--slow-policy", policy] if policy else [])
            readers = Endpoint("shm", path) if base == "jitrelay-shm" else end
            return RelaySpec(name, command, "relay listening on", end, readers, summary)
        command = [sys.executable, "-m", "jitrelay.tools.bench.raw_forwarder", "--socket", path]
        return RelaySpec(name, command, "raw forwarder listening on", end, end)
    hwm = 0 if name == "zmq" else None
    xsub, xpub = f"ipc://{folder}/xsub", f"ipc://{folder}/xpub"
    command = [sys.executable, "-m", "jitrelay.tools.bench.zmq_proxy", "--xsub", xsub, "--xpub", xpub]
    command += ["--hwm", "0"] if hwm == 0 else []
    return RelaySpec(name, command, "zmq proxy listening on", Endpoint("zmq", xsub, hwm), Endpoint("zmq", xpub, hwm))


class BenchedProcess:
    """A relay, baseline or bridge as a child process (the shared harness), ready once its stderr says so.

    Always stopped on exit. While it runs, its memory can be sampled; before
    stopping it the peak (VmHWM) is read; after it stops, a jitrelay relay's
    final figures are read from its summary file (``figures``, None for the
    baselines, which write none).
    """

    def __init__(
        self,
        name: str,
        command: list[str],
        marker: str,
        env: dict[str, str] | None = None,
        summary: str | None = None,
    ):
        self.name = name
        self.command = command
        self.marker = marker
        self.env = env
        self.summary = summary
        self.child: ChildProcess | None = None
        self.sampler: MemorySampler | None = None
        self.hwm: int | None = None
        self.figures: dict | None = None
        self.startup_seconds = 0.0  # from spawning it to its ready line

    def __enter__(self) -> BenchedProcess:
        started = time.perf_counter()
        self.child = ChildProcess(self.command, ready_marker=self.marker, env=self.env, tie_to_parent=True)
        try:
            self.child.wait_ready(STARTUP_SECONDS)
        except ProcessFailed:
            code = self.child.proc.poll()
            self.child.kill()
            why = f"exited with {code}" if code is not None else f"not ready after {STARTUP_SECONDS:.0f} s"
            raise BenchError(f"{self.name} {why}: {self.log_tail()}") from None
        self.startup_seconds = time.perf_counter() - started
        return self

    @property
    def lines(self) -> list[str]:
        return self.child.lines if self.child is not None else []

    def sample_memory(self) -> None:
        """Sample VmRSS and RssAnon every ``RSS_INTERVAL`` until it stops."""
        assert self.child is not None
        self.sampler = MemorySampler(self.child.pid, ("VmRSS", "RssAnon"), RSS_INTERVAL).start()

    def cpu_seconds(self) -> float:
        """User plus system CPU time it has used so far, all threads."""
        assert self.child is not None
        return cpu_seconds(self.child.pid)

    def memory(self) -> dict:
        def mib(value: int | None) -> float | None:
            return None if value is None else value / MiB

        sampler = self.sampler
        return {
            "peak_sampled_mib": mib(sampler.peak("VmRSS")) if sampler else None,
            "peak_anon_mib": mib(sampler.peak("RssAnon")) if sampler else None,  # private: the rest is shared pages
            "vm_hwm_mib": mib(self.hwm),
            "samples": sampler.samples if sampler else 0,
        }

    def log_tail(self, n: int = 10) -> str:
        return " | ".join(list(self.lines)[-n:])

    def __exit__(self, *exc: object) -> None:
        if self.child is None:
            return
        if self.sampler is not None:
            self.sampler.stop()
        if self.child.alive():
            self.hwm = proc_status(self.child.pid, "VmHWM")
        self.child.stop(10)  # SIGTERM: a jitrelay relay writes its summary file on the way out
        self.child.kill()
        if self.summary is not None:
            with contextlib.suppress(FileNotFoundError):
                self.figures = read_figures(Path(self.summary))


@contextlib.contextmanager
def bridged_hosts(spec: RelaySpec, notes: dict) -> Iterator[None]:
    """For a ``bridge`` run: the cluster, host B's relay and both bridges, with the path from A to B checked.

    Host A's relay is already running. Once both bridges are ready, check
    messages go into host A one at a time until one reaches host B, and then
    host B is read until it has been quiet for a moment: from then on NATS has
    B's interest everywhere, and no check message is still on its way to the
    subscribers that attach next. When it ends, ``notes["bridges"]`` holds
    the figures each bridge logged as it stopped (traffic, gaps, reconnects):
    where any lost message went missing.
    """
    from jitrelay.testing.nats_cluster import NatsCluster, NatsClusterError

    path_b = spec.subscribe.address
    jetstream = spec.name == "bridge-js"
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(NatsCluster(3, max_pending=BRIDGE_MAX_PENDING, jetstream=jetstream))
        except NatsClusterError as exc:
            raise BenchError(str(exc)) from exc
        relay_b = jitrelay_run(path_b) + (["--slow-policy", "block"] if jetstream else [])
        stack.enter_context(BenchedProcess("host B relay", relay_b, "relay listening on"))
        bridges: list[BenchedProcess] = []
        stack.callback(_note_bridges, notes, bridges)  # first in, so it runs once the bridges have stopped
        for host, path in (("A", spec.publish.address), ("B", path_b)):
            command = [sys.executable, "-m", "jitrelay", "bridge", "market_data", "--socket", path, "--nats"]
            command += [cluster.servers, "--host", host]
            command += ["--jetstream", "--when-full", "hold"] if jetstream else ["--core"]
            bridges.append(BenchedProcess(f"host {host} bridge", command, "bridge market_data ready"))
            stack.enter_context(bridges[-1])
        _check_path(spec.publish.address, path_b)
        yield


def _note_bridges(notes: dict, bridges: list[BenchedProcess]) -> None:
    notes["bridges"] = {b.name: next((x for x in reversed(b.lines) if "stopped:" in x), None) for b in bridges}


def _check_path(path_a: str, path_b: str) -> None:
    with _connect(path_b) as checker, _connect(path_a) as sender:
        checker.settimeout(PATH_CHECK_SECONDS)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            sender.sendall(protocol.build_message(MARKET_DATA, [(1, b"path check")], timestamp_ns=0))
            with contextlib.suppress(TimeoutError):
                if checker.recv(1 << 16):
                    with contextlib.suppress(TimeoutError):  # until the check messages still on their way are in
                        while checker.recv(1 << 16):
                            pass
                    return
        raise BenchError(f"nothing published on host A reached host B within {STARTUP_SECONDS:.0f} s")


def relay_forwarding(figures: dict | None) -> dict | None:
    """A stopped jitrelay relay's forwarding time per batch, from its summary file; None without one (a baseline)."""
    if figures is None:
        return None
    return {
        "p50_us": figures["forward_p50_us"],
        "p99_us": figures["forward_p99_us"],
        "p99_9_us": figures["forward_p99_9_us"],
        "ns_per_message": figures["forward_ns_per_message"],
        # The relay's own part (read to the send loop's call) and the part inside the send loop's system calls.
        "own_p50_us": figures["own_p50_us"],
        "own_p99_us": figures["own_p99_us"],
        "send_p50_us": figures["send_p50_us"],
        "send_p99_us": figures["send_p99_us"],
    }


# Messages


def records_for(size: int) -> list[tuple[int, bytes]]:
    """The one type-1 record that makes a market_data message exactly ``size`` bytes long."""
    try:
        return [protocol.synthetic_record(MARKET_DATA, size)]
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def probe_message(size: int, types: int = 1) -> bytes:
    """The attach probe: sequence 2**64-1, and never ``size`` bytes long, so a zmq subscriber tells it by length.

    With ``types`` > 1 it carries a record of each type 1..``types``, so every W1f filter selects it.
    """
    records = [(t, b"probe" if size != 39 else b"probe!") for t in range(1, types + 1)]
    probe = protocol.build_message(MARKET_DATA, records, sequence=PROBE_SEQUENCE, timestamp_ns=0)
    if len(probe) == size:
        probe = protocol.build_message(MARKET_DATA, records + [(1, b"")], sequence=PROBE_SEQUENCE, timestamp_ns=0)
    return probe


# Worker processes (spawned; they report on one shared queue as (kind, who, payload))


def _worker(target: Any, who: str, reports: Any, *args: Any) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark process decides when to stop
    try:
        reports.put(("result", who, target(who, reports, *args)))
    except BaseException:
        reports.put(("error", who, traceback.format_exc()))


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def _zmq_socket(kind: str, end: Endpoint) -> Any:
    """A connected PUB (``kind="pub"``) or SUB socket, subscribed to everything, with the endpoint's HWM."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.PUB if kind == "pub" else zmq.SUB)
    if end.hwm is not None:
        sock.setsockopt(zmq.SNDHWM if kind == "pub" else zmq.RCVHWM, end.hwm)
    if kind == "sub":
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(end.address)
    return sock


def _zmq_flush(sock: Any) -> None:
    """Close a PUB socket and wait until libzmq has handed every queued frame on.

    Closing alone returns at once, and a process that exits then takes the
    frames still queued in libzmq's I/O thread with it.
    """
    sock.close()  # LINGER -1: the context's term waits for the queue to empty
    sock.context.term()


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray(n)
    view = memoryview(data)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise BenchError(f"relay closed the connection after {got} of {n} probe bytes")
        got += k
    return bytes(data)


class _Ending:
    """When a subscriber stops: the stream went quiet after the publisher finished, or time ran out."""

    def __init__(self, expected: Any, limit_s: float):
        self.expected = expected
        self.deadline = time.monotonic() + limit_s
        self.quiet_since = time.monotonic()
        self.known_at: float | None = None

    def data(self, at: float | None = None) -> None:
        """Data arrived now, or at monotonic time ``at`` (a receiver that skips the call per message)."""
        self.quiet_since = max(self.quiet_since, time.monotonic() if at is None else at)

    def on_timeout(self, received: int) -> str | None:
        now = time.monotonic()
        if now > self.deadline:
            return "deadline"
        if self.expected.value < 0:
            return None
        if received >= self.expected.value:
            return "all received"
        if self.known_at is None:
            self.known_at = now
        if now - max(self.quiet_since, self.known_at) > IDLE_SECONDS:
            return "quiet"
        return None


def share(sent: int, stride: int = 1, first: int = 0) -> tuple[int, int]:
    """Of sequences ``0..sent-1``, how many a subscriber gets and the last one, when it gets ``first + i * stride``.

    Unfiltered (stride 1) that is every message; a W1f subscriber ``k`` gets sequences ``k, k + 4, ...``.
    """
    return (sent - first + stride - 1) // stride, sent - 1 - (sent - 1 - first) % stride


def subscribe(
    who: str,
    reports: Any,
    end: Endpoint,
    size: int,
    mode: str,
    probe: bytes,
    expected: Any,
    limit_s: float,
    tlv_type: int | None = None,
) -> dict:
    """Attach, wait for the probe, then count (W1) or time (W2) messages until all sent have arrived.

    With ``tlv_type`` (W1f, stream relays only) it first subscribes to that type at the relay and
    expects every ``FILTERED_SUBSCRIBERS``-th sequence number from ``tlv_type - 1``.
    """
    if end.transport == "zmq":
        sock = _zmq_socket("sub", end)
        reports.put(("connected", who, None))
        _zmq_await_probe(sock, probe)
    elif end.transport == "shm":
        sock = _shared_subscriber(end.address, tlv_types=None if tlv_type is None else [tlv_type])
        reports.put(("connected", who, None))  # granted: it reads the log from shared memory from here on
        _mapped_await_probe(sock, probe)
    else:
        sock = _connect(end.address)
        if tlv_type is not None:
            sock.sendall(protocol.subscribe_message(tlv_types=[tlv_type]))
        reports.put(("connected", who, None))
        _await_probe(sock, probe)
    reports.put(("ready", who, None))
    cpu = time.process_time()
    if end.transport == "zmq":
        result = _zmq_receive(sock, size, mode == "time", expected, limit_s)
    else:
        reads = _MappedReads if end.transport == "shm" else _Reads
        if mode == "count":
            stride = 1 if tlv_type is None else FILTERED_SUBSCRIBERS
            result = _count(reads, sock, size, expected, limit_s, stride, 0 if tlv_type is None else tlv_type - 1)
        else:
            result = _time(reads, sock, size, expected, limit_s)
    result["cpu_s"] = time.process_time() - cpu
    if end.transport == "shm":
        sock.close()
    return result


def _shared_subscriber(path: str, buffer_size: int = RECV_BUFFER, tlv_types: list[int] | None = None) -> Any:
    """A ``Subscriber(shared_memory=True)``: returns once the relay has granted it the log (or raises)."""
    from jitrelay.client import Subscriber

    return Subscriber("market_data", path, buffer_size=buffer_size, tlv_types=tlv_types, shared_memory=True)


def _mapped_await_probe(sub: Any, probe: bytes) -> None:
    """The probe is the first message a granted subscriber reads from the log."""
    batch = sub.recv_batch(STARTUP_SECONDS)
    if batch is None or batch.tobytes() != probe:
        raise BenchError("the first message read from shared memory was not the probe")


def _await_probe(sock: socket.socket, probe: bytes) -> None:
    """The probe comes first on a stream; after it, reads time out every ``POLL_SECONDS``."""
    sock.settimeout(STARTUP_SECONDS)
    if _read_exactly(sock, len(probe)) != probe:
        raise BenchError("the first bytes received were not the probe message")
    sock.settimeout(POLL_SECONDS)


def _zmq_await_probe(sock: Any, probe: bytes) -> None:
    """The first frame is the probe; after it, receives time out every ``POLL_SECONDS``."""
    import zmq

    sock.setsockopt(zmq.RCVTIMEO, int(STARTUP_SECONDS * 1000))
    try:
        first = sock.recv()
    except zmq.Again:
        raise BenchError(f"no probe within {STARTUP_SECONDS:.0f} s") from None
    if first != probe:
        raise BenchError("the first message received was not the probe")
    sock.setsockopt(zmq.RCVTIMEO, int(POLL_SECONDS * 1000))


class _Reads:
    """A stream subscriber's reads into one reused buffer, until its ``_Ending`` or the relay says stop.

    Iterating yields each read's byte count (the bytes are in ``buf``);
    ``received`` tells how many whole messages the caller has taken so far.
    ``wall_ns`` is ``time.time_ns()`` right after the latest read,
    ``first_ns``/``last_ns`` the monotonic times of the first and latest, and
    ``stop`` why the reads ended.
    """

    def __init__(self, sock: Any, expected: Any, limit_s: float, received: Callable[[], int]):
        self.sock = sock
        self.buf: Any = bytearray(RECV_BUFFER)
        self.view: Any = memoryview(self.buf)
        self.ending = _Ending(expected, limit_s)
        self.received = received
        self.stop: str | None = None
        self.wall_ns = self.first_ns = self.last_ns = 0

    def __iter__(self) -> Iterator[int]:
        recv_into, buf, ending = self.sock.recv_into, self.buf, self.ending
        while self.stop is None:
            try:
                n = recv_into(buf)
            except TimeoutError:
                self.stop = ending.on_timeout(self.received())
                continue
            self.wall_ns = time.time_ns()
            if n == 0:
                self.stop = "closed by relay"
                return
            self.last_ns = time.monotonic_ns()
            self.first_ns = self.first_ns or self.last_ns
            yield n
            ending.data()
            if 0 <= ending.expected.value <= self.received():
                self.stop = "all received"

    def result(self, received: int, partial: int, last_sequence: int | None, gaps: int, bad_magic: int) -> dict:
        """The figures every subscriber reports."""
        return {
            "received": received,
            "partial_bytes": partial,
            "first_to_last_s": (self.last_ns - self.first_ns) / 1e9,
            "last_sequence": last_sequence,
            "sequence_gaps": gaps,
            "bad_magic": bad_magic,
            "stop": self.stop,
        }


class _MappedReads(_Reads):
    """``_Reads`` of a shared-memory ``Subscriber``: each batch it copies out of the mapped log is one read.

    ``buf`` and ``view`` are that batch (whole messages, a fresh array each
    time); it waits on the log's futex word for ``POLL_SECONDS`` at most.
    """

    def __init__(self, sub: Any, expected: Any, limit_s: float, received: Callable[[], int]):
        super().__init__(sub, expected, limit_s, received)
        self.buf = self.view = None

    def __iter__(self) -> Iterator[int]:
        recv_batch, ending = self.sock.recv_batch, self.ending
        while self.stop is None:
            try:
                batch = recv_batch(POLL_SECONDS)
            except EOFError as exc:  # the relay went away, or overwrote what this reader had yet to read
                self.stop = "lapped" if isinstance(exc, CutOff) else "closed by relay"
                return
            if batch is None:
                self.stop = ending.on_timeout(self.received())
                continue
            self.wall_ns = time.time_ns()
            self.last_ns = time.monotonic_ns()
            self.first_ns = self.first_ns or self.last_ns
            self.buf = self.view = batch
            yield len(batch)
            ending.data()
            if 0 <= ending.expected.value <= self.received():
                self.stop = "all received"


def _count(
    reader: type[_Reads], sock: Any, size: int, expected: Any, limit_s: float, stride: int = 1, first: int = 0
) -> dict:
    """Count whole messages; message ``i`` received should carry sequence ``first + i * stride``."""
    keep = 2 * size
    tail = b""
    total = 0
    seq_shift = first
    gaps = bad_magic = 0
    reads = reader(sock, expected, limit_s, lambda: total // size)
    for n in reads:
        buf, view = reads.buf, reads.view  # a mapped read's batch is new each time; a socket's buffer is not
        # The one message header that starts in this read, if it is whole: magic and sequence.
        skip = -total % size
        if skip + OFF_SEQUENCE + SEQUENCE_FIELD.size <= n:
            index = (total + skip) // size
            if MAGIC_FIELD.unpack_from(buf, skip + OFF_MAGIC)[0] != MAGIC:
                bad_magic += 1
            else:
                seq = SEQUENCE_FIELD.unpack_from(buf, skip + OFF_SEQUENCE)[0]
                if seq != index * stride + seq_shift:
                    gaps += 1
                    seq_shift = seq - index * stride
        tail = bytes(view[n - keep : n]) if n >= keep else (tail + bytes(view[:n]))[-keep:]
        total += n
    received, partial = divmod(total, size)
    last_seq = SEQUENCE_FIELD.unpack_from(tail, len(tail) - partial - size + OFF_SEQUENCE)[0] if received else None
    return reads.result(received, partial, last_seq, gaps, bad_magic)


def _time(reader: type[_Reads], sock: Any, size: int, expected: Any, limit_s: float) -> dict:
    """Time every message: receive time minus the send time it carries."""
    import numpy as np

    latencies: list[int] = []
    carry = b""
    received = next_seq = gaps = bad_magic = 0
    reads = reader(sock, expected, limit_s, lambda: received)
    for n in reads:
        now_ns, view = reads.wall_ns, reads.view
        data = carry + bytes(view[:n]) if carry else view[:n]
        whole = len(data) // size
        for k in range(whole):
            pos = k * size
            if MAGIC_FIELD.unpack_from(data, pos + OFF_MAGIC)[0] != MAGIC:
                bad_magic += 1
                continue
            seq, sent_ns = SEQUENCE_TIMESTAMP_FIELDS.unpack_from(data, pos + OFF_SEQUENCE)
            latencies.append(now_ns - sent_ns)
            if seq != next_seq:
                gaps += 1
            next_seq = seq + 1
        carry = bytes(data[whole * size :])
        received += whole
    result = reads.result(received, len(carry), next_seq - 1 if received else None, gaps, bad_magic)
    result["latency_ns"] = np.asarray(latencies, dtype=np.int64).tobytes()
    return result


def _zmq_receive(sock: Any, size: int, timing: bool, expected: Any, limit_s: float) -> dict:
    """Count (or with ``timing`` time) frames; per frame only what it must, so the baseline is not slowed."""
    import numpy as np
    import zmq

    latencies: list[int] = []
    received = probes = first_ns = last_ns = seq_shift = gaps = bad_magic = 0
    last = b""
    ending = _Ending(expected, limit_s)
    stop = None
    recv = sock.recv
    while stop is None:
        try:
            frame = recv()
        except zmq.Again:
            if received:
                ending.data(at=last_ns / 1e9)
            stop = ending.on_timeout(received)
            continue
        last_ns = time.monotonic_ns()
        if len(frame) != size:  # one of the probes repeated until every subscriber had one
            probes += 1
            continue
        if timing:
            seq, sent_ns = SEQUENCE_TIMESTAMP_FIELDS.unpack_from(frame, OFF_SEQUENCE)
            latencies.append(time.time_ns() - sent_ns)
            gaps += seq != received + seq_shift
            seq_shift = seq - received
        elif not received % SEQUENCE_CHECK_EVERY:
            if MAGIC_FIELD.unpack_from(frame, OFF_MAGIC)[0] != MAGIC:
                bad_magic += 1
            seq = SEQUENCE_FIELD.unpack_from(frame, OFF_SEQUENCE)[0]
            gaps += seq != received + seq_shift
            seq_shift = seq - received
        if not received:
            first_ns = last_ns
        received += 1
        last = frame
    sock.close(linger=0)
    result = {
        "received": received,
        "partial_bytes": 0,
        "first_to_last_s": (last_ns - first_ns) / 1e9,
        "last_sequence": SEQUENCE_FIELD.unpack_from(last, OFF_SEQUENCE)[0] if received else None,
        "sequence_gaps": gaps,
        "bad_magic": bad_magic,
        "extra_probes": probes,
        "stop": stop,
    }
    if timing:
        result["latency_ns"] = np.asarray(latencies, dtype=np.int64).tobytes()
    return result


def _await_start(start: Any, sock: Any, probe: bytes | None) -> None:
    """Wait for the go; a zmq publisher meanwhile repeats the probe so that late subscriptions catch one."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while not start.wait(PROBE_INTERVAL if probe is not None else 0.5):
        if probe is not None:
            sock.send(probe)
        if time.monotonic() > deadline:
            raise BenchError("never told to start")


def publish_batches(
    who: str, reports: Any, end: Endpoint, size: int, duration: float, start: Any, types: int = 1
) -> dict:
    """W1 publisher: 1 MiB batches, renumbered before each send, as fast as the relay takes them.

    With ``types`` > 1 (W1f) message ``k`` carries TLV type ``1 + k % types``.
    A zmq publisher sends the same batch one message per frame.
    """
    from jitrelay import kernels

    count = BATCH_BYTES // size // types * types  # whole cycles, so the types follow the sequence numbers
    value = records_for(size)[0][1]
    cycle = [[(tlv_type, value)] for tlv_type in range(1, types + 1)]
    batch = protocol.build_cycled_batch(MARKET_DATA, count, cycle, checksums=False)
    kernels.stamp_batch(batch, size, 0, 0, checksums=False)  # compile or load before the clock starts
    zmq_sock = _zmq_socket("pub", end) if end.transport == "zmq" else None
    sock = None
    reports.put(("warm", who, None))
    if zmq_sock is not None:
        _await_start(start, zmq_sock, probe_message(size))
        frames = [memoryview(batch)[i * size : (i + 1) * size] for i in range(count)]
        send = zmq_sock.send
    else:
        _await_start(start, None, None)
        sock = _connect(end.address)
    seq = 0
    cpu = time.process_time()
    began = time.monotonic()
    stop_at = began + duration
    while time.monotonic() < stop_at:
        kernels.stamp_batch(batch, size, seq, time.time_ns(), checksums=False)
        if zmq_sock is not None:
            for frame in frames:
                send(frame)  # copied into a zmq message at once, so restamping the batch is safe
        else:
            sock.sendall(batch)
        seq += count
    elapsed = time.monotonic() - began
    cpu = time.process_time() - cpu
    _close_publisher(zmq_sock, sock)
    return {"sent": seq, "elapsed_s": elapsed, "cpu_s": cpu, "batch_messages": count}


def publish_paced(
    who: str,
    reports: Any,
    end: Endpoint,
    size: int,
    duration: float,
    start: Any,
    rate: float,
    batch: int = 1,
    monotonic: bool = False,
) -> dict:
    """W2 (one message per send) and W3 (``batch`` per send) publisher: ``rate`` messages per second, stamped.

    Stamped with ``time.time_ns()``, or with ``monotonic`` (fanout) ``time.monotonic_ns()``: CLOCK_MONOTONIC,
    the clock every process on the machine shares.
    """
    stamp = time.monotonic_ns if monotonic else time.time_ns
    message = bytearray(protocol.build_message(MARKET_DATA, records_for(size), timestamp_ns=0) * batch)
    zmq_sock = _zmq_socket("pub", end) if end.transport == "zmq" else None
    sock = None
    reports.put(("warm", who, None))
    if zmq_sock is not None:
        _await_start(start, zmq_sock, probe_message(size))
        send = zmq_sock.send
    else:
        _await_start(start, None, None)
        sock = _connect(end.address)
        send = sock.sendall
    if batch > 1:  # a batch is stamped by the kernel, every message with the send time
        import numpy as np

        from jitrelay import kernels

        view = np.frombuffer(message, dtype=np.uint8)
    interval = batch / rate
    sends = int(duration * rate / batch)
    began = time.perf_counter()
    late = 0
    cpu = time.process_time()
    for k in range(sends):
        wait = began + k * interval - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        elif wait < -interval:
            late += 1
        if batch == 1:
            SEQUENCE_TIMESTAMP_FIELDS.pack_into(message, OFF_SEQUENCE, k, stamp())
        else:
            kernels.stamp_batch(view, size, k * batch, stamp())
        send(message)
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu
    _close_publisher(zmq_sock, sock)
    return {"sent": sends * batch, "elapsed_s": elapsed, "cpu_s": cpu, "sent_late": late}


def stuck_subscriber(who: str, reports: Any, end: Endpoint, hold_s: float) -> dict:
    """W3's stuck subscriber: connects, never reads (a strategy in a long pause), and holds on until killed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(end.address)
    reports.put(("connected", who, None))
    time.sleep(hold_s)
    sock.close()
    return {}


def fanout_host(
    who: str, reports: Any, end: Endpoint, size: int, count: int, probe: bytes, expected: Any, limit_s: float
) -> dict:
    """A fanout subscriber process: ``count`` subscribers of one kind, polled in one loop, every arrival stamped.

    Socket subscribers (``end.transport == "unix"``: the raw forwarder's, a
    jitrelay relay's) are non-blocking sockets in one epoll set: the loop
    sleeps in ``epoll_wait`` until one is readable, then reads each readable
    one into one shared ``FANOUT_BUFFER``. Shared-memory subscribers
    (``"shm"``) are ``Subscriber(shared_memory=True)`` objects: the loop
    sleeps in the first one's ``recv_batch`` (on the log's futex word, which
    every reader of the log shares) until it returns a batch, then asks each
    of the others for its next batch without waiting (``recv_batch(0)``).
    Either way one wait per wake-up, then one read per subscriber. Each message a
    subscriber reads is stamped ``time.monotonic_ns()`` right after its read,
    less the publisher's ``time.monotonic_ns()`` stamp in the message.
    """
    import selectors
    from array import array

    shared = end.transport == "shm"
    subs: list[Any] = [
        _shared_subscriber(end.address, FANOUT_BUFFER) if shared else _connect(end.address) for _ in range(count)
    ]
    reports.put(("connected", who, None))
    for sub in subs:
        (_mapped_await_probe if shared else _await_probe)(sub, probe)
    reports.put(("ready", who, None))
    seqs = [array("Q") for _ in subs]
    delays = [array("q") for _ in subs]
    received = [0] * count
    gaps = [0] * count
    bad_magic = [0] * count
    ended: list[str | None] = [None] * count
    ending = _Ending(expected, limit_s)

    def take(k: int, data: Any, end_at: int, now: int) -> None:
        got_seq, got_delay = seqs[k], delays[k]
        for pos in range(0, end_at, size):
            if MAGIC_FIELD.unpack_from(data, pos + OFF_MAGIC)[0] != MAGIC:
                bad_magic[k] += 1
                continue
            seq, sent_ns = SEQUENCE_TIMESTAMP_FIELDS.unpack_from(data, pos + OFF_SEQUENCE)
            if seq != received[k]:
                gaps[k] += 1
            got_seq.append(seq)
            got_delay.append(now - sent_ns)
            received[k] += 1

    def finished() -> bool:
        return 0 <= expected.value <= min(received)

    cpu = time.process_time()
    stop = None
    partial = [b""] * count
    if shared:

        def read(k: int, timeout: float) -> Any:
            try:
                batch = subs[k].recv_batch(timeout)
            except EOFError as exc:
                ended[k] = "lapped" if isinstance(exc, CutOff) else "closed by relay"
                return None
            if batch is not None:
                take(k, batch, len(batch), time.monotonic_ns())
            return batch

        while stop is None:
            live = [k for k in range(count) if ended[k] is None]
            if not live:
                stop = "closed by relay"
                continue
            # The first reader is never behind the others (it reads first each round), so while it waits on the
            # log's futex word none of them has anything left to read.
            if read(live[0], POLL_SECONDS) is None:
                if ended[live[0]] is None:
                    stop = ending.on_timeout(min(received))
                continue
            for k in live[1:]:
                read(k, 0)
            ending.data()
            stop = "all received" if finished() else None
    else:
        selector = selectors.EpollSelector()
        for k, sock in enumerate(subs):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, k)
        buf = bytearray(FANOUT_BUFFER)
        view = memoryview(buf)
        while stop is None:
            events = selector.select(POLL_SECONDS)
            if not events:
                stop = ending.on_timeout(min(received))
                continue
            for key, _ in events:
                k = key.data
                try:
                    n = key.fileobj.recv_into(buf)
                except BlockingIOError:
                    continue
                now = time.monotonic_ns()
                if n == 0:
                    ended[k] = "closed by relay"
                    selector.unregister(key.fileobj)
                    continue
                data = partial[k] + bytes(view[:n]) if partial[k] else view[:n]
                whole = len(data) - len(data) % size
                take(k, data, whole, now)
                partial[k] = bytes(data[whole:])
            if all(e is not None for e in ended):
                stop = "closed by relay"
            else:
                ending.data()
                stop = "all received" if finished() else stop
        selector.close()
    cpu = time.process_time() - cpu
    for sub in subs:
        sub.close()
    return {
        "cpu_s": cpu,
        "stop": stop,
        "subscribers": [
            {
                "received": received[k],
                "partial_bytes": len(partial[k]),
                "sequence_gaps": gaps[k],
                "bad_magic": bad_magic[k],
                "last_sequence": seqs[k][-1] if received[k] else None,
                "stop": ended[k] or stop,
                "sequences": seqs[k].tobytes(),
                "delays_ns": delays[k].tobytes(),
            }
            for k in range(count)
        ],
    }


def _close_publisher(zmq_sock: Any, sock: Any) -> None:
    if zmq_sock is not None:
        _zmq_flush(zmq_sock)
    else:
        sock.close()


# One run


class Run:
    """The worker processes of one run and the reports they send; kills whatever is left on exit."""

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.reports = ctx.Queue()
        self.procs: dict[str, Any] = {}
        self.seen: dict[tuple[str, str], Any] = {}

    def spawn(self, who: str, target: Any, *args: Any) -> None:
        proc = self.ctx.Process(target=_worker, args=(target, who, self.reports, *args), name=who, daemon=True)
        proc.start()
        self.procs[who] = proc

    def wait_for(self, kind: str, whos: list[str], timeout: float) -> dict[str, Any]:
        """Wait until each of ``whos`` has reported ``kind``; fail fast on an error or a dead process."""
        deadline = time.monotonic() + timeout
        while True:
            missing = [w for w in whos if (kind, w) not in self.seen]
            if not missing:
                return {w: self.seen[(kind, w)] for w in whos}
            try:
                got_kind, who, payload = self.reports.get(timeout=0.1)
                if got_kind == "error":
                    raise BenchError(f"{who} failed:\n{payload}")
                self.seen[(got_kind, who)] = payload
                continue
            except queue.Empty:
                pass
            for w in missing:
                if self.procs[w].exitcode is not None and not self.reports.qsize():
                    raise BenchError(f"{w} exited with {self.procs[w].exitcode} before reporting {kind!r}")
            if time.monotonic() > deadline:
                raise BenchError(f"no {kind!r} from {', '.join(missing)} within {timeout:.0f} s")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
        for proc in self.procs.values():
            proc.join(2)
        self.reports.close()
        self.reports.join_thread()


@dataclass
class Options:
    """What to run, resolved from the command line."""

    relays: list[str]
    workloads: list[str]
    subscribers: list[int]
    latency_subscribers: int
    size: int
    duration: float
    rate: float
    startup_runs: int
    json_path: Path
    progress: bool
    argv: list[str] = field(default_factory=list)
    idle_subscribers: int = 0  # W1 on jitrelay: subscribers connected beside the measured ones that select nothing
    fanout_subscribers: list[int] = field(
        default_factory=lambda: [int(n) for n in DEFAULT_FANOUT_SUBSCRIBERS.split(",")]
    )
    fanout_interval_ms: float = DEFAULT_FANOUT_INTERVAL_MS
    fanout_hosts: int = DEFAULT_FANOUT_HOSTS

    @property
    def drain_limit(self) -> float:
        """How long subscribers may take after the publisher: a lossless zmq proxy queues what they cannot take."""
        return 30.0 + 10.0 * self.duration


def run_one(relay_name: str, workload: str, subscribers: int, opts: Options) -> dict:
    """Start a relay, attach the subscribers, publish, collect every process's figures."""
    folder = tempfile.mkdtemp(prefix="jitrelay-bench-")
    spec = relay_spec(relay_name, folder)
    ctx = mp.get_context("spawn")
    run = Run(ctx)
    filtered = workload == "w1f"
    stride = _stride(workload)  # W1f: the publisher cycles through this many types, one per subscriber
    if filtered:
        subscribers = FILTERED_SUBSCRIBERS
    expected = [ctx.RawValue("q", -1) for _ in range(subscribers)]
    start = ctx.Event()
    probe = probe_message(opts.size, stride)
    mode = "time" if workload in ("w2", "w3") else "count"
    subs = [f"sub{i}" for i in range(subscribers)]
    if workload == "w3" and relay_name == "raw":  # the ceiling has no slow policy: it never pauses in a run
        spec.command += ["--high", str(1 << 30), "--low", str(1 << 29)]
    try:
        notes: dict = {}
        bridged = bridged_hosts(spec, notes) if relay_name in BRIDGED else contextlib.nullcontext()
        with BenchedProcess(relay_name, spec.command, spec.marker, summary=spec.summary) as relay, bridged:
            relay.sample_memory()
            if workload == "w2":
                run.spawn("pub", publish_paced, spec.publish, opts.size, opts.duration, start, opts.rate)
            elif workload == "w3":
                args = (spec.publish, opts.size, opts.duration, start, STUCK_RATE, STUCK_BATCH)
                run.spawn("pub", publish_paced, *args)
                run.spawn("stuck", stuck_subscriber, spec.subscribe, opts.duration + opts.drain_limit + 60)
                run.wait_for("connected", ["stuck"], STARTUP_SECONDS)
            else:
                run.spawn("pub", publish_batches, spec.publish, opts.size, opts.duration, start, stride)
            for k, who in enumerate(subs):
                args = (spec.subscribe, opts.size, mode, probe, expected[k], opts.drain_limit)
                run.spawn(who, subscribe, *args, *((k + 1,) if filtered else ()))
            run.wait_for("connected", subs, STARTUP_SECONDS)
            if spec.publish.transport == "unix":
                with _connect(spec.publish.address) as prober:
                    prober.sendall(probe)
                    run.wait_for("ready", subs, 10)
                run.wait_for("warm", ["pub"], STARTUP_SECONDS)
            else:  # the zmq publisher sends the probes once warm
                run.wait_for("warm", ["pub"], STARTUP_SECONDS)
                run.wait_for("ready", subs, 10)
            idle = _idle_subscribers(
                spec, opts.idle_subscribers if workload == "w1" and relay_name == "jitrelay" else 0
            )
            cpu_before = relay.cpu_seconds()
            start.set()
            pub = run.wait_for("result", ["pub"], opts.duration + 60)["pub"]
            for k, value in enumerate(expected):
                value.value = share(pub["sent"], stride, k % stride)[0]
            results = run.wait_for("result", subs, opts.drain_limit + 10)
            cpu = relay.cpu_seconds() - cpu_before
            for sock in idle:
                sock.close()
        figures = summarize(relay_name, workload, opts, pub, [results[w] for w in subs], cpu)
        figures["relay_command"] = spec.command
        figures["relay_memory"] = relay.memory()
        figures["relay_forwarding"] = relay_forwarding(relay.figures)
        figures["idle_subscribers"] = len(idle)
        figures["relay_log_tail"] = list(relay.lines)[-5:]
        figures.update(notes)
        return figures
    finally:
        run.close()
        shutil.rmtree(folder, ignore_errors=True)


def hosting(subscribers: int, hosts: int) -> list[int]:
    """How many of ``subscribers`` each fanout subscriber process holds: spread evenly over at most ``hosts``."""
    hosts = min(subscribers, hosts)
    return [subscribers // hosts + (h < subscribers % hosts) for h in range(hosts)]


def run_fanout(relay_name: str, subscribers: int, opts: Options) -> dict:
    """Fanout: one message every ``fanout_interval_ms``, timed until it has reached every one of ``subscribers``.

    The subscribers live in ``hosting`` processes (``fanout_host``), the
    same for every relay; the publisher is W2's (one message per send),
    stamped with the monotonic clock.
    """
    folder = tempfile.mkdtemp(prefix="jitrelay-bench-")
    spec = relay_spec(relay_name, folder)
    ctx = mp.get_context("spawn")
    run = Run(ctx)
    counts = hosting(subscribers, opts.fanout_hosts)
    names = [f"host{h}" for h in range(len(counts))]
    expected = ctx.RawValue("q", -1)
    start = ctx.Event()
    probe = probe_message(opts.size)
    rate = 1000.0 / opts.fanout_interval_ms
    try:
        with BenchedProcess(relay_name, spec.command, spec.marker, summary=spec.summary) as relay:
            relay.sample_memory()
            run.spawn("pub", publish_paced, spec.publish, opts.size, opts.duration, start, rate, 1, True)
            for who, count in zip(names, counts, strict=True):
                run.spawn(who, fanout_host, spec.subscribe, opts.size, count, probe, expected, opts.drain_limit)
            run.wait_for("connected", names, STARTUP_SECONDS)
            with _connect(spec.publish.address) as prober:
                prober.sendall(probe)
                run.wait_for("ready", names, STARTUP_SECONDS)
            run.wait_for("warm", ["pub"], STARTUP_SECONDS)
            cpu_before = relay.cpu_seconds()
            start.set()
            pub = run.wait_for("result", ["pub"], opts.duration + 60)["pub"]
            expected.value = pub["sent"]
            results = run.wait_for("result", names, opts.drain_limit + 10)
            cpu = relay.cpu_seconds() - cpu_before
        figures = summarize_fanout(relay_name, opts, pub, [results[w] for w in names], cpu)
        figures["relay_command"] = spec.command
        figures["relay_memory"] = relay.memory()
        figures["relay_forwarding"] = relay_forwarding(relay.figures)
        figures["relay_log_tail"] = list(relay.lines)[-5:]
        return figures
    finally:
        run.close()
        shutil.rmtree(folder, ignore_errors=True)


def summarize_fanout(relay: str, opts: Options, pub: dict, hosts: list[dict], relay_cpu: float) -> dict:
    """Per message: its delay to each subscriber; the largest (the last to have it) is what fanout reports."""
    import numpy as np

    sent, elapsed = pub["sent"], pub["elapsed_s"]
    held = [len(host["subscribers"]) for host in hosts]
    subs = [sub for host in hosts for sub in host.pop("subscribers")]
    delays = np.full((len(subs), sent), -1, dtype=np.int64)
    for k, sub in enumerate(subs):
        seqs = np.frombuffer(sub.pop("sequences"), dtype=np.uint64)
        got = np.frombuffer(sub.pop("delays_ns"), dtype=np.int64)
        inside = seqs < sent
        delays[k, seqs[inside].astype(np.int64)] = got[inside]
        sub["expected"] = sent
        sub["lost"] = sent - sub["received"]
        sub["last_sequence_ok"] = sub["last_sequence"] == sent - 1
    complete = (delays >= 0).all(axis=0)
    reached = delays[:, complete]
    lost = [s["lost"] for s in subs]
    return {
        "relay": relay,
        "workload": "fanout",
        "subscribers": len(subs),
        "hosts": len(hosts),
        "hosting": held,
        "message_size": opts.size,
        "duration_s": opts.duration,
        "interval_ms": opts.fanout_interval_ms,
        "sent": sent,
        "publisher_msg_per_s": sent / elapsed if elapsed > 0 else 0.0,
        "delivered_msg_per_s_mean": None,
        "reached_all": int(complete.sum()),
        "lost": lost,
        "lost_total": sum(lost),
        "lost_fraction": sum(lost) / (sent * len(subs)) if sent and subs else 0.0,
        # The time until the last subscriber had the message: the fanout figure.
        "latency_us": _percentiles(reached.max(axis=0) / 1e3) if reached.size else _percentiles(np.array([])),
        "first_us": _percentiles(reached.min(axis=0) / 1e3) if reached.size else _percentiles(np.array([])),
        "each_us": _percentiles(delays[delays >= 0] / 1e3),
        "relay_cpu_percent": 100 * relay_cpu / elapsed if elapsed > 0 else 0.0,
        "publisher_cpu_percent": 100 * pub["cpu_s"] / elapsed if elapsed > 0 else 0.0,
        "host_cpu_percent": [100 * h["cpu_s"] / elapsed if elapsed > 0 else 0.0 for h in hosts],
        "publisher": pub,
        "per_host": hosts,
        "per_subscriber": subs,
    }


def _idle_subscribers(spec: RelaySpec, count: int) -> list[socket.socket]:
    """``count`` subscribers on the relay that select nothing (a source no publisher uses), connected and idle."""
    idle = []
    for _ in range(count):
        sock = _connect(spec.subscribe.address)
        sock.sendall(protocol.subscribe_message(sources=[IDLE_SOURCE]))
        idle.append(sock)
    if idle:
        time.sleep(0.5)  # the relay has applied their subscriptions before the stream starts
    return idle


def _percentiles(values: Any) -> dict:
    import numpy as np

    if not len(values):
        return {"samples": 0, "p50": None, "p99": None, "p99_9": None, "max": None, "mean": None}
    p50, p99, p999 = np.percentile(values, [50, 99, 99.9])
    return {
        "samples": int(len(values)),
        "p50": float(p50),
        "p99": float(p99),
        "p99_9": float(p999),
        "max": float(values.max()),
        "mean": float(values.mean()),
    }


def _stride(workload: str) -> int:
    """A subscriber gets every ``_stride``-th message: W1f subscriber ``k`` those with sequence ``k`` modulo 4."""
    return FILTERED_SUBSCRIBERS if workload == "w1f" else 1


def summarize(relay: str, workload: str, opts: Options, pub: dict, subs: list[dict], relay_cpu: float) -> dict:
    """One run's figures: each subscriber against its ``share`` of the messages sent."""
    import numpy as np

    sent = pub["sent"]
    elapsed = pub["elapsed_s"]
    stride = _stride(workload)
    wanted = []
    for k, sub in enumerate(subs):
        want, last = share(sent, stride, k % stride)
        wanted.append(want)
        sub["expected"] = want
        sub["lost"] = want - sub["received"]
        sub["last_sequence_ok"] = sub["last_sequence"] == last
        span = sub["first_to_last_s"]
        sub["msg_per_s"] = sub["received"] / span if span > 0 else 0.0
    rates = [s["msg_per_s"] for s in subs]
    lost = [s["lost"] for s in subs]
    figures: dict[str, Any] = {
        "relay": relay,
        "workload": workload,
        "subscribers": len(subs),
        "message_size": opts.size,
        "duration_s": opts.duration,
        "sent": sent,
        "publisher_msg_per_s": sent / elapsed if elapsed > 0 else 0.0,
        "delivered_msg_per_s": rates,
        "delivered_msg_per_s_mean": float(np.mean(rates)),
        "delivered_mb_per_s_mean": float(np.mean(rates)) * opts.size / 1e6,
        "lost": lost,
        "lost_total": sum(lost),
        "lost_fraction": sum(lost) / sum(wanted) if sum(wanted) else 0.0,
        "latency_us": None,
        "relay_cpu_percent": 100 * relay_cpu / elapsed if elapsed > 0 else 0.0,
        "publisher_cpu_percent": 100 * pub["cpu_s"] / elapsed if elapsed > 0 else 0.0,
        "subscriber_cpu_percent": [100 * s["cpu_s"] / elapsed if elapsed > 0 else 0.0 for s in subs],
        "publisher": pub,
        "per_subscriber": subs,
    }
    if workload in ("w2", "w3"):
        figures["rate"] = opts.rate if workload == "w2" else STUCK_RATE
        samples = np.concatenate([np.frombuffer(s.pop("latency_ns"), dtype=np.int64) for s in subs])
        figures["latency_us"] = _percentiles(samples / 1e3)
    return figures


def add_ratios(runs: list[dict]) -> None:
    """Each run's figures over the raw forwarder's and over the lossless zmq proxy's on the same workload.

    A bridged run is also set against the local relay's: its W1 rate over the
    local one (``ratio_to_local``), and on W2 the latency the bridges add
    (``latency_added_us``: bridged percentile minus local percentile).
    """
    done = [r for r in runs if "error" not in r]

    def by_workload(relay: str) -> dict[tuple[str, int], dict]:
        return {(r["workload"], r["subscribers"]): r for r in done if r["relay"] == relay}

    for r in done:
        if r["workload"] != "w1f":
            continue
        base = by_workload(r["relay"]).get(("w1", FILTERED_SUBSCRIBERS))
        if base is not None and base["delivered_msg_per_s_mean"]:
            per_sub = r["delivered_msg_per_s_mean"] / base["delivered_msg_per_s_mean"]
            r["ratio_to_unfiltered"] = per_sub
            # Each filtered subscriber gets a quarter of the stream: the stream rate is four times its rate.
            r["stream_ratio_to_unfiltered"] = per_sub * FILTERED_SUBSCRIBERS
    for base_name, key in (("raw", "ratio_to_raw"), ("zmq", "ratio_to_zmq")):
        bases = by_workload(base_name)
        for r in done:
            r[key] = _ratio(r, bases.get((r["workload"], r["subscribers"])))
    for r in done:  # shared-memory subscribers against socket subscribers of the same relay (and policy)
        base, _, policy = r["relay"].partition(":")
        if base == "jitrelay-shm":
            sockets = by_workload("jitrelay" + (f":{policy}" if policy else ""))
            r["ratio_to_socket"] = _ratio(r, sockets.get((r["workload"], r["subscribers"])))
    local = by_workload("jitrelay")
    for r in done:
        if r["relay"] in BRIDGED:
            base = local.get((r["workload"], r["subscribers"]))
            r["ratio_to_local"] = _ratio(r, base)
            if r["workload"] == "w2":
                r["latency_added_us"] = _added(r, base)


def _added(run: dict, base: dict | None) -> dict | None:
    if base is None or run["latency_us"]["p50"] is None or base["latency_us"]["p50"] is None:
        return None
    return {p: run["latency_us"][p] - base["latency_us"][p] for p in ("p50", "p99")}


def _ratio(run: dict, base: dict | None) -> dict | None:
    def over(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    if base is None:
        return None
    if run["workload"] not in LATENCY_WORKLOADS:
        return {"delivered_msg_per_s": over(run["delivered_msg_per_s_mean"], base["delivered_msg_per_s_mean"])}
    mine, theirs = run["latency_us"], base["latency_us"]
    return {p: over(mine[p], theirs[p]) for p in ("p50", "p99", "p99_9", "max")}


# Startup


def measure_startup(runs: int) -> dict:
    """Seconds from spawning ``jitrelay run market_data`` to its listening line: warm ``runs`` times, then cold.

    The cold run points ``JITRELAY_CACHE_DIR`` and ``NUMBA_CACHE_DIR`` at empty
    folders, so the relay builds its kernel module from scratch; the difference
    is the build a fresh install pays once. The relay's summary file also says
    how long its kernels took to load or build.
    """
    warm = [_start_once(None) for _ in range(runs)]
    with tempfile.TemporaryDirectory(prefix="jitrelay-kernel-cache-") as cache:
        cold = _start_once(cache)
    warm_s = [w["seconds"] for w in warm]
    warm_kernels = [w["kernels_s"] for w in warm if w["kernels_s"] is not None]
    median = statistics.median(warm_s)
    return {
        "command": jitrelay_run("SOCKET"),
        "warm_s": warm_s,
        "warm_median_s": median,
        "warm_kernels_s": statistics.median(warm_kernels) if warm_kernels else None,
        "cold_s": cold["seconds"],
        "cold_kernels_s": cold["kernels_s"],
        "cold_compile_s": cold["seconds"] - median,
    }


def _start_once(cache_dir: str | None) -> dict:
    env = dict(os.environ)
    if cache_dir is not None:
        env["JITRELAY_CACHE_DIR"] = os.path.join(cache_dir, "jitrelay")
        env["NUMBA_CACHE_DIR"] = os.path.join(cache_dir, "numba")
    with tempfile.TemporaryDirectory(prefix="jitrelay-start-") as folder:
        path, summary = os.path.join(folder, "relay.sock"), os.path.join(folder, "relay-figures.json")
        command = [*jitrelay_run(path, summary), "--log-level", "DEBUG"]
        with BenchedProcess("jitrelay", command, "relay listening on", env, summary) as relay:
            seconds = relay.startup_seconds
    kernels = relay.figures["kernel_load_seconds"] if relay.figures else None
    return {"seconds": seconds, "kernels_s": kernels}


# Reporting


def machine() -> dict:
    from jitrelay import kernels

    model = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{dist: version(dist) for dist in ("numpy", "numba", "uvloop", "pyzmq", "jitrelay")},
        "kernels": kernels.backend()["name"],
    }


def git_commit() -> dict:
    """The checkout's commit and whether it has uncommitted changes; None for both outside a checkout."""
    import jitrelay

    root = Path(jitrelay.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return {"git_commit": None, "git_dirty": None}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def _m(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e6:.3f} M" if x >= 1e5 else f"{x:,.0f}"


def _us(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _x(ratio: dict | None, workload: str) -> str:
    if not ratio:
        return "-"
    if workload not in LATENCY_WORKLOADS:
        value = ratio["delivered_msg_per_s"]
        return "-" if value is None else f"{value:.2f}"
    if ratio["p50"] is None or ratio["p99"] is None:
        return "-"
    return f"{ratio['p50']:.2f}/{ratio['p99']:.2f}"


def format_report(report: dict) -> str:
    """The table and the relay's own figures, as printed at the end of a run."""
    m = report["machine"]
    opts = report["options"]
    out = [
        f"{m['cores']} cores, {m['cpu_model']}, Python {m['python']}, numba {m['numba']}, pyzmq {m['pyzmq']}; "
        f"commit {report['git_commit'] or '-'}" + (" (uncommitted changes)" if report["git_dirty"] else ""),
        f"{opts['size']}-byte messages, {opts['duration']:g} s per run; W1 in 1 MiB batches (zmq: one frame each), "
        f"W2 at {opts['rate']:g} msg/s; latency one-way in microseconds",
        "",
        f"{'relay':<20} {'load':<4} {'subs':>4} {'delivered/s per sub':>19} {'lost':>16} "
        f"{'p50':>8} {'p99':>8} {'p99.9':>8} {'x raw':>11} {'x zmq':>11}",
    ]
    for r in report["runs"]:
        head = f"{r['relay']:<20} {r['workload']:<4} {r['subscribers']:>4}"
        if "error" in r:
            out.append(f"{head}  failed: {r['error'].splitlines()[0][:80]}")
            continue
        lat = r["latency_us"] or {}
        lost = f"{r['lost_total']}" + (f" ({100 * r['lost_fraction']:.1f}%)" if r["lost_total"] else "")
        out.append(
            f"{head} {_m(r['delivered_msg_per_s_mean']):>19} {lost:>16} {_us(lat.get('p50')):>8} "
            f"{_us(lat.get('p99')):>8} {_us(lat.get('p99_9')):>8} {_x(r.get('ratio_to_raw'), r['workload']):>11} "
            f"{_x(r.get('ratio_to_zmq'), r['workload']):>11}"
        )
    out.append("x raw, x zmq: W1 delivered msg/s over the baseline's; W2 p50/p99 latency over the baseline's")
    for r in report["runs"]:
        if r["workload"] == "w3" and "error" not in r:
            ratio = (r.get("ratio_to_raw") or {}).get("max")
            out.append(
                f"{r['relay']} w3: {STUCK_HEALTHY} subscribers beside one that never reads, {STUCK_RATE:,} msg/s in "
                f"batches of {STUCK_BATCH}: worst latency {_us(r['latency_us']['max'])} us"
                + ("" if ratio is None else f" = {ratio:.2f} x raw's")
            )
    for r in report["runs"]:
        if r["workload"] == "w1f" and "error" not in r:
            per_sub, stream = r.get("ratio_to_unfiltered"), r.get("stream_ratio_to_unfiltered")
            out.append(
                f"{r['relay']} w1f: four subscribers, one TLV type each (a quarter of the stream): "
                f"{_m(r['delivered_msg_per_s_mean'])} msg/s per subscriber"
                + ("" if per_sub is None else f" = {per_sub:.2f} x unfiltered W1 with 4, stream rate {stream:.2f} x")
            )
    out += _fanout_lines(report)
    out += _shared_memory_lines(report)
    bridged = [r for r in report["runs"] if r["relay"] in BRIDGED and "error" not in r]
    if bridged:
        out.append("")
        out.append("bridge: publisher on host A, subscribers on host B, through two bridges and a 3-node NATS cluster")
        out.append("(bridge: core NATS; bridge-js: a JetStream stream, 3 replicas, both relays under block)")
    for r in bridged:
        label = f"{r['relay']} {r['workload']} {r['subscribers']} sub"
        if r["workload"] == "w1":
            ratio = (r.get("ratio_to_local") or {}).get("delivered_msg_per_s")
            share = "-" if ratio is None else f"{ratio:.3f}"
            out.append(f"{label}: {_m(r['delivered_msg_per_s_mean'])} msg/s delivered, {share} of the local relay's")
        else:
            added = r.get("latency_added_us")
            shown = "-" if added is None else f"p50 {added['p50']:+.1f} us, p99 {added['p99']:+.1f} us"
            out.append(f"{label}: latency added by the bridge {shown}")
    own = report["jitrelay"]
    if own:
        out.append("")
        rss = own["w1_peak_rss_mib"]
        hwm = own["w1_vm_hwm_mib"]
        out.append(
            "jitrelay resident memory during W1: peak "
            + ("-" if rss is None else f"{rss:.1f} MiB")
            + " sampled every 50 ms, VmHWM "
            + ("-" if hwm is None else f"{hwm:.1f} MiB")
            + ", of which private (RssAnon) "
            + ("-" if own["w1_peak_anon_mib"] is None else f"{own['w1_peak_anon_mib']:.1f} MiB")
        )
        for fwd in own["forwarding"]:
            label = f"{fwd['relay']} {fwd['workload']} {fwd['subscribers']} sub"
            if not fwd["logged"]:
                out.append(f"jitrelay forwarding time per batch, {label}: no summary file from this relay")
            else:
                ns = fwd["ns_per_message"]
                out.append(
                    f"jitrelay forwarding time per batch, {label}: p50 {_us(fwd['p50_us'])} us, "
                    f"p99 {_us(fwd['p99_us'])} us, p99.9 {_us(fwd['p99_9_us'])} us; "
                    + ("-" if ns is None else f"{ns:.1f}")
                    + f" ns per message; own part p50 {_us(fwd['own_p50_us'])} us, p99 {_us(fwd['own_p99_us'])} us, "
                    f"inside send calls p50 {_us(fwd['send_p50_us'])} us"
                )
    start = report["startup"]
    if start:
        kernels = start["cold_kernels_s"]
        out.append(
            f"jitrelay run until listening: warm {start['warm_median_s']:.2f} s (median of {len(start['warm_s'])}), "
            f"cold {start['cold_s']:.2f} s (empty cache: building the kernels costs {start['cold_compile_s']:.2f} s"
            + ("" if kernels is None else f"; kernels ready in {kernels:.2f} s")
            + ")"
        )
    return "\n".join(out)


def _fanout_lines(report: dict) -> list[str]:
    """Fanout: per subscriber count and relay, the time until the last subscriber had each message."""
    fanout = [r for r in report["runs"] if r["workload"] == "fanout" and "error" not in r]
    if not fanout:
        return []
    first = fanout[0]
    out = [
        "",
        f"fanout: one message every {first['interval_ms']:g} ms, subscribers spread over at most "
        f"{report['options'].get('fanout_hosts', '-')} processes (one polling loop each); "
        "time until the LAST subscriber had it, us",
        f"{'relay':<20} {'subs':>4} {'p50':>8} {'p99':>8} {'first p50':>9} {'x raw p50':>9} {'x sock p50':>10} "
        f"{'lost':>6} {'relay RSS':>10} {'relay CPU':>9} {'fwd p50':>8} {'own p50':>8}",
    ]
    for r in sorted(fanout, key=lambda r: (r["subscribers"], r["relay"])):
        lat, fwd = r["latency_us"], r["relay_forwarding"] or {}
        rss = r["relay_memory"]["peak_sampled_mib"]
        to_raw, to_socket = _p50_ratio(r, "ratio_to_raw"), _p50_ratio(r, "ratio_to_socket")
        out.append(
            f"{r['relay']:<20} {r['subscribers']:>4} {_us(lat['p50']):>8} {_us(lat['p99']):>8} "
            f"{_us(r['first_us']['p50']):>9} {to_raw:>9} {to_socket:>10} {r['lost_total']:>6} "
            + ("-" if rss is None else f"{rss:.1f} MiB").rjust(10)
            + f" {r['relay_cpu_percent']:>8.0f}% {_us(fwd.get('p50_us')):>8} {_us(fwd.get('own_p50_us')):>8}"
        )
    return out


def _subscribers(run: dict) -> int:
    return run["subscribers"]


def _counts(text: str) -> list[int]:
    """``1,10,100``: subscriber counts."""
    return [int(n) for n in _names(text)]


def _p50_ratio(run: dict, key: str) -> str:
    value = (run.get(key) or {}).get("p50")
    return "-" if value is None else f"{value:.2f}"


def _shared_memory_lines(report: dict) -> list[str]:
    """The shared-memory subscribers' figures over the raw forwarder's and the socket subscribers' of the same run."""
    shm = [r for r in report["runs"] if r["relay"].partition(":")[0] == "jitrelay-shm" and "error" not in r]
    if not shm:
        return []
    out = [
        "",
        "jitrelay-shm (subscribers read the relay's log from shared memory) x raw forwarder, x socket subscribers:",
    ]

    def x(ratio: dict | None, key: str) -> str:
        value = (ratio or {}).get(key)
        return "-" if value is None else f"{value:.2f}"

    for r in shm:
        key = "p50" if r["workload"] in LATENCY_WORKLOADS else "delivered_msg_per_s"
        what = (
            "p50 latency" if r["workload"] == "w2" else "p50 until the last has it" if key == "p50" else "msg/s per sub"
        )
        if r["workload"] == "w3":
            continue
        out.append(
            f"  {r['relay']} {r['workload']} {r['subscribers']} sub: {what} {x(r.get('ratio_to_raw'), key)} x raw, "
            f"{x(r.get('ratio_to_socket'), key)} x socket"
        )
    for name in dict.fromkeys(r["relay"] for r in shm):  # each variant (policy) on its own
        fanout = sorted((r for r in shm if r["workload"] == "fanout" and r["relay"] == name), key=_subscribers)
        if len(fanout) > 1 and fanout[0]["relay_forwarding"] and fanout[-1]["relay_forwarding"]:
            low, high = fanout[0], fanout[-1]
            a, b = low["relay_forwarding"], high["relay_forwarding"]
            grow = b["p50_us"] / a["p50_us"] if a["p50_us"] else None
            out.append(
                f"  {name} forwarding time per batch, fanout {low['subscribers']} -> {high['subscribers']} "
                f"subscribers: p50 {_us(a['p50_us'])} -> {_us(b['p50_us'])} us"
                + ("" if grow is None else f" ({grow:.2f} x)")
                + f", p99 {_us(a['p99_us'])} -> {_us(b['p99_us'])} us, own p50 {_us(a['own_p50_us'])} -> "
                f"{_us(b['own_p50_us'])} us"
            )
        for r in fanout:
            memory = r["relay_memory"]
            if memory["peak_sampled_mib"] is not None:
                out.append(
                    f"  {name} relay memory, fanout {r['subscribers']} subscribers: peak RSS "
                    f"{memory['peak_sampled_mib']:.1f} MiB, private {memory['peak_anon_mib']:.1f} MiB, "
                    f"VmHWM {memory['vm_hwm_mib']:.1f} MiB"
                )
    return out


def jitrelay_summary(runs: list[dict]) -> dict | None:
    """The jitrelay relay's own figures gathered over its runs: memory during W1 and forwarding time."""
    mine = [r for r in runs if r["relay"].partition(":")[0] in JITRELAYS and "error" not in r]
    if not mine:
        return None
    w1 = [r["relay_memory"] for r in mine if r["workload"] == "w1"]
    peaks = [m["peak_sampled_mib"] for m in w1 if m["peak_sampled_mib"] is not None]
    hwms = [m["vm_hwm_mib"] for m in w1 if m["vm_hwm_mib"] is not None]
    anons = [m["peak_anon_mib"] for m in w1 if m.get("peak_anon_mib") is not None]
    return {
        "w1_peak_rss_mib": max(peaks) if peaks else None,
        "w1_peak_anon_mib": max(anons) if anons else None,
        "w1_vm_hwm_mib": max(hwms) if hwms else None,
        "forwarding": [
            {"relay": r["relay"], "workload": r["workload"], "subscribers": r["subscribers"], **_or_nulls(r)}
            for r in mine
        ],
    }


def _or_nulls(run: dict) -> dict:
    fwd = run["relay_forwarding"]
    keys = ("p50_us", "p99_us", "p99_9_us", "ns_per_message", "own_p50_us", "own_p99_us", "send_p50_us", "send_p99_us")
    return {"logged": fwd is not None, **{k: fwd[k] if fwd else None for k in keys}}


# Entry point


def _names(text: str) -> list[str]:
    return [part.strip().lower() for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``jitrelay bench`` command line, which ``options`` reads."""
    parser.add_argument(
        "--relays",
        default=DEFAULT_RELAYS,
        help="comma-separated: jitrelay (or jitrelay:block, jitrelay:disconnect), jitrelay-shm (subscribers read the "
        "log from shared memory; also :block, :disconnect), raw, zmq, zmq-default, bridge, bridge-js",
    )
    parser.add_argument(
        "--workloads",
        default=DEFAULT_WORKLOADS,
        help="comma-separated: w1 (throughput), w2 (latency), w1f (w1 with 4 filtered subscribers), "
        "w3 (latency of 3 subscribers beside one that never reads), "
        "fanout (time for one message to reach every one of --fanout-subscribers subscribers), "
        "client (per-message publish and receive through the clients against pyzmq and nats-py, and W2 through them)",
    )
    parser.add_argument(
        "--subscribers",
        default=DEFAULT_SUBSCRIBERS,
        help=f"W1 subscriber counts, comma-separated ({DEFAULT_SUBSCRIBERS})",
    )
    parser.add_argument(
        "--latency-subscribers", type=non_negative, help="W2 subscriber count (default: the largest W1 count)"
    )
    parser.add_argument(
        "--size", type=non_negative, default=MESSAGE_SIZE, help=f"bytes per message, header included ({MESSAGE_SIZE})"
    )
    parser.add_argument(
        "--duration",
        type=non_negative_float,
        default=DEFAULT_DURATION,
        help=f"seconds of publishing per run ({DEFAULT_DURATION:g})",
    )
    parser.add_argument(
        "--rate", type=non_negative_float, default=DEFAULT_RATE, help=f"W2 messages per second ({DEFAULT_RATE:g})"
    )
    parser.add_argument(
        "--startup-runs",
        type=non_negative,
        default=DEFAULT_STARTUP_RUNS,
        help=f"warm starts of `jitrelay run` to time, followed by one cold start; 0 skips it ({DEFAULT_STARTUP_RUNS})",
    )
    parser.add_argument(
        "--idle-subscribers",
        type=non_negative,
        default=0,
        help="W1 on jitrelay: also connect N subscribers that select nothing, so the relay's memory shows whether it "
        "grows with subscribers (0)",
    )
    parser.add_argument(
        "--fanout-subscribers",
        default=DEFAULT_FANOUT_SUBSCRIBERS,
        help=f"fanout subscriber counts, comma-separated ({DEFAULT_FANOUT_SUBSCRIBERS})",
    )
    parser.add_argument(
        "--fanout-interval",
        type=non_negative_float,
        default=DEFAULT_FANOUT_INTERVAL_MS,
        help=f"fanout: milliseconds between messages ({DEFAULT_FANOUT_INTERVAL_MS:g})",
    )
    parser.add_argument(
        "--fanout-hosts",
        type=non_negative,
        default=DEFAULT_FANOUT_HOSTS,
        help=f"fanout: subscriber processes the subscribers are spread over, each polling its own in one loop "
        f"({DEFAULT_FANOUT_HOSTS})",
    )
    parser.add_argument("--json", type=Path, help=f"where to write every figure ({RESULTS_DIR}/<UTC time>.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def options(args: argparse.Namespace, argv: list[str] | None = None) -> Options:
    """Check the ``bench`` command line; a :class:`UsageError` says what is wrong."""
    relays = _names(args.relays)
    for name in relays:
        base, _, policy = name.partition(":")
        if base not in RELAYS or (policy and (base not in JITRELAYS or policy not in POLICIES)):
            raise UsageError(f"unknown relay {name!r}; choose from {', '.join(RELAYS)}, jitrelay:block")
    if any(name in BRIDGED for name in relays):
        from jitrelay.testing.nats_cluster import nats_server_path

        if nats_server_path() is None:
            if args.relays != DEFAULT_RELAYS:
                raise UsageError("the bridge runs need nats-server (Debian: apt-get install nats-server)")
            relays = [name for name in relays if name not in BRIDGED]
            print("jitrelay bench: no nats-server, so no bridge runs (apt-get install nats-server)", file=sys.stderr)
    if not relays:
        raise UsageError("no relay to run")
    workloads = _names(args.workloads)
    for name in workloads:
        if name not in WORKLOADS:
            raise UsageError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    try:
        counts = [int(n) for n in _names(args.subscribers)]
    except ValueError:
        raise UsageError(f"--subscribers takes comma-separated counts, not {args.subscribers!r}") from None
    if not counts or min(counts) < 1:
        raise UsageError("--subscribers needs counts of at least 1")
    latency_subs = max(counts) if args.latency_subscribers is None else args.latency_subscribers
    if latency_subs < 1:
        raise UsageError("--latency-subscribers needs at least 1")
    if not args.duration > 0 or not args.rate > 0 or args.startup_runs < 0:
        raise UsageError("--duration and --rate must be positive, --startup-runs at least 0")
    try:
        fanout = _counts(args.fanout_subscribers)
    except ValueError:
        raise UsageError(
            f"--fanout-subscribers takes comma-separated counts, not {args.fanout_subscribers!r}"
        ) from None
    if not fanout or min(fanout) < 1 or args.fanout_hosts < 1 or not args.fanout_interval > 0:
        raise UsageError(
            "--fanout-subscribers needs counts of at least 1, --fanout-hosts at least 1, "
            "--fanout-interval a positive number of milliseconds"
        )
    records_for(args.size)  # a size one record cannot make raises UsageError
    if any(r.startswith("zmq") for r in relays):
        try:
            import zmq  # noqa: F401
        except ImportError:
            raise UsageError("the zmq relays need pyzmq: pip install 'jitrelay[bench]'") from None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Options(
        relays=relays,
        workloads=workloads,
        subscribers=counts,
        latency_subscribers=latency_subs,
        size=args.size,
        duration=args.duration,
        rate=args.rate,
        startup_runs=args.startup_runs,
        json_path=args.json or RESULTS_DIR / f"{stamp}.json",
        progress=not args.no_progress,
        argv=list(sys.argv if argv is None else argv),
        idle_subscribers=args.idle_subscribers,
        fanout_subscribers=fanout,
        fanout_interval_ms=args.fanout_interval,
        fanout_hosts=args.fanout_hosts,
    )


class _Progress:
    """A tqdm bar over the runs on stderr, or nothing when hidden (tqdm is needed only to show one)."""

    def __init__(self, total: int, shown: bool):
        self.bar = None
        if shown:
            try:
                from tqdm import tqdm
            except ImportError:
                raise UsageError("the progress bar needs tqdm (pip install 'jitrelay[bench]')") from None
            self.bar = tqdm(total=total, file=sys.stderr, unit="run")

    def set_description(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def write(self, text: str) -> None:
        """A line on stderr that does not break the bar."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_bench(
    args: argparse.Namespace,
    client_workload: Callable[[Options], dict] | None = None,
    format_client: Callable[[dict], str] | None = None,
) -> int:
    """Run every relay on every workload, print the table, write the JSON; 1 if any run failed.

    The ``client`` workload lives in ``clients`` (which builds on this
    module), and is handed in by ``clients.run_bench``.
    """
    opts = options(args)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    plan = [("w1", n) for n in opts.subscribers if "w1" in opts.workloads]
    plan += [("w2", opts.latency_subscribers)] if "w2" in opts.workloads else []
    plan += [("w1f", FILTERED_SUBSCRIBERS)] if "w1f" in opts.workloads else []
    plan += [("w3", STUCK_HEALTHY)] if "w3" in opts.workloads else []
    steps = [
        (workload, n, relay)
        for workload, n in plan
        for relay in opts.relays  # relays side by side
        if workload != "w1f" or relay.partition(":")[0] in JITRELAYS  # jitrelay filters (shm: in the reader)
        if workload != "w3" or relay.partition(":")[0] in ("jitrelay", "raw")  # a stuck stream subscriber
    ]
    steps += [
        ("fanout", n, relay)
        for n in opts.fanout_subscribers
        if "fanout" in opts.workloads
        for relay in opts.relays
        if relay.partition(":")[0] in FANOUT_RELAYS
    ]
    measure_start = opts.startup_runs > 0 and any(r.partition(":")[0] in JITRELAYS for r in opts.relays)
    started = datetime.now(timezone.utc)
    runs: list[dict] = []
    startup = None
    failed = False
    client = None
    bar = _Progress(len(steps) + measure_start + ("client" in opts.workloads), opts.progress)
    try:
        for workload, n, relay in steps:
            bar.set_description(f"{relay} {workload} {n} sub")
            try:
                runs.append(run_fanout(relay, n, opts) if workload == "fanout" else run_one(relay, workload, n, opts))
            except BenchError as exc:
                failed = True
                runs.append({"relay": relay, "workload": workload, "subscribers": n, "error": str(exc)})
                bar.write(f"{relay} {workload} {n} sub failed: {exc}")
            bar.update()
        if "client" in opts.workloads:
            if client_workload is None:
                raise UsageError("the client workload runs from `jitrelay bench` (jitrelay.tools.bench.clients)")
            bar.set_description("client")
            client = client_workload(opts)
            failed = failed or bool(client["errors"])
            bar.update()
        if measure_start:  # last, so the runs above have left the kernels built
            bar.set_description("jitrelay startup")
            try:
                startup = measure_startup(opts.startup_runs)
            except BenchError as exc:
                failed = True
                bar.write(f"startup measurement failed: {exc}")
            bar.update()
    except KeyboardInterrupt:
        bar.close()
        print("interrupted", file=sys.stderr)
        return 130
    bar.close()
    add_ratios(runs)
    report = {
        "timestamp_utc": started.isoformat(timespec="seconds"),
        "command_line": opts.argv,
        "options": {
            "relays": opts.relays,
            "workloads": opts.workloads,
            "subscribers": opts.subscribers,
            "latency_subscribers": opts.latency_subscribers,
            "size": opts.size,
            "duration": opts.duration,
            "rate": opts.rate,
            "startup_runs": opts.startup_runs,
            **(
                {
                    "fanout_subscribers": opts.fanout_subscribers,
                    "fanout_interval_ms": opts.fanout_interval_ms,
                    "fanout_hosts": opts.fanout_hosts,
                }
                if "fanout" in opts.workloads
                else {}
            ),
        },
        **git_commit(),
        "machine": machine(),
        "runs": runs,
        "jitrelay": jitrelay_summary(runs),
        "startup": startup,
        "client": client,
    }
    print(format_report(report))
    if client is not None and format_client is not None:
        print("\n" + format_client(client))
    opts.json_path.parent.mkdir(parents=True, exist_ok=True)
    opts.json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nevery figure: {opts.json_path}")
    return 1 if failed else 0
