"""Replay at ``--speed max`` against W1, in one run: how fast a capture of 71-byte messages goes back through a relay.

Both halves send the same messages through the same relay to the same kind of
subscriber process (a raw socket reader), which counts bytes and times them from its first byte to
its last:

- W1: one publisher process writes W1's 1 MiB batch of 71-byte messages
  (``jitrelay bench``'s W1 message) ``--mib`` times with ``publish_batch``;
- replay: ``jitrelay replay CAPTURE --speed max``, the capture holding the
  same ``--mib`` MiB, written once beforehand with ``CaptureWriter`` in 1 MiB
  batches (a recorder's batches at that rate), read from the page cache.

It prints both delivery rates and their ratio (the target is at least 0.5),
``--rounds`` times alternating, then the medians and the median of the
rounds' ratios (each round's two halves ran back to back, so their ratio
suffers least from a shared machine's drift).

    python benchmarks/replay_rate.py [--mib 512] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jitrelay.core import protocol
from jitrelay.core.units import MiB
from jitrelay.testing.relay import RelayProcess, relay_environ
from jitrelay.tools.capture import CaptureWriter

SIZE = 71
COUNT = MiB // SIZE  # messages per 1 MiB batch, as W1 sends them

SUBSCRIBER = """
import socket, sys, time
want, got, first = int(sys.argv[2]), 0, None
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
buffer = bytearray(8 << 20)
print("ready", flush=True)
while got < want:
    n = sock.recv_into(buffer)
    if not n:
        break
    if first is None:
        first = time.perf_counter()
    got += n
print(got // 71 / (time.perf_counter() - first) if got >= want else "cut off", flush=True)
"""  # a raw socket reader, as the bench's W1 subscribers are: what is timed is the relay, not a client

PUBLISHER = """
import sys
from jitrelay.client import Publisher
from jitrelay.core import protocol
batch = protocol.build_batch(1, {count}, [protocol.synthetic_record(1, 71)], checksums=False)
with Publisher("market_data", sys.argv[1]) as pub:
    for _ in range(int(sys.argv[2])):
        pub.publish_batch(batch)
"""


def write_capture(file: Path, mib: int) -> None:
    data = protocol.build_batch(
        protocol.MARKET_DATA, COUNT, [protocol.synthetic_record(protocol.MARKET_DATA, SIZE)], checksums=False
    )
    writer = CaptureWriter(file, rotate_bytes=256 * MiB)
    now = time.time_ns()
    for i in range(mib):
        writer.append(data, now + i * 40_000, COUNT)  # about W1's pace: a batch every 40 µs
    writer.close()


def delivered(socket_path: Path, mib: int, sender: list[str]) -> float:
    """Messages per second the subscriber received while ``sender`` sent ``mib`` batches; NaN if it was cut off.

    A subscriber that falls out of the relay's log is cut off (the relay's
    ``disconnect`` policy): that round has no figure.
    """
    env = relay_environ()
    want = mib * COUNT * SIZE
    sub = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBER, str(socket_path), str(want)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert sub.stdout is not None and sub.stdout.readline().strip() == "ready"
    time.sleep(0.2)  # the relay has taken the subscriber in
    subprocess.run(sender, check=True, env=env)
    line = sub.stdout.readline().strip()
    rate = float(line) if line and line != "cut off" else float("nan")
    sub.wait(30)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="MiB of 71-byte messages per half")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jr-", dir="/tmp") as folder:
        socket_path = Path(folder) / "market_data.sock"
        capture = Path(folder) / "w1"
        write_capture(capture, args.mib)
        relay = RelayProcess("market_data", socket_path, tie_to_parent=True)
        relay.wait_ready()
        publish = [sys.executable, "-c", PUBLISHER.format(count=COUNT), str(socket_path), str(args.mib)]
        replay = [sys.executable, "-m", "jitrelay", "replay", str(capture), "--to", "market_data"]
        replay += ["--socket", str(socket_path), "--speed", "max"]
        w1: list[float] = []
        replayed: list[float] = []
        try:
            for _ in range(args.rounds):
                a, b = delivered(socket_path, args.mib, publish), delivered(socket_path, args.mib, replay)
                print(f"W1 {a:,.0f} msg/s, replay --speed max {b:,.0f} msg/s, ratio {b / a:.2f}", flush=True)
                if a == a and b == b:  # neither subscriber was cut off
                    w1.append(a)
                    replayed.append(b)
        finally:
            relay.kill()
    if not w1:
        sys.exit("every round had a subscriber cut off")
    a, b = statistics.median(w1), statistics.median(replayed)
    ratio = statistics.median(y / x for x, y in zip(w1, replayed, strict=True))
    print(f"median: W1 {a:,.0f} msg/s, replay {b:,.0f} msg/s; median of the rounds' ratios {ratio:.2f}")


if __name__ == "__main__":
    main()
