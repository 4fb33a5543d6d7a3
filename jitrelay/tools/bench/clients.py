"""``jitrelay bench --workloads client``: a Python service's view, one message per call, against pyzmq and nats-py.

The relay workloads (W1, W2) publish in 1 MiB batches and read raw bytes;
this one measures what an application meets: a loop of one ``publish`` per
message, and a loop over a subscriber reading each message's sequence. The
messages are W1's (``--size`` bytes, one type-1 record). In one run:

- **publish**, messages per second over the publisher's own loop (its final
  flush included): ``Publisher.publish([(1, value)])`` inside ``with
  pub.batch():`` (``jitrelay``) and without it (``jitrelay-unbatched``: every
  message written before ``publish`` returns), ``await
  AsyncPublisher.publish(...)`` (``jitrelay-async``) and
  ``AsyncPublisher.publish_nowait(...)`` with ``await pub.flush()`` after
  each 1024 (``jitrelay-async-nowait``); a pyzmq PUB
  ``sock.send(header + body)`` with the header packed by ``struct`` (over
  ipc, no proxy, high-water marks 0 so nothing is lost); nats-py core
  ``await nc.publish(subject, header + body)`` to a local nats-server. A
  jitrelay publisher's messages are read by a raw-socket subscriber that
  only counts bytes, so the subscriber never holds the publisher back.
- **receive**, messages per second from the first message to the last:
  iterating ``Subscriber`` (``AsyncSubscriber``) and reading
  ``view.sequence``, fed by a raw publisher of 1 MiB batches through a
  relay with ``--slow-policy block`` (so the subscriber is the bottleneck
  and is never dropped); pyzmq SUB ``sock.recv()`` reading one byte, once
  while its publisher runs (``pyzmq``: a SUB that keeps pace shows its
  publisher's rate) and once its publisher has finished, draining the
  backlog high-water marks of 0 kept for it (``pyzmq-drain``: its own pace,
  with libzmq's I/O thread having done the socket work beforehand); a
  nats-py subscription's messages reading one byte, while its publisher runs.
- **receive ceiling**: the same loop over views of a 1 MiB batch already in
  memory, in the bench's own process with nothing else running: what
  iterating could reach if receiving cost nothing, set against
  ``pyzmq-drain``.
- **W2 through the clients**: W2 (``--rate`` msg/s, ``--latency-subscribers``
  subscribers) with a default ``Publisher`` and iterating ``Subscriber``s,
  set against the raw-socket W2 of the same run.

Ratios (``x pyzmq``, ``x raw W2``) are what to read: the machine's cores are
shared by the relay, the publisher and the subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import shutil
import struct
import tempfile
import time
from typing import Any

from jitrelay.core import protocol
from jitrelay.core.protocol import MARKET_DATA, SEQUENCE_FIELD
from jitrelay.tools.bench.figures import percentiles
from jitrelay.tools.bench.messages import BATCH_BYTES, probe_message, records_for
from jitrelay.tools.bench.options import Options
from jitrelay.tools.bench.receive import RECV_BUFFER, await_probe
from jitrelay.tools.bench.relays import STARTUP_SECONDS, BenchedProcess, BenchError, connect, jitrelay_run
from jitrelay.tools.bench.runs import Run, run_one
from jitrelay.tools.bench.workers import PROBE_INTERVAL, await_start

SENTINEL = (1 << 64) - 1  # the sequence of the end-of-run message a jitrelay publisher sends
END = b"end"  # what a zmq or NATS publisher sends last: never ``size`` bytes long
SUBJECT = "jitrelay.bench.client"
CHECK_EVERY = 1024  # a publisher looks at the clock once per this many messages
HEADER = struct.Struct("<IBBBBQQII")


def _value(size: int) -> bytes:
    return records_for(size)[0][1]


def _body(size: int) -> bytes:
    """The record part of a W1 message, for publishers that pack the header themselves (zmq, NATS)."""
    value = _value(size)
    return bytes((1, len(value))) + value


# Publishers: each reports "warm", waits for the start, publishes for ``duration`` s, ends with a sentinel.


def pub_jitrelay(who: str, reports: Any, path: str, size: int, duration: float, batched: bool, start: Any) -> dict:
    """Publish: ``Publisher.publish`` per message, inside ``pub.batch()`` when ``batched``.

    Raises ``BenchError`` when no go comes within ``STARTUP_SECONDS``.
    """
    from jitrelay.client import Publisher

    value = _value(size)
    records = [(1, value)]
    with Publisher("market_data", path) as pub:
        reports.put(("warm", who, None))
        await_start(start, None, None)
        sent = 0
        began = time.perf_counter()
        stop_at = began + duration
        with pub.batch() if batched else contextlib.nullcontext():
            while time.perf_counter() < stop_at:
                for _ in range(CHECK_EVERY):
                    pub.publish([(1, value)])
                sent += CHECK_EVERY
        pub.flush()
        elapsed = time.perf_counter() - began
        pub.publish(records, sequence=SENTINEL)
    return {"sent": sent, "elapsed_s": elapsed}


def pub_jitrelay_async(who: str, reports: Any, path: str, size: int, duration: float, nowait: bool, start: Any) -> dict:
    """Publish: ``await AsyncPublisher.publish`` per message.

    With ``nowait``, ``publish_nowait`` per message and ``await pub.flush()``
    after each ``CHECK_EVERY``.
    """
    from jitrelay.client import AsyncPublisher

    value = _value(size)

    async def main() -> dict:
        async with AsyncPublisher("market_data", path) as pub:
            reports.put(("warm", who, None))
            while not start.is_set():
                await asyncio.sleep(0.01)
            sent = 0
            began = time.perf_counter()
            stop_at = began + duration
            while time.perf_counter() < stop_at:
                if nowait:
                    publish = pub.publish_nowait
                    for _ in range(CHECK_EVERY):
                        publish([(1, value)])
                    await pub.flush()  # the burst written out, waiting while the kernel is full: the back-pressure
                else:
                    for _ in range(CHECK_EVERY):
                        await pub.publish([(1, value)])
                sent += CHECK_EVERY
                await asyncio.sleep(0)  # an application's other tasks get their turn
            await pub.flush()
            elapsed = time.perf_counter() - began
            await pub.publish([(1, value)], sequence=SENTINEL)
        return {"sent": sent, "elapsed_s": elapsed}

    return _run_loop(main())


def pub_raw_batches(who: str, reports: Any, path: str, size: int, duration: float, start: Any) -> dict:
    """The receive runs' feeder: W1's 1 MiB batches as fast as the relay takes them, then the sentinel."""
    count = BATCH_BYTES // size
    batch: Any = protocol.build_batch(MARKET_DATA, count, [(1, _value(size))], checksums=False)  # an array: a buffer
    sentinel = protocol.build_message(MARKET_DATA, [(1, _value(size))], sequence=SENTINEL)
    return send_batches(who, reports, path, batch, size, duration, start, sentinel)


def send_batches(
    who: str, reports: Any, path: str, batch: Any, size: int, duration: float, start: Any, sentinel: bytes
) -> dict:
    """Send ``batch`` (messages of ``size`` bytes), renumbered before each send, for ``duration``; then ``sentinel``."""
    from jitrelay import kernels

    count = len(batch) // size
    kernels.stamp_batch(batch, size, 0, 0, checksums=False)  # compile (or load) the kernel before the clock starts
    sock = connect(path)
    sock.sendall(protocol.publish_only_message())
    reports.put(("warm", who, None))
    await_start(start, None, None)
    seq = 0
    began = time.perf_counter()
    while time.perf_counter() < began + duration:
        kernels.stamp_batch(batch, size, seq, time.time_ns(), checksums=False)
        sock.sendall(batch)
        seq += count
    elapsed = time.perf_counter() - began
    sock.sendall(sentinel)
    sock.close()
    return {"sent": seq, "elapsed_s": elapsed}


def pub_zmq(who: str, reports: Any, address: str, size: int, duration: float, start: Any) -> dict:
    """Publish: a pyzmq PUB bound at ``address``, ``send(header + body)`` per message, high-water mark 0."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(address)
    body = _body(size)
    pack = HEADER.pack
    reports.put(("warm", who, None))
    while not start.wait(PROBE_INTERVAL):  # probes until the subscriber has one (slow joiner)
        sock.send(b"probe")
    send = sock.send
    sent = 0
    began = time.perf_counter()
    stop_at = began + duration
    while time.perf_counter() < stop_at:
        for _ in range(CHECK_EVERY):
            send(pack(protocol.MAGIC, MARKET_DATA, 2, 0, 0, sent, time.time_ns(), len(body), 0) + body)
            sent += 1
    elapsed = time.perf_counter() - began
    send(END)
    sock.close()
    ctx.term()  # waits until libzmq has handed everything on
    return {"sent": sent, "elapsed_s": elapsed}


