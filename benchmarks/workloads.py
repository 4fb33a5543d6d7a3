"""Workloads W1 (throughput) and W2 (latency) of ARCHITECTURE.md, run against a relay process.

Each run starts its own relay (jitrelay, or the raw-bytes forwarder that is the
ceiling for a Python relay), then one publisher and N subscriber processes.
Subscribers connect first and prove they are attached by receiving a probe
message; only then does the publisher start, so every message it sends should
reach every subscriber, and "lost" means exactly that: sent minus received.

W1: market_data messages of ``--size`` bytes (one type-1 record) published in
1 MiB batches as fast as the publisher can for ``--duration`` seconds. One
batch is built once and renumbered before each send with
``kernels.stamp_batch``. Subscribers count bytes, not messages: messages are
all the same size, so the count is bytes / size. Per read they check the one
header that starts in it (magic and sequence), and at the end that the last
sequence received is the number sent minus one.

W2: ``--rate`` messages per second, one message per send, each stamped with
``time.time_ns()`` at send; subscribers take one ``time.time_ns()`` per read
and record receive time minus header timestamp for every message in it.

The machine's cores are shared by the relay, the publisher and the
subscribers, so absolute figures depend on scheduling; compare relays in the
same run (``--relay raw,jitrelay``) and read the ratios.

    python benchmarks/workloads.py --relay raw,jitrelay --duration 5 --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
BATCH_BYTES = 1 * MiB
RECV_BUFFER = 4 * MiB
POLL_SECONDS = 0.2  # subscriber socket timeout: how often it looks at the control values while idle
IDLE_SECONDS = 1.0  # after the publisher is done, a subscriber silent this long has received all it will
STARTUP_SECONDS = 60.0  # relay ready, processes spawned and connected (first run may compile kernels)
MAGIC = 0xDEADBEEF
MARKET_DATA = 1
PROBE_SEQUENCE = (1 << 64) - 1

RELAYS = {
    "jitrelay": (
        "relay listening on",
        lambda path: [sys.executable, "-m", "jitrelay", "run", "market_data", "--socket", path],
    ),
    "raw": (
        "raw forwarder listening on",
        lambda path: [sys.executable, str(HERE / "raw_forwarder.py"), "--socket", path],
    ),
}
WORKLOADS = ("w1", "w2")

_HEAD = struct.Struct("<I")
_SEQ = struct.Struct("<Q")
_SEQ_TS = struct.Struct("<QQ")


class BenchError(RuntimeError):
    """A run that could not produce figures: a process died, hung or misbehaved."""


# Messages


def records_for(size: int) -> list[tuple[int, bytes]]:
    """One type-1 record that makes a message exactly ``size`` bytes long."""
    # header 32 + type + length; past 255 value bytes, an extended record: 255, 0, type, length (2)
    value = size - 34 if size - 34 <= 255 else size - 37
    if value < 0 or value > 65535:
        raise ValueError(f"message size {size} is outside 34..{37 + 65535}")
    return [(1, b"\x5a" * value)]


def probe_message() -> bytes:
    from jitrelay import protocol

    return protocol.build_message(MARKET_DATA, [(1, b"probe")], sequence=PROBE_SEQUENCE, timestamp_ns=0)


# Worker processes (spawned; they report on one shared queue as (kind, who, payload))


try:
    _PRCTL = ctypes.CDLL(None).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the benchmark process dies, so nothing outlives a crash."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _worker(target: Any, who: str, reports: Any, *args: Any) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark process decides when to stop
    try:
        reports.put(("result", who, target(who, reports, *args)))
    except BaseException:
        reports.put(("error", who, traceback.format_exc()))


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


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


def subscribe(
    who: str, reports: Any, path: str, size: int, mode: str, probe: bytes, expected: Any, limit_s: float
) -> dict:
    """Attach, wait for the probe, then count (W1) or time (W2) messages until all sent have arrived."""
    sock = _connect(path)
    reports.put(("connected", who, None))
    sock.settimeout(STARTUP_SECONDS)
    if _read_exactly(sock, len(probe)) != probe:
        raise BenchError("the first bytes received were not the probe message")
    reports.put(("ready", who, None))
    sock.settimeout(POLL_SECONDS)
    cpu = time.process_time()
    result = _count(sock, size, expected, limit_s) if mode == "count" else _time(sock, size, expected, limit_s)
    result["cpu_s"] = time.process_time() - cpu
    return result


class _Ending:
    """When a subscriber stops: the stream went quiet after the publisher finished, or time ran out."""

    def __init__(self, expected: Any, limit_s: float):
        self.expected = expected
        self.deadline = time.monotonic() + limit_s
        self.quiet_since = time.monotonic()
        self.known_at: float | None = None

    def data(self) -> None:
        self.quiet_since = time.monotonic()

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


def _count(sock: socket.socket, size: int, expected: Any, limit_s: float) -> dict:
    buf = bytearray(RECV_BUFFER)
    view = memoryview(buf)
    keep = 2 * size
    tail = b""
    total = first_ns = last_ns = 0
    seq_shift = gaps = bad_magic = 0
    ending = _Ending(expected, limit_s)
    stop = None
    while stop is None:
        try:
            n = sock.recv_into(buf)
        except TimeoutError:
            stop = ending.on_timeout(total // size)
            continue
        if n == 0:
            stop = "closed by relay"
            break
        last_ns = time.monotonic_ns()
        if not total:
            first_ns = last_ns
        # The one message header that starts in this read, if it is whole: magic and sequence.
        skip = -total % size
        if skip + 16 <= n:
            index = (total + skip) // size
            if _HEAD.unpack_from(buf, skip)[0] != MAGIC:
                bad_magic += 1
            else:
                seq = _SEQ.unpack_from(buf, skip + 8)[0]
                if seq != index + seq_shift:
                    gaps += 1
                    seq_shift = seq - index
        tail = bytes(view[n - keep : n]) if n >= keep else (tail + bytes(view[:n]))[-keep:]
        total += n
        ending.data()
        if 0 <= expected.value * size <= total:
            stop = "all received"
    received, partial = divmod(total, size)
    last_seq = _SEQ.unpack_from(tail, len(tail) - partial - size + 8)[0] if received else None
    return {
        "received": received,
        "partial_bytes": partial,
        "first_to_last_s": (last_ns - first_ns) / 1e9,
        "last_sequence": last_seq,
        "sequence_gaps": gaps,
        "bad_magic": bad_magic,
        "stop": stop,
    }


def _time(sock: socket.socket, size: int, expected: Any, limit_s: float) -> dict:
    import numpy as np

    buf = bytearray(RECV_BUFFER)
    view = memoryview(buf)
    latencies: list[int] = []
    carry = b""
    received = next_seq = gaps = bad_magic = 0
    ending = _Ending(expected, limit_s)
    stop = None
    while stop is None:
        try:
            n = sock.recv_into(buf)
        except TimeoutError:
            stop = ending.on_timeout(received)
            continue
        now_ns = time.time_ns()
        if n == 0:
            stop = "closed by relay"
            break
        data = carry + bytes(view[:n]) if carry else view[:n]
        whole = len(data) // size
        for k in range(whole):
            pos = k * size
            if _HEAD.unpack_from(data, pos)[0] != MAGIC:
                bad_magic += 1
                continue
            seq, sent_ns = _SEQ_TS.unpack_from(data, pos + 8)
            latencies.append(now_ns - sent_ns)
            if seq != next_seq:
                gaps += 1
            next_seq = seq + 1
        carry = bytes(data[whole * size :])
        received += whole
        ending.data()
        if 0 <= expected.value <= received:
            stop = "all received"
    return {
        "received": received,
        "partial_bytes": len(carry),
        "last_sequence": next_seq - 1 if received else None,
        "sequence_gaps": gaps,
        "bad_magic": bad_magic,
        "stop": stop,
        "latency_ns": np.asarray(latencies, dtype=np.int64).tobytes(),
    }


def publish_batches(who: str, reports: Any, path: str, size: int, duration: float, start: Any) -> dict:
    """W1 publisher: 1 MiB batches, renumbered before each send, as fast as the relay takes them."""
    from jitrelay import kernels, protocol

    count = BATCH_BYTES // size
    batch = protocol.build_batch(MARKET_DATA, count, records_for(size), checksums=False)
    kernels.stamp_batch(batch, size, 0, 0, checksums=False)  # compile or load before the clock starts
    reports.put(("warm", who, None))
    if not start.wait(STARTUP_SECONDS):
        raise BenchError("never told to start")
    sock = _connect(path)
    seq = 0
    cpu = time.process_time()
    began = time.monotonic()
    end = began + duration
    while time.monotonic() < end:
        kernels.stamp_batch(batch, size, seq, time.time_ns(), checksums=False)
        sock.sendall(batch)
        seq += count
    elapsed = time.monotonic() - began
    sock.close()
    return {"sent": seq, "elapsed_s": elapsed, "cpu_s": time.process_time() - cpu, "batch_messages": count}


def publish_paced(who: str, reports: Any, path: str, size: int, duration: float, start: Any, rate: float) -> dict:
    """W2 publisher: one message per send at ``rate`` per second, stamped with its send time."""
    from jitrelay import protocol

    message = bytearray(protocol.build_message(MARKET_DATA, records_for(size), timestamp_ns=0))
    reports.put(("warm", who, None))
    if not start.wait(STARTUP_SECONDS):
        raise BenchError("never told to start")
    sock = _connect(path)
    interval = 1.0 / rate
    total = int(duration * rate)
    began = time.perf_counter()
    late = 0
    cpu = time.process_time()
    for seq in range(total):
        wait = began + seq * interval - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        elif wait < -interval:
            late += 1
        _SEQ_TS.pack_into(message, 8, seq, time.time_ns())
        sock.sendall(message)
    elapsed = time.perf_counter() - began
    sock.close()
    return {"sent": total, "elapsed_s": elapsed, "cpu_s": time.process_time() - cpu, "sent_late": late}


# The relay process


class RelayProcess:
    """A relay started as a child process, ready once its stderr says so; always stopped on exit."""

    def __init__(self, spec: str, path: str):
        self.name = spec
        self.path = path
        name, _, policy = spec.partition(":")
        self.marker, command = RELAYS[name]
        self.command = command(path) + (["--slow-policy", policy] if policy else [])
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.ready = threading.Event()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> RelayProcess:
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + STARTUP_SECONDS
        while not self.ready.wait(0.05):
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not ready after {STARTUP_SECONDS:.0f} s: {self.log_tail()}")
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            if self.marker in line:
                self.ready.set()

    def cpu_seconds(self) -> float:
        """User plus system CPU time the relay has used so far."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, n: int = 10) -> str:
        return " | ".join(list(self.lines)[-n:])

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        time.sleep(0.05)  # let the drain thread read the last lines


