"""How long after a restarted relay is back its clients have found it: from accepting again to a message received.

A relay runs with a ``Subscriber`` (positions; ``--shm`` for shared memory)
and a ``Publisher`` publishing a message every millisecond, both with the
default ``Reconnect``. Each round SIGKILLs the relay and starts it again; this
process connects to the socket every 0.2 ms until the new relay accepts
(the moment it is back), and the figure is the time from then until the
subscriber receives its first message of the new relay: both clients' backoff,
reconnection and the subscriber's resume together.

    python benchmarks/reconnect_time.py [--rounds 10] [--down 0.5] [--shm]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from jitrelay import Publisher, Subscriber
from jitrelay.testing.relay import RelayProcess


def accepting(path: Path) -> float:
    """Wait until the relay at ``path`` accepts a connection; the monotonic time it did."""
    while True:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            return time.monotonic()
        except OSError:
            time.sleep(0.0002)
        finally:
            probe.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--down", type=float, default=0.5, help="seconds the relay stays down each round")
    parser.add_argument("--shm", action="store_true", help="the subscriber reads the log from shared memory")
    args = parser.parse_args()
    path = Path(tempfile.mkdtemp(prefix="jr-")) / "market_data.sock"
    relay = RelayProcess("market_data", path)
    relay.wait_ready()
    received_at: list[float] = []
    stop = threading.Event()
    sub = Subscriber("market_data", path, positions=True, shared_memory=args.shm)
    pub = Publisher("market_data", path, source=1)

    def receive() -> None:
        for _ in sub:
            received_at.append(time.monotonic())
            if stop.is_set():
                return

    def publish() -> None:
        while not stop.is_set():
            pub.publish([(1, b"tick")])
            time.sleep(0.001)

    threads = [threading.Thread(target=receive, daemon=True), threading.Thread(target=publish, daemon=True)]
    for thread in threads:
        thread.start()
    figures = []
    try:
        for _ in range(args.rounds):
            time.sleep(0.3)
            relay.proc.kill()
            relay.proc.wait()
            time.sleep(args.down)
            seen = len(received_at)
            relay = RelayProcess("market_data", path)
            back = accepting(path)
            while len(received_at) == seen or received_at[-1] < back:
                time.sleep(0.0005)
            figures.append(next(at for at in received_at[seen:] if at >= back) - back)
            relay.wait_ready()
    finally:
        stop.set()
        relay.kill()
    ms = sorted(1000 * figure for figure in figures)
    print(
        f"relay back -> subscriber receiving again ({'shared memory' if args.shm else 'socket'}, "
        f"{args.rounds} rounds, down {args.down} s): median {statistics.median(ms):.1f} ms, "
        f"max {ms[-1]:.1f} ms, all {[round(m, 1) for m in ms]}"
    )


if __name__ == "__main__":
    main()