def pub_nats(who: str, reports: Any, url: str, size: int, duration: float, start: Any) -> dict:
    """Publish: nats-py core ``await nc.publish(subject, header + body)`` per message to the server at ``url``."""
    import nats

    body = _body(size)
    pack = HEADER.pack

    async def main() -> dict:
        nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
        reports.put(("warm", who, None))
        while not start.is_set():
            await nc.publish(SUBJECT, b"probe")
            await asyncio.sleep(PROBE_INTERVAL)
        publish = nc.publish
        sent = 0
        began = time.perf_counter()
        stop_at = began + duration
        while time.perf_counter() < stop_at:
            for _ in range(CHECK_EVERY):
                header = pack(protocol.MAGIC, MARKET_DATA, 2, 0, 0, sent, time.time_ns(), len(body), 0)
                await publish(SUBJECT, header + body)
                sent += 1
            await asyncio.sleep(0)  # its flusher task gets its turn, as the asyncio jitrelay publisher's does
        await nc.flush()
        elapsed = time.perf_counter() - began
        await nc.publish(SUBJECT, END)
        await nc.flush()
        await nc.close()
        return {"sent": sent, "elapsed_s": elapsed}

    return _run_loop(main())


# Subscribers: each reports "ready" once it can receive, counts until the sentinel, reports the span.