# One run


class Run:
    """The processes of one run and the reports they send; kills whatever is left on exit."""

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


def run_one(relay_spec: str, workload: str, subscribers: int, args: argparse.Namespace) -> dict:
    """Start a relay, attach the subscribers, publish, collect every process's figures."""
    folder = tempfile.mkdtemp(prefix="jitrelay-bench-")
    path = os.path.join(folder, "relay.sock")
    ctx = mp.get_context("spawn")
    run = Run(ctx)
    expected = ctx.RawValue("q", -1)
    start = ctx.Event()
    probe = probe_message()
    mode = "count" if workload == "w1" else "time"
    subs = [f"sub{i}" for i in range(subscribers)]
    try:
        with RelayProcess(relay_spec, path) as relay:
            if workload == "w1":
                run.spawn("pub", publish_batches, path, args.size, args.duration, start)
            else:
                run.spawn("pub", publish_paced, path, args.size, args.duration, start, args.rate)
            for who in subs:
                run.spawn(who, subscribe, path, args.size, mode, probe, expected, args.duration + 10)
            run.wait_for("connected", subs, STARTUP_SECONDS)
            with _connect(path) as prober:
                prober.sendall(probe)
                run.wait_for("ready", subs, 10)
            run.wait_for("warm", ["pub"], STARTUP_SECONDS)
            cpu_before = relay.cpu_seconds()
            start.set()
            pub = run.wait_for("result", ["pub"], args.duration + 10)["pub"]
            expected.value = pub["sent"]
            results = run.wait_for("result", subs, 10)
            cpu = relay.cpu_seconds() - cpu_before
        return summarize(relay_spec, workload, args, pub, [results[w] for w in subs], cpu, relay.log_tail(5))
    finally:
        run.close()
        shutil.rmtree(folder, ignore_errors=True)


