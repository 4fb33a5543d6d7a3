"""W1 over TLS against W1 over plain TCP (and the Unix socket), one relay, one run.

One market-data relay listens on its Unix socket, on ``tcp://127.0.0.1:0``
and on ``tls://127.0.0.1:0`` (mutual TLS, certificates from ``trustme``). For
each transport in turn a publisher process sends W1 (71-byte messages in
1 MiB batches, ``Publisher.publish_batch``) for ``--seconds`` and one
subscriber process (``Subscriber.recv_batch``) counts what it receives over
the same transport. The relay holds the publisher back to what the subscriber
takes (``--slow-policy block``), so nothing is dropped and the figure is delivered messages per second at the
subscriber, end to end; the report is each transport's ratio to plain TCP. Over TLS
the relay decrypts on uvloop's SSL transport, pumps the bytes through a
socketpair into the engine and back, and encrypts again: the ratio is what
all of that costs, with the clients' own TLS (Python's ``ssl``) on top;
``tls-direct`` is the floor without a relay: the publisher's TLS connection
straight to a receiving process, Python's ``ssl`` at both ends, so
``tls / tls-direct`` is the part the relay's TLS path (uvloop's SSL transport
and the pump) adds.

    python benchmarks/tls_ratio.py [--seconds 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

from jitrelay.client import Publisher, Subscriber
from jitrelay.client.address import relay_address
from jitrelay.core.protocol import build_batch

W1_BATCH = (1 << 20) // 71
LISTENING = re.compile(r"relay listening on (tcp|tls)://(\S+):(\d+)$")


def certificates(folder: Path) -> dict[str, Path]:
    ca = trustme.CA()
    files = {name: folder / f"{name}.pem" for name in ("ca", "relay", "client")}
    ca.cert_pem.write_to_path(files["ca"])
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(files["relay"])
    ca.issue_cert("bench", common_name="bench").private_key_and_cert_chain_pem.write_to_path(files["client"])
    return files


def where(kind: str, relay: dict[str, str], certs: dict[str, Path]) -> object:
    if kind == "tls":
        return relay_address(relay["tls"], Path(), ca=certs["ca"], cert=certs["client"])
    return relay[kind]


def subscribe(
    kind: str, relay: dict[str, str], certs: dict[str, Path], seconds: float, out: multiprocessing.Queue
) -> None:
    received, first, last = 0, 0.0, 0.0
    with Subscriber("market_data", where(kind, relay, certs)) as sub:  # type: ignore[arg-type]
        out.put("ready")
        deadline = time.monotonic() + seconds + 30
        while time.monotonic() < deadline:
            batch = sub.recv_batch(timeout=1.0)
            if batch is None:
                if received:
                    break
                continue
            now = time.perf_counter()
            if not received:
                first = now
            received += len(batch) // 71
            last = now
    out.put((received, last - first))


def publish(kind: str, relay: dict[str, str], certs: dict[str, Path], seconds: float) -> None:
    batch = build_batch(1, W1_BATCH, [(1, b"p" * 37)], timestamp_ns=1)
    with Publisher("market_data", where(kind, relay, certs)) as pub:  # type: ignore[arg-type]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pub.publish_batch(batch)


def run_one(kind: str, relay: dict[str, str], certs: dict[str, Path], seconds: float) -> float:
    out: multiprocessing.Queue = multiprocessing.Queue()
    sub = multiprocessing.Process(target=subscribe, args=(kind, relay, certs, seconds, out))
    sub.start()
    assert out.get(timeout=30) == "ready"
    time.sleep(0.3)  # the relay has taken the subscriber (TLS: after the handshake the client saw)
    pub = multiprocessing.Process(target=publish, args=(kind, relay, certs, seconds))
    pub.start()
    pub.join()
    received, span = out.get(timeout=seconds + 60)
    sub.join()
    return received / span if span > 0 else 0.0


def direct_receiver(certs: dict[str, Path], seconds: float, out: multiprocessing.Queue) -> None:
    """The floor: one TLS connection straight from the publisher, no relay; received bytes counted as W1."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs["relay"])
    with socket.create_server(("127.0.0.1", 0)) as listening:
        out.put(listening.getsockname()[1])
        conn, _ = listening.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            buffer = bytearray(1 << 20)
            received, first = 0, time.perf_counter()
            while n := tls.recv_into(buffer):
                received += n
    out.put((received // 71, time.perf_counter() - first))


def direct_tls(certs: dict[str, Path], seconds: float) -> float:
    """Messages per second over one TLS connection between the two processes, Python's ``ssl`` at both ends."""
    out: multiprocessing.Queue = multiprocessing.Queue()
    receiver = multiprocessing.Process(target=direct_receiver, args=(certs, seconds, out))
    receiver.start()
    port = out.get(timeout=30)
    batch = build_batch(1, W1_BATCH, [(1, b"p" * 37)], timestamp_ns=1).tobytes()
    context = ssl.create_default_context(cafile=certs["ca"])
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1") as tls:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            tls.sendall(batch)
    received, span = out.get(timeout=60)
    receiver.join()
    return received / span


def start_relay(folder: Path, certs: dict[str, Path]) -> tuple[subprocess.Popen, dict[str, str]]:
    socket_path = folder / "sock" / "market_data.sock"
    command = [
        sys.executable, "-m", "jitrelay", "run", "market_data", "--socket", str(socket_path), "--log-level", "INFO",
        "--slow-policy", "block", "--listen", "tcp://127.0.0.1:0", "--listen", "tls://127.0.0.1:0",
        "--tls-cert", str(certs["relay"]), "--tls-key", str(certs["relay"]), "--tls-client-ca", str(certs["ca"]),
        "--allow-name", "bench",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    found = {"unix": str(socket_path)}
    assert proc.stderr is not None
    for line in proc.stderr:
        match = LISTENING.search(line.rstrip())
        if match:
            found[match.group(1)] = f"{match.group(1)}://{match.group(2)}:{match.group(3)}"
        if f"listening on {socket_path}" in line:
            break
    threading_drain(proc)
    return proc, found


def threading_drain(proc: subprocess.Popen) -> None:
    import threading

    assert proc.stderr is not None
    threading.Thread(target=proc.stderr.read, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jr-tls-", dir="/tmp") as tmp:
        folder = Path(tmp)
        certs = certificates(folder)
        proc, relay = start_relay(folder, certs)
        try:
            rates: dict[str, list[float]] = {"unix": [], "tcp": [], "tls": [], "tls-direct": []}
            for _ in range(args.rounds):  # interleaved, so that drift on a shared machine hits all alike
                for kind in ("unix", "tcp", "tls"):
                    rates[kind].append(run_one(kind, relay, certs, args.seconds))
                rates["tls-direct"].append(direct_tls(certs, args.seconds))
        finally:
            proc.terminate()
            proc.wait(30)
    tcp = max(rates["tcp"])
    for kind, values in rates.items():
        shown = ", ".join(f"{v / 1e6:.2f}" for v in values)
        print(f"W1 over {kind:10}: {shown} M msg/s (best {max(values) / 1e6:.2f}); best / tcp {max(values) / tcp:.3f}")


if __name__ == "__main__":
    main()
