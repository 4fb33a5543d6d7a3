"""The floor under fan-out on this machine: waking N waiting readers with N sends, or with one futex wake.

Readers are processes that do nothing but wait and note the time they ran:
blocked in ``recv`` on their end of a Unix socket pair (what a socket
subscriber of the raw forwarder or the relay is), or in ``FUTEX_WAIT`` on one
word of shared memory (what a shared-memory subscriber of the relay is,
``jitrelay.kernels.futex``). Each sample, this process notes the time, then
either sends one 71-byte message on each socket in turn or bumps the word and
wakes everyone with one call. A reader's figure is the time from then until
it ran; the sample's are the mean over readers (what W2 reports per
subscriber) and the last one's (what the fan-out workload reports).

No Python relay or client code runs between the wake and the reader's note:
these are the operating system's figures, the least either kind of subscriber
can take. On a machine with fewer cores than readers, the readers queue for
the cores whichever way they are woken.

    python benchmarks/wake_floor.py [--readers 1,4,10,100] [--samples 2000]
"""

from __future__ import annotations

import argparse
import mmap
import os
import signal
import socket
import statistics
import time

import numpy as np

from jitrelay.kernels import futex

PAUSE_SECONDS = 0.0005  # between samples: every reader is back asleep, as between W2 messages
SETTLE_SECONDS = 0.001  # how long this process sleeps before it looks whether every reader has run
STAMPS = 8  # int64 words per reader: the time it last ran, on a cache line of its own


def _readers(kind: str, n: int, shared: np.ndarray) -> tuple[list[int], list[socket.socket]]:
    mine: list[socket.socket] = []
    pids = []
    word = shared[0:1]  # the futex word: word 0
    address = word.ctypes.data
    for k in range(n):
        ours, theirs = socket.socketpair() if kind == "socket" else (None, None)
        pid = os.fork()
        if pid == 0:
            slot = STAMPS * (k + 1)
            if kind == "socket":
                ours.close()
                for other in mine:
                    other.close()
                while theirs.recv(1 << 16):
                    shared[slot] = time.perf_counter_ns()
            else:
                wait = futex.Waiter(address)
                while not shared[1]:
                    seen = int(shared[0])
                    wait(seen, 1.0)
                    if int(shared[0]) != seen:
                        shared[slot] = time.perf_counter_ns()
            os._exit(0)
        pids.append(pid)
        if kind == "socket":
            theirs.close()
            mine.append(ours)
    return pids, mine


def measure(kind: str, n: int, samples: int) -> tuple[list[int], list[int]]:
    """Per sample: mean and last nanoseconds from the wake to each of ``n`` readers running."""
    memory = mmap.mmap(-1, 8 * STAMPS * (n + 1))
    shared = np.frombuffer(memory, dtype=np.int64)
    pids, socks = _readers(kind, n, shared)
    waker = futex.Waker(shared[0:1].ctypes.data)
    message = b"x" * 71
    means, lasts = [], []
    try:
        time.sleep(0.2)
        for _ in range(samples):
            time.sleep(PAUSE_SECONDS)
            shared[STAMPS::STAMPS] = 0
            start = time.perf_counter_ns()
            if kind == "socket":
                for sock in socks:
                    sock.send(message)
            else:
                shared[0] += 1
                waker()
            deadline = time.monotonic() + 1.0
            while not shared[STAMPS::STAMPS].all():  # sleeping, not spinning: the cores are the readers'
                if time.monotonic() > deadline:
                    raise RuntimeError(f"a {kind} reader did not run within a second")
                time.sleep(SETTLE_SECONDS)
            delays = shared[STAMPS::STAMPS] - start
            means.append(int(delays.mean()))
            lasts.append(int(delays.max()))
    finally:
        shared[1] = 1
        shared[0] += 1
        waker()
        for sock in socks:
            sock.close()
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            except KeyboardInterrupt:
                os.kill(pid, signal.SIGKILL)
    return means, lasts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readers", default="1,4,10,100", help="comma-separated reader counts")
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; microseconds from the wake until the readers ran (p50 over samples)")
    columns = ("socket mean", "futex mean", "ratio", "socket last", "futex last", "ratio")
    print(f"{'readers':>7}  " + " ".join(f"{c:>11}" for c in columns))
    for n in (int(x) for x in args.readers.split(",")):
        socket_mean, socket_last = measure("socket", n, args.samples)
        futex_mean, futex_last = measure("futex", n, args.samples)
        sm, fm = statistics.median(socket_mean) / 1e3, statistics.median(futex_mean) / 1e3
        sl, fl = statistics.median(socket_last) / 1e3, statistics.median(futex_last) / 1e3
        figures = (sm, fm, fm / sm, sl, fl, fl / sl)
        print(f"{n:>7}  " + " ".join(f"{x:>11.2f}" if i % 3 == 2 else f"{x:>11.1f}" for i, x in enumerate(figures)))


if __name__ == "__main__":
    main()
