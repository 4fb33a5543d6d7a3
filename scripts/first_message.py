"""Seconds from `jitrelay run DOMAIN` to the first message delivered, as a service started beside it would see them.

Starts the relay with this interpreter, then at once a subscriber and a
publisher that retry while the relay refuses them (it listens only once it
can serve), publishes until the subscriber has a message, and prints one JSON
line: seconds to the first delivery, the relay's resident memory then, the
kernel build it runs, whether numba or LLVM is mapped into it, and any line
it wrote at WARNING. Used by tests/kernels/test_wheel.py and to measure the
start-up figures in docs/operations.md:

    CC=false HOME=$(mktemp -d) python scripts/first_message.py market_data
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from jitrelay import Publisher, Subscriber
from jitrelay.client import RelayConnectionError

TIMEOUT = 60.0
T = TypeVar("T")


def _connect(make: Callable[[], T], deadline: float) -> T:
    while True:
        try:
            return make()
        except (RelayConnectionError, ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)


def main(domain: str) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="jr-first-", dir="/tmp"))
    path = folder / f"{domain}.sock"
    started = time.monotonic()
    relay = subprocess.Popen(
        [sys.executable, "-m", "jitrelay", "run", domain, "--socket", str(path), "--log-level", "INFO"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = started + TIMEOUT
        sub = _connect(lambda: Subscriber(domain, path), deadline)
        pub = _connect(lambda: Publisher(domain, path, source=7), deadline)
        with sub, pub:
            while True:
                pub.publish([(1, b"first")])
                if sub.recv_batch(timeout=0.05) is not None:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("no message delivered")
        seconds = time.monotonic() - started
        with open(f"/proc/{relay.pid}/status") as status:
            rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        with open(f"/proc/{relay.pid}/maps") as maps:
            mapped = maps.read()
    finally:
        relay.terminate()
        _, err = relay.communicate(timeout=15)
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()
    kernels_line = next((line for line in err.splitlines() if "kernels ready in" in line), "")
    return {
        "seconds_to_first_message": round(seconds, 3),
        "rss_mib": round(rss / 1024, 1),
        "kernels": kernels_line.partition("kernels ready in ")[2],
        "numba_mapped": "numba" in mapped or "llvmlite" in mapped,
        "warnings": [line for line in err.splitlines() if " WARNING " in line],
    }


if __name__ == "__main__":
    os.environ.pop("NUMBA_DISABLE_JIT", None)
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "market_data")))
