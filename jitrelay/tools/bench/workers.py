"""The worker processes of a run: the publishers and the subscribers, each spawned and run through ``worker``.

A worker reports on the run's one queue as ``(kind, who, payload)``:
``connected``, ``ready`` (a subscriber that has had the probe), ``warm`` (a
publisher waiting for the go), then ``result`` with its figures, or
``error`` with the traceback of whatever it raised.
"""

from __future__ import annotations

import signal
import socket
import time
import traceback
from typing import Any

from jitrelay.core import protocol
from jitrelay.core.protocol import OFF_SEQUENCE, SEQUENCE_TIMESTAMP_FIELDS
from jitrelay.testing.processes import die_with_parent
from jitrelay.tools.bench.messages import (
    BATCH_BYTES,
    FILTERED_SUBSCRIBERS,
    checksummed,
    first_type,
    probe_message,
    records_for,
    stamp_checksum,
)
from jitrelay.tools.bench.receive import (
    MappedReads,
    Reads,
    await_probe,
    count_messages,
    mapped_await_probe,
    shared_subscriber,
    time_messages,
    zmq_await_probe,
    zmq_receive,
)
from jitrelay.tools.bench.relays import STARTUP_SECONDS, BenchError, Endpoint, connect

PROBE_INTERVAL = 0.05  # seconds between the zmq publisher's probes


def worker(target: Any, who: str, reports: Any, *args: Any) -> None:
    """A spawned process's body: ``target(who, reports, *args)``, its result or its traceback put on ``reports``.

    Raises nothing: whatever ``target`` raises is reported as ``error``.
    """
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark process decides when to stop
    try:
        reports.put(("result", who, target(who, reports, *args)))
    except BaseException:
        reports.put(("error", who, traceback.format_exc()))


def zmq_socket(kind: str, end: Endpoint) -> Any:
    """A connected PUB (``kind="pub"``) or SUB socket, subscribed to everything, with the endpoint's HWM."""
    import zmq

    sock: Any = zmq.Context.instance().socket(zmq.PUB if kind == "pub" else zmq.SUB)
    if end.hwm is not None:
        sock.setsockopt(zmq.SNDHWM if kind == "pub" else zmq.RCVHWM, end.hwm)
    if kind == "sub":
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(end.address)
    return sock


def zmq_flush(sock: Any) -> None:
    """Close a PUB socket and wait until libzmq has handed every queued frame on.

    Closing alone returns at once, and a process that exits then takes the
    frames still queued in libzmq's I/O thread with it.
    """
    sock.close()  # LINGER -1: the context's term waits for the queue to empty
    sock.context.term()


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
        sock = zmq_socket("sub", end)
        reports.put(("connected", who, None))
        zmq_await_probe(sock, probe)
    elif end.transport == "shm":
        sock = shared_subscriber(end.address, tlv_types=None if tlv_type is None else [tlv_type])
        reports.put(("connected", who, None))  # granted: it reads the log from shared memory from here on
        mapped_await_probe(sock, probe)
    else:
        sock = connect(end.address)
        if tlv_type is not None:
            sock.sendall(protocol.subscribe_message(tlv_types=[tlv_type]))
        reports.put(("connected", who, None))
        await_probe(sock, probe)
    reports.put(("ready", who, None))
    cpu = time.process_time()
    if end.transport == "zmq":
        result = zmq_receive(sock, size, mode == "time", expected, limit_s)
    else:
        reads = MappedReads if end.transport == "shm" else Reads
        if mode == "count":
            stride = 1 if tlv_type is None else FILTERED_SUBSCRIBERS
            result = count_messages(
                reads, sock, size, expected, limit_s, stride, 0 if tlv_type is None else tlv_type - 1
            )
        else:
            result = time_messages(reads, sock, size, expected, limit_s)
    result["cpu_s"] = time.process_time() - cpu
    if end.transport == "shm":
        sock.close()
    return result