def summarize(relay: str, workload: str, args: argparse.Namespace, pub: dict, subs: list[dict], cpu: float, log: str):
    import numpy as np

    sent = pub["sent"]
    for sub in subs:
        sub["lost"] = sent - sub["received"]
        sub["last_sequence_ok"] = sub["last_sequence"] == sent - 1
    figures: dict[str, Any] = {
        "relay": relay,
        "relay_command": " ".join(RelayProcess(relay, "SOCKET").command),
        "workload": workload,
        "subscribers": len(subs),
        "message_size": args.size,
        "duration_s": args.duration,
        "publisher": pub,
        "publisher_msg_per_s": sent / pub["elapsed_s"],
        "relay_cpu_s": cpu,
        "relay_cpu_percent": 100 * cpu / pub["elapsed_s"],
        "publisher_cpu_percent": 100 * pub["cpu_s"] / pub["elapsed_s"],
        "subscriber_cpu_percent": [100 * s["cpu_s"] / pub["elapsed_s"] for s in subs],
        "relay_log_tail": log,
        "per_subscriber": subs,
        "lost": [s["lost"] for s in subs],
    }
    if workload == "w1":
        for sub in subs:
            span = sub["first_to_last_s"]
            sub["msg_per_s"] = sub["received"] / span if span > 0 else 0.0
            sub["mb_per_s"] = sub["msg_per_s"] * args.size / 1e6
        rates = [s["msg_per_s"] for s in subs]
        figures["delivered_msg_per_s"] = rates
        figures["delivered_msg_per_s_mean"] = float(np.mean(rates))
        figures["delivered_mb_per_s_mean"] = float(np.mean(rates)) * args.size / 1e6
    else:
        figures["rate"] = args.rate
        samples = np.concatenate([np.frombuffer(s.pop("latency_ns"), dtype=np.int64) for s in subs])
        figures["latency_samples"] = int(samples.size)
        if samples.size:
            us = samples / 1e3
            p50, p99, p999 = np.percentile(us, [50, 99, 99.9])
            figures.update(p50_us=p50, p99_us=p99, p99_9_us=p999, max_us=float(us.max()), mean_us=float(us.mean()))
    return figures


