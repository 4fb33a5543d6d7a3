"""The relays a bench run starts, each as a child process, and where its workers connect.

- ``jitrelay``: ``python -m jitrelay run market_data`` (``jitrelay:block`` and
  ``jitrelay:disconnect`` pass ``--slow-policy``); ``jitrelay-shm`` the same
  relay, its subscribers reading its log from shared memory; ``jitrelay-py``
  the same relay forwarding each read by the engine's Python steps
  (``--read-path python``); ``jitrelay-uv`` the same relay with the event
  loop's reads, one compiled call each (``--read-path uvloop``); ``jitrelay-exec``
  is ``python -m jitrelay run execution`` journaling into the run's folder,
  its publishers sending execution messages with their checksums;
- ``raw``: ``raw_forwarder.py`` (beside this module), the raw-bytes ceiling
  for Python; ``raw-bytes`` the same with a new ``bytes`` per read (the
  forwarder before it read into a buffer of its own);
- ``limit``: ``c_forwarder.c`` built by ``limit_relay``, the compiled limit;
- ``zmq`` and ``zmq-default``: ``zmq_proxy.py`` (beside this module), a pyzmq
  XSUB/XPUB proxy, with unlimited or libzmq's default high-water marks;
- ``bridge`` and ``bridge-js``: two "hosts" on this machine joined by
  ``jitrelay bridge`` through a three-node NATS cluster (``bridged_hosts``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jitrelay.core import protocol
from jitrelay.core.protocol import DOMAIN_NAMES, EXECUTION, MARKET_DATA
from jitrelay.core.units import MiB
from jitrelay.server.figures import read_figures
from jitrelay.testing.procfs import MemorySampler, cpu_seconds, proc_status
from jitrelay.testing.relay import ChildProcess, ProcessFailed
from jitrelay.tools.bench.limit_relay import READY_MARKER, NoCompiler, limit_command
from jitrelay.tools.bench.options import BRIDGED, JITRELAYS, READ_PATH_BASELINES

STARTUP_SECONDS = 60.0  # relay ready, processes spawned and connected (a first run may compile kernels)
RSS_INTERVAL = 0.05
BRIDGE_MAX_PENDING = 256 * MiB  # the servers' queue per client: the bench measures throughput, not their 64 MiB
PATH_CHECK_SECONDS = 0.2  # a bridged run's path check waits this long for each check message


class BenchError(RuntimeError):
    """A run that could not produce figures: a process died, hung or misbehaved."""


@dataclass(frozen=True)
class Endpoint:
    """Where a worker connects: a Unix stream socket path, or a zmq endpoint and its high-water mark."""

    transport: str  # "unix", "shm" (a Unix socket whose subscribers read the relay's log in shared memory) or "zmq"
    address: str
    hwm: int | None = None  # zmq only: None keeps libzmq's default, 0 is unlimited
    domain: int = MARKET_DATA  # the header domain the relay there takes: what its publishers build


@dataclass
class RelaySpec:
    """How to start one relay and where its publishers and subscribers connect."""

    name: str
    command: list[str]
    marker: str  # a stderr line containing this says it is ready
    publish: Endpoint
    subscribe: Endpoint
    summary: str | None = None  # a jitrelay relay's summary file: its final figures, once it has stopped
    journal: str | None = None  # the folder a journaling relay writes its journal to


def jitrelay_run(path: str, summary: str | None = None, domain: int = MARKET_DATA) -> list[str]:
    """The command line of a ``domain`` relay on ``path``, writing its final figures to ``summary`` if given."""
    command = [sys.executable, "-m", "jitrelay", "run", DOMAIN_NAMES[domain], "--socket", path]
    return command + (["--summary-file", summary] if summary else [])


def relay_spec(name: str, folder: str) -> RelaySpec:
    """How to start relay ``name`` (a ``RELAYS`` name, perhaps with a policy) with its sockets in ``folder``."""
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
    if base == "limit":
        path = os.path.join(folder, "relay.sock")
        try:
            command = limit_command(path)
        except NoCompiler as exc:
            raise BenchError(str(exc)) from exc
        return RelaySpec(name, command, READY_MARKER, Endpoint("unix", path), Endpoint("unix", path))
    if base in (*JITRELAYS, "raw", "raw-bytes"):
        path = os.path.join(folder, "relay.sock")
        end = Endpoint("unix", path)
        if base == "jitrelay-exec":  # the execution relay's defaults (checksums required, block), journal on
            journal = os.path.join(folder, "journal")
            command = jitrelay_run(path, summary, EXECUTION) + ["--journal-dir", journal]
            command += ["--slow-policy", policy] if policy else []
            end = Endpoint("unix", path, domain=EXECUTION)
            return RelaySpec(name, command, "relay listening on", end, end, summary, journal)
        if base in JITRELAYS:
            command = jitrelay_run(path, summary) + (["--slow-policy", policy] if policy else [])
            command += ["--read-path", READ_PATH_BASELINES[base]] if base in READ_PATH_BASELINES else []
            readers = Endpoint("shm", path) if base == "jitrelay-shm" else end
            return RelaySpec(name, command, "relay listening on", end, readers, summary)
        command = [sys.executable, "-m", "jitrelay.tools.bench.raw_forwarder", "--socket", path]
        command += ["--per-read-bytes"] if base == "raw-bytes" else []
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
    baselines, which write none). Entering raises ``BenchError`` when it exits
    or is not ready within ``STARTUP_SECONDS``.
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
        """Its stderr lines so far."""
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
        """Its memory figures in MiB: peaks sampled while it ran, and VmHWM read before it stopped."""

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
        """Its last ``n`` stderr lines on one line: what a ``BenchError`` about it quotes."""
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
    where any lost message went missing. Raises ``BenchError`` when the
    cluster or a process does not start, or no check message gets through.
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
    with connect(path_b) as checker, connect(path_a) as sender:
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


def connect(path: str) -> socket.socket:
    """A Unix stream socket connected to ``path``; raises ``OSError`` when nothing listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock
