"""One run: one workload against one relay, from starting the relay to the figures of every process.

``run_one`` runs W1, W2, W1f and W3, ``run_fanout`` the fanout workload;
``measure_startup`` times ``jitrelay run`` until it listens. Each run starts
its relay (``relays``) and spawns its workers (``workers``, ``fanout``) in a
``Run``, which kills whatever is left when it ends.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from jitrelay.core import protocol
from jitrelay.tools.bench.fanout import fanout_host
from jitrelay.tools.bench.figures import relay_forwarding, summarize, summarize_fanout
from jitrelay.tools.bench.messages import (
    FILTERED_SUBSCRIBERS,
    STUCK_BATCH,
    STUCK_RATE,
    probe_message,
    share,
    stride_of,
)
from jitrelay.tools.bench.options import BRIDGED, Options
from jitrelay.tools.bench.relays import (
    STARTUP_SECONDS,
    BenchedProcess,
    BenchError,
    RelaySpec,
    bridged_hosts,
    connect,
    jitrelay_run,
    relay_spec,
)
from jitrelay.tools.bench.workers import publish_batches, publish_paced, stuck_subscriber, subscribe, worker

IDLE_SOURCE = 254  # what idle subscribers select: no workload publishes from it


class Run:
    """The worker processes of one run and the reports they send; kills whatever is left on exit."""

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.reports = ctx.Queue()
        self.procs: dict[str, Any] = {}
        self.seen: dict[tuple[str, str], Any] = {}

    def spawn(self, who: str, target: Any, *args: Any) -> None:
        """Start ``target(who, reports, *args)`` in a spawned process named ``who`` (see ``workers.worker``)."""
        proc = self.ctx.Process(target=worker, args=(target, who, self.reports, *args), name=who, daemon=True)
        proc.start()
        self.procs[who] = proc

    def wait_for(self, kind: str, whos: list[str], timeout: float) -> dict[str, Any]:
        """Wait until each of ``whos`` has reported ``kind``; what each reported, by name.

        Raises ``BenchError`` at once on a reported error or a process that
        died, and when ``timeout`` seconds pass first.
        """
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
        """Kill the workers still alive and release the queue."""
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
        for proc in self.procs.values():
            proc.join(2)
        self.reports.close()
        self.reports.join_thread()


@contextlib.contextmanager
def _staged(relay_name: str) -> Iterator[tuple[RelaySpec, Run]]:
    """A run's folder, its relay's spec and its worker processes; the folder removed and the workers killed after."""
    folder = tempfile.mkdtemp(prefix="jitrelay-bench-")
    spec = relay_spec(relay_name, folder)
    run = Run(mp.get_context("spawn"))
    try:
        yield spec, run
    finally:
        run.close()
        shutil.rmtree(folder, ignore_errors=True)


def _timed(
    run: Run, relay: BenchedProcess, start: Any, subs: list[str], opts: Options, sent: Callable[[int], None]
) -> tuple[dict, list[dict], float]:
    """Give the go, tell the subscribers how many were ``sent`` once the publisher is done, and collect.

    Returns the publisher's figures, the subscribers' (in ``subs`` order) and
    the relay's CPU seconds meanwhile; raises ``BenchError`` for a worker that
    fails or takes too long.
    """
    cpu_before = relay.cpu_seconds()
    start.set()
    pub = run.wait_for("result", ["pub"], opts.duration + 60)["pub"]
    sent(pub["sent"])
    results = run.wait_for("result", subs, opts.drain_limit + 10)
    return pub, [results[w] for w in subs], relay.cpu_seconds() - cpu_before


def _about_relay(spec: RelaySpec, relay: BenchedProcess, **more: Any) -> dict:
    """What a run reports of its relay once it has stopped: command, memory, forwarding time, last log lines.

    A journaling relay's run also says how many bytes its journal holds: that the journal was on.
    """
    journal = {} if spec.journal is None else {"journal_bytes": _folder_bytes(spec.journal)}
    return {
        "relay_command": spec.command,
        "relay_memory": relay.memory(),
        "relay_forwarding": relay_forwarding(relay.figures),
        **journal,
        **more,
        "relay_log_tail": list(relay.lines)[-5:],
    }


def _folder_bytes(folder: str) -> int:
    """The bytes of the files in ``folder`` (0 when there is none)."""
    with contextlib.suppress(FileNotFoundError):
        return sum(entry.stat().st_size for entry in os.scandir(folder) if entry.is_file())
    return 0


def _spawn_publisher(run: Run, workload: str, spec: RelaySpec, opts: Options, start: Any) -> None:
    """W1 and W1f's batch publisher, W2's paced one, or W3's paced batches with its stuck subscriber attached."""
    if workload == "w2":
        run.spawn("pub", publish_paced, spec.publish, opts.size, opts.duration, start, opts.rate)
    elif workload == "w3":
        args = (spec.publish, opts.size, opts.duration, start, STUCK_RATE, STUCK_BATCH)
        run.spawn("pub", publish_paced, *args)
        run.spawn("stuck", stuck_subscriber, spec.subscribe, opts.duration + opts.drain_limit + 60)
        run.wait_for("connected", ["stuck"], STARTUP_SECONDS)
    else:
        run.spawn("pub", publish_batches, spec.publish, opts.size, opts.duration, start, stride_of(workload))