# Reporting


def machine() -> dict:
    model = ""
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
        **{dist: version(dist) for dist in ("numpy", "numba", "uvloop", "jitrelay")},
    }


def _m(x: float) -> str:
    return f"{x / 1e6:.2f} M"


def _cpu(run: dict) -> str:
    subs = run["subscriber_cpu_percent"]
    return f"{run['relay_cpu_percent']:.0f}/{run['publisher_cpu_percent']:.0f}/{sum(subs) / len(subs):.0f}"


def print_table(runs: list[dict], args: argparse.Namespace, info: dict) -> None:
    print(f"\n{info['cores']} cores, {info['cpu_model']}, Python {info['python']}, numba {info['numba']}")
    w1 = [r for r in runs if r["workload"] == "w1"]
    w2 = [r for r in runs if r["workload"] == "w2"]
    if w1:
        print(f"\nW1 throughput: {args.size}-byte messages in 1 MiB batches, {args.duration:g} s (MB = 10^6 bytes)")
        print(
            f"{'relay':<19} {'subs':>4} {'published/s':>12} {'delivered/s per sub':>20} {'MB/s per sub':>13} "
            f"{'CPU% relay/pub/sub':>18}  lost per subscriber"
        )
        for r in w1:
            rates = r["delivered_msg_per_s"]
            each = _m(sum(rates) / len(rates)) + (f" (min {min(rates) / 1e6:.2f})" if len(rates) > 1 else "")
            flags = "" if all(s["last_sequence_ok"] for s in r["per_subscriber"]) else "  last sequence mismatch"
            closed = sum(s["stop"] == "closed by relay" for s in r["per_subscriber"])
            flags += f"  {closed} closed by relay" if closed else ""
            print(
                f"{r['relay']:<19} {r['subscribers']:>4} {_m(r['publisher_msg_per_s']):>12} {each:>20} "
                f"{r['delivered_mb_per_s_mean']:>13.0f} {_cpu(r):>18}  {r['lost']}{flags}"
            )
    if w2:
        print(f"\nW2 latency: {args.size}-byte messages at {args.rate:g}/s, {args.duration:g} s, one-way, microseconds")
        head = f"{'relay':<19} {'subs':>4} {'samples':>8} {'p50':>8} {'p99':>8} {'p99.9':>8} {'max':>9}"
        print(head + f" {'CPU% relay/pub/sub':>18}  lost per subscriber")
        for r in w2:
            if "p50_us" not in r:
                print(f"{r['relay']:<19} {r['subscribers']:>4} {0:>8}  no messages received  {r['lost']}")
                continue
            print(
                f"{r['relay']:<19} {r['subscribers']:>4} {r['latency_samples']:>8} {r['p50_us']:>8.1f} "
                f"{r['p99_us']:>8.1f} {r['p99_9_us']:>8.1f} {r['max_us']:>9.1f} {_cpu(r):>18}  {r['lost']}"
            )


