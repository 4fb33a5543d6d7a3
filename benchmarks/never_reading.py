"""Publishers that never read their socket, as every Torq service: does the relay keep them, and everyone whole?

Two publisher processes connect, publish ``--mib`` MiB each and never read
(what the relay sends them piles up unread); one subscriber process reads
everything. The script reports, per relay domain: whether each publisher
finished or was cut off, how much of both streams the subscriber received,
how long it took, and the relay's own count of what it did not send each
publisher (its summary file), against what each publisher finds in its socket
when it finally drains it. A stall shows as the ``--timeout`` running out.

    python benchmarks/never_reading.py [--domains market_data,execution] [--mib 50]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import select
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event
from pathlib import Path

from jitrelay.core import protocol
from jitrelay.testing.relay import RelayProcess

VALUE = 200  # bytes of the one record of every message
TLV = {"market_data": 1, "signal": 20, "execution": 40, "system": 100}


def stream(domain: str, source: int, count: int) -> bytes:
    """``count`` messages of publisher ``source``: checksummed, so that every domain's policy takes them."""
    domain_id = protocol.DOMAIN_IDS[domain]
    records = [(TLV[domain], bytes([source]) * VALUE)]
    return protocol.build_batch(domain_id, count, records, source=source, timestamp_ns=1).tobytes()


def publisher(path: str, data: bytes, both: Event, start: Event, results: multiprocessing.Queue) -> None:
    """Connect, publish everything without reading a byte, then drain the socket and count what was sent to it."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    both.wait()  # the relay has both: each is due every message of the other
    sock.sendall(data[: len(data) // 1000])  # a first batch, so that both are publishers before either floods
    start.wait()
    began = time.monotonic()
    try:
        sock.sendall(data[len(data) // 1000 :])
        outcome = "finished"
    except OSError as exc:
        outcome = f"cut off ({type(exc).__name__})"
    seconds = time.monotonic() - began
    # until nothing more comes for a second
    drained = read_while(sock, lambda _: bool(select.select([sock], [], [], 1.0)[0]), ConnectionResetError)
    results.put((os.getpid(), outcome, seconds, drained))
    sock.close()


def read_while(sock: socket.socket, more: Callable[[int], bool], stops: type[OSError]) -> int:
    """Read ``sock`` while ``more(bytes read so far)`` holds, until it closes or raises ``stops``; the bytes read."""
    got = 0
    with contextlib.suppress(stops):
        while more(got):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
    return got


def subscriber(path: str, total: int, timeout: float, results: multiprocessing.Queue) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    sock.settimeout(timeout)
    began = time.monotonic()
    got = read_while(sock, lambda got: got < total, TimeoutError)
    results.put(("subscriber", got, time.monotonic() - began))


def run(domain: str, mib: int, timeout: float) -> dict:
    count = mib * (1 << 20) // (protocol.HEADER_SIZE + 2 + VALUE)
    streams = [stream(domain, source, count) for source in (1, 2)]
    folder = Path(tempfile.mkdtemp(prefix="jr-never-reading-"))
    summary = folder / "figures.json"
    relay = RelayProcess(domain, folder / f"{domain}.sock", summary_file=summary)
    relay.wait_ready()
    results: multiprocessing.Queue = multiprocessing.Queue()
    start = multiprocessing.Event()
    both = multiprocessing.Event()
    path = str(relay.socket_path)
    reader = multiprocessing.Process(target=subscriber, args=(path, sum(map(len, streams)), timeout, results))
    reader.start()
    time.sleep(0.3)
    publishers = [multiprocessing.Process(target=publisher, args=(path, s, both, start, results)) for s in streams]
    for p in publishers:
        p.start()
    for p in publishers:
        relay.wait_line("connected", f"pid={p.pid} uid=", timeout=10)
    both.set()
    time.sleep(0.3)
    start.set()
    answers = [results.get(timeout=timeout + 10) for _ in range(3)]
    for p in [reader, *publishers]:
        p.join(10)
    relay.stop()
    figures = json.loads(summary.read_text())
    _, received, reader_seconds = next(a for a in answers if a[0] == "subscriber")
    pubs = sorted(a for a in answers if a[0] != "subscriber")
    message = protocol.HEADER_SIZE + 2 + VALUE
    return {
        "domain": domain,
        "publishers": [{"outcome": o, "seconds": round(s, 2), "drained_messages": d // message} for _, o, s, d in pubs],
        "delivered": received / sum(map(len, streams)),
        "subscriber_seconds": round(reader_seconds, 2),
        "relay_not_sent_messages": figures.get("unread_messages"),
        "expected_not_sent_messages": sum(count - d // message for _, _, _, d in pubs),
        "slow_disconnects": figures.get("slow_actions", {}).get("disconnect"),
        "holds": figures.get("slow_actions", {}).get("hold"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", default="market_data,execution")
    parser.add_argument("--mib", type=int, default=50, help="MiB each publisher sends")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a run counts as stalled")
    args = parser.parse_args()
    for domain in args.domains.split(","):
        print(json.dumps(run(domain, args.mib, args.timeout)))


if __name__ == "__main__":
    main()