def _attach(run: Run, spec: RelaySpec, probe: bytes, subs: list[str]) -> None:
    """Every subscriber has had the probe and the publisher is warm: a stream relay's probe comes from here."""
    run.wait_for("connected", subs, STARTUP_SECONDS)
    if spec.publish.transport == "unix":
        with connect(spec.publish.address) as prober:
            prober.sendall(probe)
            run.wait_for("ready", subs, 10)
        run.wait_for("warm", ["pub"], STARTUP_SECONDS)
    else:  # the zmq publisher sends the probes once warm
        run.wait_for("warm", ["pub"], STARTUP_SECONDS)
        run.wait_for("ready", subs, 10)


def run_one(relay_name: str, workload: str, subscribers: int, opts: Options) -> dict:
    """W1, W2, W1f or W3: start a relay, attach the subscribers, publish, collect every process's figures.

    Raises ``BenchError`` when the relay or a worker fails, hangs or misbehaves.
    """
    with _staged(relay_name) as (spec, run):
        every = stride_of(workload)  # W1f: the publisher cycles through this many types, one per subscriber
        filtered = workload == "w1f"
        if filtered:
            subscribers = FILTERED_SUBSCRIBERS
        expected = [run.ctx.RawValue("q", -1) for _ in range(subscribers)]
        start = run.ctx.Event()
        probe = probe_message(opts.size, every, spec.publish.domain)
        mode = "time" if workload in ("w2", "w3") else "count"
        subs = [f"sub{i}" for i in range(subscribers)]
        if workload == "w3" and relay_name == "raw":  # the ceiling has no slow policy: it never pauses in a run
            spec.command += ["--high", str(1 << 30), "--low", str(1 << 29)]

        def sent(count: int) -> None:
            for k, value in enumerate(expected):
                value.value = share(count, every, k % every)[0]

        notes: dict = {}
        bridged = bridged_hosts(spec, notes) if relay_name in BRIDGED else contextlib.nullcontext()
        with BenchedProcess(relay_name, spec.command, spec.marker, summary=spec.summary) as relay, bridged:
            relay.sample_memory()
            _spawn_publisher(run, workload, spec, opts, start)
            for k, who in enumerate(subs):
                args = (spec.subscribe, opts.size, mode, probe, expected[k], opts.drain_limit)
                run.spawn(who, subscribe, *args, *((k + 1,) if filtered else ()))
            _attach(run, spec, probe, subs)
            idle = idle_subscribers(spec, opts.idle_subscribers if workload == "w1" and relay_name == "jitrelay" else 0)
            pub, results, cpu = _timed(run, relay, start, subs, opts, sent)
            for sock in idle:
                sock.close()
        figures = summarize(relay_name, workload, opts, pub, results, cpu)
        return {**figures, **_about_relay(spec, relay, idle_subscribers=len(idle)), **notes}


def hosting(subscribers: int, hosts: int) -> list[int]:
    """How many of ``subscribers`` each fanout subscriber process holds: spread evenly over at most ``hosts``."""
    hosts = min(subscribers, hosts)
    return [subscribers // hosts + (h < subscribers % hosts) for h in range(hosts)]


def run_fanout(relay_name: str, subscribers: int, opts: Options) -> dict:
    """Fanout: one message every ``fanout_interval_ms``, timed until it has reached every one of ``subscribers``.

    The subscribers live in ``hosting`` processes (``fanout_host``), the
    same for every relay; the publisher is W2's (one message per send),
    stamped with the monotonic clock. Raises ``BenchError`` as ``run_one`` does.
    """
    with _staged(relay_name) as (spec, run):
        counts = hosting(subscribers, opts.fanout_hosts)
        names = [f"host{h}" for h in range(len(counts))]
        expected = run.ctx.RawValue("q", -1)
        start = run.ctx.Event()
        probe = probe_message(opts.size, domain=spec.publish.domain)
        rate = 1000.0 / opts.fanout_interval_ms

        def sent(count: int) -> None:
            expected.value = count

        with BenchedProcess(relay_name, spec.command, spec.marker, summary=spec.summary) as relay:
            relay.sample_memory()
            run.spawn("pub", publish_paced, spec.publish, opts.size, opts.duration, start, rate, 1, True)
            for who, count in zip(names, counts, strict=True):
                run.spawn(who, fanout_host, spec.subscribe, opts.size, count, probe, expected, opts.drain_limit)
            run.wait_for("connected", names, STARTUP_SECONDS)
            with connect(spec.publish.address) as prober:
                prober.sendall(probe)
                run.wait_for("ready", names, STARTUP_SECONDS)
            run.wait_for("warm", ["pub"], STARTUP_SECONDS)
            pub, results, cpu = _timed(run, relay, start, names, opts, sent)
        return {**summarize_fanout(relay_name, opts, pub, results, cpu), **_about_relay(spec, relay)}


def idle_subscribers(spec: RelaySpec, count: int) -> list[socket.socket]:
    """``count`` subscribers on the relay that select nothing (a source no publisher uses), connected and idle."""
    idle = []
    for _ in range(count):
        sock = connect(spec.subscribe.address)
        sock.sendall(protocol.subscribe_message(sources=[IDLE_SOURCE]))
        idle.append(sock)
    if idle:
        time.sleep(0.5)  # the relay has applied their subscriptions before the stream starts
    return idle


def measure_startup(runs: int) -> dict:
    """Seconds from spawning ``jitrelay run market_data`` to its listening line: warm ``runs`` times, then cold.

    The cold run points ``JITRELAY_CACHE_DIR`` and ``NUMBA_CACHE_DIR`` at empty
    folders, so the relay builds its kernel module from scratch; the difference
    is the build a fresh install pays once. The relay's summary file also says
    how long its kernels took to load or build. Raises ``BenchError`` when a
    start fails.
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
    """One start until listening, with its kernels from ``cache_dir`` (empty: built) or the usual cache (None)."""
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