def ratios(runs: list[dict]) -> dict:
    """Each relay's figures over the raw forwarder's on the same workload, when both ran."""
    base = {(r["workload"], r["subscribers"]): r for r in runs if r["relay"] == "raw"}
    out = {}
    for r in runs:
        b = base.get((r["workload"], r["subscribers"]))
        if r["relay"] == "raw" or b is None:
            continue
        key = f"{r['relay']}/raw {r['workload']} {r['subscribers']} sub"
        if r["workload"] == "w1" and b["delivered_msg_per_s_mean"]:
            out[key] = {"delivered_msg_per_s": r["delivered_msg_per_s_mean"] / b["delivered_msg_per_s_mean"]}
        elif r["workload"] == "w2" and "p50_us" in r and "p50_us" in b:
            out[key] = {p: r[p] / b[p] for p in ("p50_us", "p99_us", "p99_9_us")}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--relay",
        default="raw",
        help="comma-separated: raw, jitrelay, or jitrelay:POLICY to pass --slow-policy POLICY (block, disconnect)",
    )
    parser.add_argument("--workload", default="w1,w2", help="comma-separated: w1, w2")
    parser.add_argument("--subscribers", default="1,4", help="W1 subscriber counts, comma-separated")
    parser.add_argument("--latency-subscribers", type=int, default=4, help="W2 subscriber count")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of publishing per run")
    parser.add_argument("--size", type=int, default=71, help="message size in bytes")
    parser.add_argument("--rate", type=float, default=5000.0, help="W2 messages per second")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args(argv)
    relays = [r.strip() for r in args.relay.split(",") if r.strip()]
    workloads = [w.strip().lower() for w in args.workload.split(",") if w.strip()]
    counts = [int(n) for n in args.subscribers.split(",") if n.strip()]
    for spec in relays:
        name, _, policy = spec.partition(":")
        if name not in RELAYS or (policy and (name != "jitrelay" or policy not in ("block", "disconnect"))):
            parser.error(f"unknown relay {spec!r}; choose from raw, jitrelay, jitrelay:block, jitrelay:disconnect")
    for name in workloads:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    try:
        records_for(args.size)
    except ValueError as exc:
        parser.error(str(exc))

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    plan = [("w1", n) for n in counts if "w1" in workloads]
    plan += [("w2", args.latency_subscribers)] if "w2" in workloads else []
    runs: list[dict] = []
    failed = False
    for workload, n in plan:  # relays side by side on each workload, so drift on a shared machine hits both
        for relay in relays:
            print(f"running {relay} {workload} with {n} subscriber(s) ...", file=sys.stderr, flush=True)
            try:
                runs.append(run_one(relay, workload, n, args))
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                return 130
            except BenchError as exc:
                failed = True
                print(f"  {relay} {workload} {n} failed: {exc}", file=sys.stderr, flush=True)
    info = machine()
    print_table(runs, args, info)
    report = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
    report["ratios"] = ratios(runs)
    for key, value in report["ratios"].items():
        print(f"{key}: " + ", ".join(f"{k} {v:.2f}" for k, v in value.items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nfigures written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