def sub_raw(who: str, reports: Any, path: str, size: int) -> dict:
    """The publish runs' reader: counts bytes and stops at the sentinel (the last message)."""
    sock = connect(path)
    reports.put(("connected", who, None))
    await_probe(sock, probe_message(size))
    reports.put(("ready", who, None))
    sock.settimeout(STARTUP_SECONDS + 120)
    buf = bytearray(RECV_BUFFER)
    total = 0
    tail = b""
    while True:
        n = sock.recv_into(buf)
        if not n:
            break
        total += n
        tail = (tail + bytes(buf[max(0, n - size) : n]))[-size:]
        if len(tail) == size and SEQUENCE_FIELD.unpack_from(tail, protocol.OFF_SEQUENCE)[0] == SENTINEL:
            break
    return {"received": total // size - 1}


def first_is_probe(batch: Any, size: int) -> None:
    """Raises ``BenchError`` unless a client subscriber's first batch is the probe, alone."""
    if batch is None or batch.tobytes() != probe_message(size):
        raise BenchError("the first bytes received were not the probe message")


def sub_jitrelay(who: str, reports: Any, path: str, size: int) -> dict:
    """Receive: iterate a ``Subscriber``, reading each message's sequence, until the sentinel.

    Raises ``BenchError`` when its first batch is not the probe.
    """
    from jitrelay.client import Subscriber

    with Subscriber("market_data", path) as sub:
        reports.put(("connected", who, None))
        first_is_probe(sub.recv_batch(STARTUP_SECONDS), size)
        reports.put(("ready", who, None))
        received = 0
        first = 0.0
        for view in sub:
            if view.sequence == SENTINEL:
                break
            if not received:
                first = time.perf_counter()
            received += 1
        return {"received": received, "span_s": time.perf_counter() - first}


def sub_jitrelay_async(who: str, reports: Any, path: str, size: int) -> dict:
    """Receive: ``async for`` over an ``AsyncSubscriber``, as ``sub_jitrelay``; raises ``BenchError`` as it does."""
    from jitrelay.client import AsyncSubscriber

    async def main() -> dict:
        async with AsyncSubscriber("market_data", path) as sub:
            reports.put(("connected", who, None))
            first_is_probe(await sub.recv_batch(STARTUP_SECONDS), size)
            reports.put(("ready", who, None))
            received = 0
            first = 0.0
            async for view in sub:
                if view.sequence == SENTINEL:
                    break
                if not received:
                    first = time.perf_counter()
                received += 1
            return {"received": received, "span_s": time.perf_counter() - first}

    return _run_loop(main())


def sub_zmq(who: str, reports: Any, address: str, size: int, wait: float) -> dict:
    """Receive, after ``wait`` seconds (0: while the publisher runs; its duration: draining the backlog it left).

    With high-water marks of 0 the backlog is every message; a SUB that keeps
    pace is measured at its publisher's rate, not its own, so both are given.
    """
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(address)
    sock.setsockopt(zmq.RCVTIMEO, int(STARTUP_SECONDS * 1000))
    if sock.recv() != b"probe":
        raise BenchError("the first frame was not a probe")
    reports.put(("ready", who, None))
    time.sleep(wait)
    recv = sock.recv
    received = 0
    first = 0.0
    while True:
        frame = recv()
        if len(frame) != size:
            if frame == END:
                break
            continue  # a late probe
        frame[8]  # noqa: B018 - read one byte, as an application reads its sequence
        if not received:
            first = time.perf_counter()
        received += 1
    span = time.perf_counter() - first
    sock.close(linger=0)
    ctx.term()
    return {"received": received, "span_s": span}


def sub_nats(who: str, reports: Any, url: str, size: int) -> dict:
    """Receive: a nats-py subscription's messages, one byte read of each, until the end message."""
    import nats

    async def main() -> dict:
        nc = await nats.connect(url)
        sub = await nc.subscribe(SUBJECT, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await nc.flush()
        received = 0
        first = 0.0
        ready = False
        async for msg in sub.messages:
            data = msg.data
            if len(data) != size:
                if data == END:
                    break
                if not ready:
                    reports.put(("ready", who, None))
                    ready = True
                continue
            data[8]  # noqa: B018
            if not received:
                first = time.perf_counter()
            received += 1
        span = time.perf_counter() - first
        await nc.close()
        return {"received": received, "span_s": span}

    return _run_loop(main())


def sub_latency(who: str, reports: Any, path: str, size: int) -> dict:
    """W2 through the client: an iterating ``Subscriber``, receive time minus each message's timestamp.

    Raises ``BenchError`` when its first batch is not the probe.
    """
    import numpy as np

    from jitrelay.client import Subscriber

    latencies: list[int] = []
    with Subscriber("market_data", path) as sub:
        reports.put(("connected", who, None))
        first_is_probe(sub.recv_batch(STARTUP_SECONDS), size)
        reports.put(("ready", who, None))
        for view in sub:
            now = time.time_ns()
            if view.sequence == SENTINEL:
                break
            latencies.append(now - view.timestamp_ns)
    return {"received": len(latencies), "latency_ns": np.asarray(latencies, dtype=np.int64).tobytes()}


def pub_paced(who: str, reports: Any, path: str, size: int, duration: float, rate: float, start: Any) -> dict:
    """W2 through the client: a default ``Publisher`` (each message written before publish returns), paced."""
    from jitrelay.client import Publisher

    value = _value(size)
    with Publisher("market_data", path) as pub:
        reports.put(("warm", who, None))
        await_start(start, None, None)
        total = int(duration * rate)
        interval = 1.0 / rate
        began = time.perf_counter()
        for seq in range(total):
            wait = began + seq * interval - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            pub.publish([(1, value)], sequence=seq)
        elapsed = time.perf_counter() - began
        pub.publish([(1, value)], sequence=SENTINEL)
    return {"sent": total, "elapsed_s": elapsed}


def views_ceiling(size: int, seconds: float = 1.0) -> float:
    """Messages per second of the receive loop over views of a 1 MiB batch already in memory: no socket, no relay.

    What iterating a ``Subscriber`` could reach if receiving cost nothing (the
    same loop as ``sub_jitrelay``), measured in the bench's own process while
    nothing else runs; the best of several passes.
    """
    from jitrelay import kernels
    from jitrelay.core.views import iter_views

    count = BATCH_BYTES // size
    batch = protocol.build_batch(MARKET_DATA, count, [(1, _value(size))], checksums=False)
    kernels.stamp_batch(batch, size, 0, 0, checksums=False)
    data = batch.tobytes()
    best = 0.0
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        began = time.perf_counter()
        received = 0
        for view in iter_views(data):
            if view.sequence == SENTINEL:
                break
            received += 1
        best = max(best, received / (time.perf_counter() - began))
    return best


def _run_loop(coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro)


# Orchestration


def client_run(name: str, pub: tuple, subs: list[tuple], relay_command: list[str] | None, folder: str) -> dict:
    """Start the relay (if any), the subscribers, then the publisher; wait for all; return their reports."""
    ctx = mp.get_context("spawn")
    run = Run(ctx)
    start = ctx.Event()
    names = [f"sub{k}" for k in range(len(subs))]
    relay_ctx = BenchedProcess(name, relay_command, "relay listening on") if relay_command else contextlib.nullcontext()
    try:
        with relay_ctx:
            stream = relay_command is not None
            for who, (target, *args) in zip(names, subs, strict=True):
                run.spawn(who, target, *args)
            if stream:
                run.wait_for("connected", names, STARTUP_SECONDS)
            target, *args = pub
            run.spawn("pub", target, *args, start)
            run.wait_for("warm", ["pub"], STARTUP_SECONDS)
            if relay_command is not None:
                with connect(relay_command[relay_command.index("--socket") + 1]) as prober:
                    prober.sendall(probe_message(pub[2]))
                    run.wait_for("ready", names, STARTUP_SECONDS)
            else:  # the publisher sends probes until it is told to start
                run.wait_for("ready", names, STARTUP_SECONDS)
            start.set()
            published = run.wait_for("result", ["pub"], STARTUP_SECONDS + 600)["pub"]
            received = run.wait_for("result", names, STARTUP_SECONDS + 600)
    finally:
        run.close()
    return {"name": name, "publisher": published, "subscribers": [received[w] for w in names]}


def client_workload(opts: Options) -> dict:
    """Every figure of the ``client`` workload, and its ratios to pyzmq and to the raw-socket W2."""
    size, duration = opts.size, opts.duration
    folder = tempfile.mkdtemp(prefix="jitrelay-bench-client-")
    path = os.path.join(folder, "relay.sock")
    relay = jitrelay_run(path)
    blocking_relay = [*relay, "--slow-policy", "block"]
    runs: dict[str, dict] = {}
    errors: dict[str, str] = {}

    def attempt(key: str, *args: Any) -> None:
        try:
            runs[key] = client_run(key, *args)
        except BenchError as exc:
            errors[key] = str(exc)

    try:
        attempt("publish jitrelay", (pub_jitrelay, path, size, duration, True), [(sub_raw, path, size)], relay, folder)
        attempt(
            "publish jitrelay-unbatched",
            (pub_jitrelay, path, size, duration, False),
            [(sub_raw, path, size)],
            relay,
            folder,
        )
        for key, nowait in (("publish jitrelay-async", False), ("publish jitrelay-async-nowait", True)):
            attempt(key, (pub_jitrelay_async, path, size, duration, nowait), [(sub_raw, path, size)], relay, folder)
        attempt(
            "receive jitrelay",
            (pub_raw_batches, path, size, duration),
            [(sub_jitrelay, path, size)],
            blocking_relay,
            folder,
        )
        attempt(
            "receive jitrelay-async",
            (pub_raw_batches, path, size, duration),
            [(sub_jitrelay_async, path, size)],
            blocking_relay,
            folder,
        )
        zmq_address = f"ipc://{folder}/zmq"
        attempt("pyzmq", (pub_zmq, zmq_address, size, duration), [(sub_zmq, zmq_address, size, 0.0)], None, folder)
        drain = (sub_zmq, zmq_address, size, duration + 1.0)
        attempt("pyzmq-drain", (pub_zmq, zmq_address, size, duration), [drain], None, folder)
        _nats(attempt, size, duration, folder)
        n = opts.latency_count
        attempt(
            "w2 jitrelay client",
            (pub_paced, path, size, duration, opts.rate),
            [(sub_latency, path, size)] * n,
            relay,
            folder,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    try:
        raw_w2 = run_one("jitrelay", "w2", opts.latency_count, opts)
    except BenchError as exc:
        raw_w2 = None
        errors["w2 raw"] = str(exc)
    figures = summarize(runs, raw_w2, errors, opts)
    ceiling = views_ceiling(size)
    figures["receive_ceiling_msg_per_s"] = ceiling
    drain = figures["receive_msg_per_s"]["pyzmq-drain"]
    figures["receive_ceiling_x_pyzmq_drain"] = ceiling / drain if drain else None
    return figures


def _nats(attempt: Any, size: int, duration: float, folder: str) -> None:
    from jitrelay.testing.nats_cluster import NatsCluster, NatsClusterError, nats_server_path

    if nats_server_path() is None:
        return
    try:
        with NatsCluster(1, max_pending=1 << 30) as cluster:
            url = cluster.urls[0]
            attempt("nats", (pub_nats, url, size, duration), [(sub_nats, url, size)], None, folder)
    except NatsClusterError:
        return


def summarize(runs: dict[str, dict], raw_w2: dict | None, errors: dict[str, str], opts: Options) -> dict:
    """The client workload's figures from its runs' reports: rates, ratios to pyzmq, losses, W2 latency."""
    import numpy as np

    def pub_rate(key: str) -> float | None:
        r = runs.get(key)
        return r["publisher"]["sent"] / r["publisher"]["elapsed_s"] if r else None

    def sub_rate(key: str) -> float | None:
        r = runs.get(key)
        if not r:
            return None
        s = r["subscribers"][0]
        return s["received"] / s["span_s"] if s["span_s"] > 0 else None

    def lost(key: str) -> int | None:
        r = runs.get(key)
        return r["publisher"]["sent"] - r["subscribers"][0]["received"] if r else None

    publish = {
        "jitrelay": pub_rate("publish jitrelay"),
        "jitrelay-unbatched": pub_rate("publish jitrelay-unbatched"),
        "jitrelay-async": pub_rate("publish jitrelay-async"),
        "jitrelay-async-nowait": pub_rate("publish jitrelay-async-nowait"),
        "pyzmq": pub_rate("pyzmq"),
        "nats": pub_rate("nats"),
    }
    receive = {
        "jitrelay": sub_rate("receive jitrelay"),
        "jitrelay-async": sub_rate("receive jitrelay-async"),
        "pyzmq": sub_rate("pyzmq"),
        "pyzmq-drain": sub_rate("pyzmq-drain"),
        "nats": sub_rate("nats"),
    }
    zmq_pub, zmq_sub = publish["pyzmq"], receive["pyzmq"]

    def over(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    latency = None
    w2 = runs.get("w2 jitrelay client")
    if w2:
        samples = np.concatenate([np.frombuffer(s.pop("latency_ns"), dtype=np.int64) for s in w2["subscribers"]])
        latency = percentiles(samples / 1e3)
    raw_latency = raw_w2["latency_us"] if raw_w2 else None
    return {
        "message_size": opts.size,
        "publish_msg_per_s": publish,
        "receive_msg_per_s": receive,
        "publish_x_pyzmq": {k: over(v, zmq_pub) for k, v in publish.items()},
        "receive_x_pyzmq": {k: over(v, zmq_sub) for k, v in receive.items()},
        "receive_x_pyzmq_drain": {k: over(v, receive["pyzmq-drain"]) for k, v in receive.items()},
        "lost": {
            k: lost(k)
            for k in ("publish jitrelay", "publish jitrelay-async", "publish jitrelay-async-nowait", "pyzmq", "nats")
        },
        "w2_client_latency_us": latency,
        "w2_raw_latency_us": raw_latency,
        "w2_client_x_raw": (
            {p: over(latency[p], raw_latency[p]) for p in ("p50", "p99", "p99_9")} if latency and raw_latency else None
        ),
        "runs": runs,
        "errors": errors,
    }
