"""The bridge over a NATS cluster that takes only TLS clients with a certificate of its CA (mutual TLS).

The cluster is ``NatsCluster`` with ``NatsTls``: three nats-server processes
whose client port wants TLS and verifies client certificates. Two hosts'
bridges carry a W1 stream (71-byte market-data messages in 1 MiB batches)
across it; the far subscriber must read exactly the bytes published. A bridge
without a client certificate is refused by NATS and says so, without end.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.bridges import WAIT, BridgeProcess, StartHosts
from support.clients import Clients, assert_stream, sync
from support.relays import StartRelay, relay_environ
from support.tls import Certificates, make_certificates

from jitrelay.core.protocol import build_batch
from jitrelay.testing.nats_cluster import NatsCluster, NatsTls, nats_server_path

if nats_server_path() is None:  # CI installs it (.ci/run); say so loudly rather than skip
    raise RuntimeError("the bridge tests need nats-server: apt-get install nats-server")

W1_RECORD = (1, b"p" * 37)  # one type-1 record with a 37-byte value: a 71-byte message
W1_BATCH = (1 << 20) // 71  # messages in a 1 MiB batch


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_cluster(certs: Certificates) -> Iterator[NatsCluster]:
    with NatsCluster(3, tls=NatsTls(certs.relay, certs.relay, certs.ca)) as nats:
        yield nats


def _tls(certs: Certificates, cert: Path | None) -> tuple[str, ...]:
    options = ("--tls-ca", str(certs.ca))
    return options + (("--tls-cert", str(cert), "--tls-key", str(cert)) if cert is not None else ())


def test_bridge_carries_w1_over_a_mutual_tls_cluster_exactly(
    tls_cluster: NatsCluster, start_hosts: StartHosts, clients: Clients, certs: Certificates
) -> None:
    a, b = start_hosts(tls_cluster, "market_data", 2, *_tls(certs, certs.client))
    sub_b = clients.reader(b.relay)
    publisher = clients.connect(a.relay)
    sync(publisher, [sub_b], 1, timeout=WAIT)
    batches = [build_batch(1, W1_BATCH, [W1_RECORD], first_sequence=k * W1_BATCH).tobytes() for k in range(8)]
    assert len(batches[0]) == W1_BATCH * 71
    expected = b"".join(batches)
    for batch in batches:
        publisher.sendall(batch)
    assert sub_b.wait_received(len(expected), WAIT), f"{sub_b.received} of {len(expected)} bytes"
    assert_stream(sub_b.data, expected, "subscriber on host B")
    assert b.bridge.gap("from_nats") == (0, 0)
    node = tls_cluster.nodes[a.bridge.nats_node(tls_cluster)]
    bridges = [c for c in node.monitor("connz")["connections"] if c.get("name", "").startswith("jitrelay-bridge")]
    assert bridges and all(c.get("tls_version") for c in bridges), bridges


def test_bridge_without_a_client_certificate_is_refused_by_nats(
    tls_cluster: NatsCluster, start_relay: StartRelay, certs: Certificates
) -> None:
    """It keeps trying (as it does for any NATS outage) and logs each refusal; it never says it is connected."""
    relay = start_relay("market_data")
    bridge = BridgeProcess("market_data", relay.socket_path, tls_cluster.servers, _tls(certs, None))
    try:
        line = bridge.wait_line("WARNING", "NATS: SSLError", timeout=WAIT)
        assert "BAD_CERTIFICATE" in line or "CERTIFICATE_REQUIRED" in line, line
        assert bridge.find_line("connected to NATS at") is None
    finally:
        bridge.kill()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nats-creds", "/nonexistent/bridge.creds"], "--nats-creds /nonexistent/bridge.creds: no such file"),
        (["--tls-cert", "/nonexistent/c.pem"], "--tls-cert /nonexistent/c.pem: no such file"),
    ],
)
def test_bridge_credential_options_are_checked(short_dir: Path, args: list[str], message: str) -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "jitrelay", "bridge", "market_data", "--socket", str(short_dir / "r.sock"),
            "--nats", "nats://127.0.0.1:1", *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=relay_environ(),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
