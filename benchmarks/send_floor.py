"""The floor under the relay's forwarding time: what it costs to hand one small message to N waiting readers.

Each reader is a process blocked in ``recv`` on its end of a Unix socket pair,
as a subscriber waiting for the next message is; the timed part is N
``send`` calls of one 71-byte message from this process, each of which must
wake a reader. The relay's forwarding time for a one-message batch (W2) is
this plus its own work (one scan, the Python around it), so this script says
how much of the figure is the operating system's.

    python benchmarks/send_floor.py [--readers 4] [--samples 3000]
"""

from __future__ import annotations

import argparse
import os
import socket
import time


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e3


def measure(readers: int, samples: int, size: int = 71) -> list[int]:
    """Nanoseconds for ``readers`` sends of ``size`` bytes, each waking a reader, ``samples`` times."""
    pairs = [socket.socketpair() for _ in range(readers)]
    children = []
    for _, theirs in pairs:
        pid = os.fork()
        if pid == 0:
            for mine, _ in pairs:
                mine.close()
            while theirs.recv(1 << 16):
                pass
            os._exit(0)
        children.append(pid)
        theirs.close()
    message = b"x" * size
    timings = []
    try:
        for _ in range(samples):
            time.sleep(0.0002)  # let every reader block again, as between W2 messages
            start = time.perf_counter_ns()
            for mine, _ in pairs:
                mine.send(message)
            timings.append(time.perf_counter_ns() - start)
    finally:
        for mine, _ in pairs:
            mine.close()
        for pid in children:
            os.waitpid(pid, 0)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=3000)
    args = parser.parse_args()
    for n in sorted({1, args.readers}):
        timings = measure(n, args.samples)
        print(
            f"{n} send(s) of 71 bytes, each waking a blocked reader: "
            f"p50 {percentile(timings, 0.5):.1f} us, p99 {percentile(timings, 0.99):.1f} us"
        )


if __name__ == "__main__":
    main()
