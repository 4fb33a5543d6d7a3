"""The relay's TLS listener: certificates, mutual TLS mapped onto the allow-list, and the Python clients over it.

Each relay runs with ``--listen tls://127.0.0.1:0`` and certificates made by
``trustme`` (``support.tls``). A refused peer must be refused with one
WARNING line naming its address and why; an admitted one publishes and
subscribes with the same bytes as a Unix peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.clients import Clients, assert_stream
from support.relays import RelayProcess, StartRelay
from support.tls import CLIENT_NAME, Certificates, make_certificates, tls_address

from jitrelay.client import AsyncPublisher, AsyncSubscriber, Publisher, RelayConnectionError, Subscriber
from jitrelay.client.address import RelayAddress, client_context, relay_address
from jitrelay.core.protocol import build_message

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def mtls_relay(start_relay: StartRelay, certs: Certificates) -> Callable[..., RelayProcess]:
    """``start_relay`` with a TLS listener that wants client certificates of the test CA naming ``oms.prod``."""

    def start(domain: str = "market_data", *options: str) -> RelayProcess:
        return start_relay(
            domain, *_tls_options(certs), "--tls-client-ca", str(certs.ca), "--allow-name", CLIENT_NAME, *options
        )

    return start


def _tls_options(certs: Certificates) -> tuple[str, ...]:
    return ("--listen", "tls://127.0.0.1:0", "--tls-cert", str(certs.relay), "--tls-key", str(certs.relay))


def _address(relay: RelayProcess, certs: Certificates, cert: Path | None = None) -> RelayAddress:
    host, port = tls_address(relay)
    return relay_address(f"tls://{host}:{port}", Path(), ca=certs.ca, cert=cert)


@contextlib.contextmanager
def _raw_tls(
    relay: RelayProcess, context: ssl.SSLContext
) -> Iterator[tuple[ssl.SSLSocket | None, int, Exception | None]]:
    """A raw TLS connection as far as it gets: (the socket or None, its local port, the handshake's error)."""
    sock = socket.create_connection(tls_address(relay), timeout=TIMEOUT)
    port = sock.getsockname()[1]
    try:
        wrapped = context.wrap_socket(sock, server_hostname="127.0.0.1")
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        yield None, port, exc
        return
    try:
        yield wrapped, port, None
    finally:
        wrapped.close()


def _wait_connected(relay: RelayProcess, count: int) -> None:
    """Wait until the engine has taken ``count`` TLS peers (after their handshake, which the client sees first)."""
    deadline = time.monotonic() + TIMEOUT
    while sum("tls addr=" in line and line.endswith(" connected") for line in relay.lines) < count:
        assert time.monotonic() < deadline, f"fewer than {count} TLS peers connected:\n{relay.stderr}"
        time.sleep(0.01)


def _read_until_closed(sock: ssl.SSLSocket | None) -> bytes:
    """What the relay sends a refused peer before the connection ends: nothing, then EOF or a TLS alert."""
    if sock is None:
        return b""
    got = b""
    with contextlib.suppress(ssl.SSLError, ConnectionResetError, BrokenPipeError):
        while chunk := sock.recv(4096):
            got += chunk
    return got


def test_client_without_a_certificate_is_refused_with_a_log_line(mtls_relay: Callable, certs: Certificates) -> None:
    relay = mtls_relay("execution")
    with _raw_tls(relay, client_context(certs.ca)) as (sock, port, _):
        assert _read_until_closed(sock) == b""
    line = relay.wait_line("refusing tls", f"addr=127.0.0.1:{port}")
    assert line.endswith("TLS handshake failed (PEER_DID_NOT_RETURN_A_CERTIFICATE)"), line
    assert relay.find_line("connected") is None


def test_certificate_of_another_ca_is_refused(mtls_relay: Callable, certs: Certificates) -> None:
    relay = mtls_relay("execution")
    with _raw_tls(relay, client_context(certs.ca, certs.other_ca_client)) as (sock, port, _):
        assert _read_until_closed(sock) == b""
    line = relay.wait_line("refusing tls", f"addr=127.0.0.1:{port}")
    assert line.endswith("TLS handshake failed (CERTIFICATE_VERIFY_FAILED)"), line


def test_certificate_whose_name_is_not_allowed_is_refused(mtls_relay: Callable, certs: Certificates) -> None:
    """The CA signed it, so the handshake succeeds; the name is what the allow-list refuses."""
    relay = mtls_relay("execution")
    with _raw_tls(relay, client_context(certs.ca, certs.stranger)) as (sock, port, error):
        assert error is None
        sock.sendall(build_message(3, [(45, b"order from an intruder")]))
        assert _read_until_closed(sock) == b""
    line = relay.wait_line("refusing tls", f"addr=127.0.0.1:{port}")
    assert line.endswith("certificate names intruder: none is in allowed_names"), line
    assert relay.find_line("connected") is None


def test_mutual_tls_admits_the_right_client_and_shares_the_stream(
    mtls_relay: Callable, certs: Certificates, clients: Clients
) -> None:
    """Python publisher and subscriber over tls://, exact bytes, and the Unix subscriber sees the same."""
    relay = mtls_relay("market_data")
    unix_sub = clients.reader(relay)
    address = _address(relay, certs, certs.client)
    with Subscriber("market_data", address) as tls_sub, Publisher("market_data", address) as pub:
        relay.wait_line("tls addr=127.0.0.1:", f"name={CLIENT_NAME} connected")
        # Both connections are in the relay once a probe published over TLS reaches both subscribers.
        probe = build_message(1, [(1, b"probe")], sequence=0)
        pub.publish_raw(probe)
        assert tls_sub.recv_batch(timeout=TIMEOUT).tobytes() == probe
        unix_sub.wait_received(len(probe))
        messages = [build_message(1, [(1, b"x" * (n % 200))], sequence=n + 1) for n in range(20_000)]
        expected = b"".join(messages)
        with pub.batch():
            for start in range(0, len(messages), 500):
                pub.publish_batch(b"".join(messages[start : start + 500]))
        got = bytearray()
        while len(got) < len(expected):
            batch = tls_sub.recv_batch(timeout=TIMEOUT)
            assert batch is not None, f"only {len(got)} of {len(expected)} bytes arrived over TLS"
            got += batch.tobytes()
        assert_stream(got, expected, "TLS subscriber")
    assert unix_sub.wait_received(len(probe) + len(expected))
    assert_stream(unix_sub.data, probe + expected, "Unix subscriber")


def test_asyncio_clients_over_mutual_tls(mtls_relay: Callable, certs: Certificates) -> None:
    relay = mtls_relay("signal")
    address = _address(relay, certs, certs.client)
    batch = b"".join(build_message(2, [(21, b"signal %d" % n)], source=3, sequence=n) for n in range(1000))

    async def run() -> bytes:
        async with AsyncSubscriber("signal", address) as sub, AsyncPublisher("signal", address) as pub:
            await asyncio.get_running_loop().run_in_executor(None, _wait_connected, relay, 2)
            got = bytearray()
            await pub.publish_batch(batch)
            while len(got) < len(batch):
                received = await sub.recv_batch(timeout=TIMEOUT)
                assert received is not None, f"only {len(got)} of {len(batch)} bytes arrived"
                got += received.tobytes()
            return bytes(got)

    # The subscriber connects first: the relay takes it before the publisher's first byte.
    assert_stream(asyncio.run(run()), bytes(batch), "asyncio TLS subscriber")


def test_server_only_tls_admits_clients_without_certificates_and_they_check_the_relay(
    start_relay: StartRelay, certs: Certificates
) -> None:
    relay = start_relay("market_data", *_tls_options(certs))
    address = _address(relay, certs)
    message = build_message(1, [(1, b"no client certificate needed")])
    with Subscriber("market_data", address) as sub, Publisher("market_data", address) as pub:
        _wait_connected(relay, 2)
        pub.publish_raw(message)
        assert sub.recv_batch(timeout=TIMEOUT).tobytes() == message
    # A client that does not trust the relay's CA refuses the relay.
    host, port = tls_address(relay)
    with pytest.raises(RelayConnectionError, match="did not complete the TLS handshake.*CERTIFICATE_VERIFY_FAILED"):
        Subscriber("market_data", relay_address(f"tls://{host}:{port}", Path(), ca=certs.other_ca))


def test_peer_outside_the_allowed_networks_is_refused_before_the_handshake(
    mtls_relay: Callable, certs: Certificates
) -> None:
    relay = mtls_relay("market_data", "--allow-network", "10.0.0.0/8")
    with _raw_tls(relay, client_context(certs.ca, certs.client)) as (sock, port, _):
        assert _read_until_closed(sock) == b""
    line = relay.wait_line("refusing tls", f"addr=127.0.0.1:{port}")
    assert line.endswith("address 127.0.0.1 is not in an allowed network"), line


def test_shared_memory_is_refused_for_a_network_address(certs: Certificates) -> None:
    for where in ("tcp://127.0.0.1:7001", "tls://127.0.0.1:7443"):
        with pytest.raises(ValueError, match="shared memory needs the relay's Unix socket"):
            Subscriber("market_data", where, shared_memory=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--listen", "tls://127.0.0.1:0"), "a tls:// listener needs tls_cert and tls_key"),
        (
            ("--listen", "tls://127.0.0.1:0", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--allow-name", "a"),
            "allowed_names needs tls_client_ca",
        ),
        (("--tls-client-ca", "ca.pem"), "apply to tls:// listeners"),
    ],
)
def test_tls_settings_that_cannot_work_are_usage_errors(
    short_dir: Path, options: tuple[str, ...], message: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "jitrelay", "run", "market_data", "--socket", str(short_dir / "r.sock"), *options],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert message in done.stderr
