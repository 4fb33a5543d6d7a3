"""The floor under the relay's own time per W2 batch: the compiled calls one 71-byte message needs, and no more.

For each sample one message lands in the log's ring at the head (as a read
does), is scanned there, committed to the log, and the send loop's iovecs are
written for it: what ``Relay.on_direct_data`` does before the send loop, with
none of the event loop, the engine's frames or the figures around it. Timed
warm (back to back) and after a 0.2 ms sleep each (caches and branch
predictors as cold as between W2 messages at 5,000 msg/s). The relay's own
time can be no less than this. Both ways the relay has: the engine's Python
steps around the compiled calls (``--read-path python``), and the one
compiled call of the read loop (``ReadPath``, no targets). Last, the
scan alone over a batch of 1 MiB of such messages, per message: the part of
W1's own time per batch that no read path removes.

    python benchmarks/own_floor.py [--samples 5000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.domains import logic_for
from jitrelay.kernels.read_path import ReadPath
from jitrelay.server.log import RelayLog


def measure(samples: int, pause: float, compiled: bool = False) -> list[int]:
    logic = logic_for("market_data")
    log = RelayLog(
        logic.log_size + logic.buffer_size, protocol.HEADER_SIZE + logic.max_payload, reserve=logic.buffer_size
    )
    tables = kernels.tables_for(logic)
    scanned = kernels.ScanBuffers(logic.buffer_size)
    counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
    fan = kernels.FanOut(4, 2)
    message = np.frombuffer(protocol.build_message(protocol.MARKET_DATA, [(1, bytes(37))]), dtype=np.uint8)
    path = ReadPath(log.ring, tables, scanned, log.state, log.index)
    timings = []
    for _ in range(samples):
        if pause:
            time.sleep(pause)
        at, _ = log.space()
        log.ring[at : at + len(message)] = message  # the read itself: not the relay's work
        start_ns = time.perf_counter_ns()
        if compiled:
            path.forward(at, at + len(message), counts, 1, fan, 0, -1)
            timings.append(time.perf_counter_ns() - start_ns)
            continue
        result = kernels.scan_into(log.ring, at, at + len(message), tables, scanned, counts)
        start = log.commit(result.forwarded_bytes, result.count, 1)
        for k, (offset, length) in enumerate(log.pieces(start, start + result.forwarded_bytes)):
            fan.iovecs[2 * k] = log.address + offset
            fan.iovecs[2 * k + 1] = length
        timings.append(time.perf_counter_ns() - start_ns)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=5000)
    args = parser.parse_args()
    measure(200, 0.0)  # load the kernels
    for way, compiled in (("python steps", False), ("compiled call", True)):
        for name, pause in (("warm", 0.0), ("after 0.2 ms", 0.0002)):
            timings = sorted(measure(args.samples, pause, compiled))
            p99 = timings[int(0.99 * len(timings))]
            print(f"{way:>13}, {name:>12}: p50 {statistics.median(timings) / 1e3:.1f} us, p99 {p99 / 1e3:.1f} us")
    print(f"scan of a 1 MiB batch: {scan_per_message():.1f} ns per 71-byte message")


def scan_per_message(rounds: int = 50) -> float:
    logic = logic_for("market_data")
    tables = kernels.tables_for(logic)
    count = (1 << 20) // 71
    batch = protocol.build_batch(protocol.MARKET_DATA, count, [(1, bytes(37))], checksums=False)
    scanned = kernels.ScanBuffers(len(batch))
    kernels.scan_into(batch, 0, len(batch), tables, scanned)
    best = min(_timed(lambda: kernels.scan_into(batch, 0, len(batch), tables, scanned)) for _ in range(rounds))
    return best / count


def _timed(call: object) -> int:
    start = time.perf_counter_ns()
    call()  # type: ignore[operator]
    return time.perf_counter_ns() - start


if __name__ == "__main__":
    main()