def await_start(start: Any, sock: Any, probe: bytes | None) -> None:
    """Wait for the go; a zmq publisher meanwhile repeats the probe so that late subscriptions catch one.

    Raises ``BenchError`` when no go comes within ``STARTUP_SECONDS``.
    """
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

    Its messages are of the endpoint's domain and carry the domain's first
    TLV type; with ``types`` > 1 (W1f) message ``k`` carries the type ``k % types``
    after it. Where the relay verifies checksums, each send's restamp refills them.
    A zmq publisher sends the same batch one message per frame.
    """
    from jitrelay import kernels

    count = BATCH_BYTES // size // types * types  # whole cycles, so the types follow the sequence numbers
    domain, first = end.domain, first_type(end.domain)
    checksums = checksummed(domain)
    value = records_for(size, domain)[0][1]
    cycle = [[(tlv_type, value)] for tlv_type in range(first, first + types)]
    batch: Any = protocol.build_cycled_batch(domain, count, cycle, checksums=False)  # an array: a buffer
    kernels.stamp_batch(batch, size, 0, 0, checksums=checksums)  # compile or load before the clock starts
    zmq_sock = zmq_socket("pub", end) if end.transport == "zmq" else None
    sock: Any = None
    reports.put(("warm", who, None))
    if zmq_sock is not None:
        await_start(start, zmq_sock, probe_message(size, domain=domain))
        frames = [memoryview(batch)[i * size : (i + 1) * size] for i in range(count)]
        send = zmq_sock.send
    else:
        await_start(start, None, None)
        sock = connect(end.address)
    seq = 0
    cpu = time.process_time()
    began = time.monotonic()
    stop_at = began + duration
    while time.monotonic() < stop_at:
        kernels.stamp_batch(batch, size, seq, time.time_ns(), checksums=checksums)
        if zmq_sock is not None:
            for frame in frames:
                send(frame)  # copied into a zmq message at once, so restamping the batch is safe
        else:
            sock.sendall(batch)
        seq += count
    elapsed = time.monotonic() - began
    cpu = time.process_time() - cpu
    close_publisher(zmq_sock, sock)
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

    Each send has its slot on a fixed schedule, and its messages carry the
    slot's time, not the time they went out: a publisher held up (by a relay
    that stopped reading it, or by the scheduler) still counts the delay in
    every message it sends late, so the latencies have no coordinated
    omission. The stamps are on ``time.time_ns()``'s clock, or with
    ``monotonic`` (fanout) ``time.monotonic_ns()``'s: CLOCK_MONOTONIC, the
    clock every process on the machine shares. How late each send went out
    after its slot is in the result (``late_us``): the publisher's own share.
    The messages are of the endpoint's domain; where its relay verifies
    checksums, each is refilled once the stamp is in.
    """
    stamp = time.monotonic_ns if monotonic else time.time_ns
    domain = end.domain
    checksums = checksummed(domain)
    message = bytearray(protocol.build_message(domain, records_for(size, domain), timestamp_ns=0) * batch)
    zmq_sock = zmq_socket("pub", end) if end.transport == "zmq" else None
    sock = None
    reports.put(("warm", who, None))
    if zmq_sock is not None:
        await_start(start, zmq_sock, probe_message(size, domain=domain))
        send = zmq_sock.send
    else:
        await_start(start, None, None)
        sock = connect(end.address)
        send = sock.sendall
    if batch > 1:  # a batch is stamped by the kernel, every message with the send time
        import numpy as np

        from jitrelay import kernels

        view = np.frombuffer(message, dtype=np.uint8)
    interval = batch / rate
    sends = int(duration * rate / batch)
    lateness = [0.0] * sends
    began, began_ns = time.perf_counter(), stamp()  # the schedule's start on both clocks
    late = 0
    cpu = time.process_time()
    for k in range(sends):
        wait = began + k * interval - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        elif wait < -interval:
            late += 1
        slot_ns = began_ns + round(k * interval * 1e9)
        if batch == 1:
            SEQUENCE_TIMESTAMP_FIELDS.pack_into(message, OFF_SEQUENCE, k, slot_ns)
            if checksums:
                stamp_checksum(message)
        else:
            kernels.stamp_batch(view, size, k * batch, slot_ns)  # checksums refilled too, for every domain
        lateness[k] = time.perf_counter() - began - k * interval
        send(message)
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu
    close_publisher(zmq_sock, sock)
    return {"sent": sends * batch, "elapsed_s": elapsed, "cpu_s": cpu, "sent_late": late, "late_us": _late(lateness)}


def _late(lateness: list[float]) -> dict:
    """How long after their slots the sends went out (seconds in), in microseconds: p50, p99, max."""
    import numpy as np

    if not lateness:
        return {"p50": None, "p99": None, "max": None}
    p50, p99 = np.percentile(lateness, [50, 99]) * 1e6
    return {"p50": float(p50), "p99": float(p99), "max": float(max(lateness)) * 1e6}


def stuck_subscriber(who: str, reports: Any, end: Endpoint, hold_s: float) -> dict:
    """W3's stuck subscriber: connects, never reads (a strategy in a long pause), and holds on until killed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(end.address)
    reports.put(("connected", who, None))
    time.sleep(hold_s)
    sock.close()
    return {}


def close_publisher(zmq_sock: Any, sock: Any) -> None:
    """Close a publisher's socket: a zmq one once libzmq has handed every frame on."""
    if zmq_sock is not None:
        zmq_flush(zmq_sock)
    else:
        sock.close()
