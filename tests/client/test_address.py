"""Relay addresses: what each form parses to, what is refused, and the clients over plain TCP."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from support.relays import StartRelay
from support.tcp import tcp_addresses

from jitrelay.client import Publisher, RelayConnectionError, Subscriber
from jitrelay.client.address import RelayAddress, relay_address
from jitrelay.core.protocol import build_message

DEFAULT = Path("/tmp/jitrelay/market_data.sock")


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (None, RelayAddress("unix", DEFAULT)),
        ("/run/jitrelay/signal.sock", RelayAddress("unix", Path("/run/jitrelay/signal.sock"))),
        (Path("relative.sock"), RelayAddress("unix", Path("relative.sock"))),
        ("unix:///run/jitrelay/signal.sock", RelayAddress("unix", Path("/run/jitrelay/signal.sock"))),
        ("tcp://10.0.0.5:7001", RelayAddress("tcp", None, "10.0.0.5", 7001)),
        ("tcp://[::1]:7001", RelayAddress("tcp", None, "::1", 7001)),
        ("tcp://relay1.example:7001", RelayAddress("tcp", None, "relay1.example", 7001)),
    ],
)
def test_addresses_parse(where: str | Path | None, expected: RelayAddress) -> None:
    assert relay_address(where, DEFAULT) == expected


def test_tls_address_carries_its_context_and_shows_as_its_url() -> None:
    given = ssl.create_default_context()
    address = relay_address("tls://[::1]:7443?server_name=relay1.example", DEFAULT, ssl_context=given)
    assert (address.scheme, address.host, address.port, address.server_hostname) == (
        "tls",
        "::1",
        7443,
        "relay1.example",
    )
    assert address.ssl_context is given
    assert str(address) == "tls://[::1]:7443"
    assert not address.is_unix
    default = relay_address("tls://relay1.example:7443", DEFAULT)
    assert default.ssl_context is not None and default.ssl_context.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("udp://10.0.0.5:7001", "not a relay address"),
        ("tcp://10.0.0.5", "not a relay address"),
        ("tcp://10.0.0.5:7001/path", "not a relay address"),
        ("unix://", "not a relay address"),
        ("tls://10.0.0.5:7443?cafile=x", "unknown query"),
        ("tcp://10.0.0.5:7001?ca=x", "unknown query"),
    ],
)
def test_bad_addresses_are_refused(where: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        relay_address(where, DEFAULT)


def test_tls_options_on_an_address_that_is_not_tls_are_refused() -> None:
    with pytest.raises(ValueError, match="not a tls:// address"):
        relay_address("tcp://10.0.0.5:7001", DEFAULT, ca="/etc/ssl/ca.pem")
    with pytest.raises(ValueError, match="not a tls:// address"):
        relay_address(None, DEFAULT, ssl_context=ssl.create_default_context())


def test_missing_tls_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        relay_address("tls://10.0.0.5:7443", DEFAULT, ca=tmp_path / "missing.pem")


def test_publisher_and_subscriber_over_tcp(start_relay: StartRelay) -> None:
    relay = start_relay("market_data", "--listen", "tcp://127.0.0.1:0")
    host, port = tcp_addresses(relay)[0]
    where = f"tcp://{host}:{port}"
    messages = [build_message(1, [(1, b"over tcp %d" % n)], sequence=n) for n in range(5000)]
    with Subscriber("market_data", where) as sub, Publisher("market_data", where) as pub:
        relay.wait_line("connected", "conn=2")  # both are in the relay before the first message
        for message in messages:
            pub.publish_raw(message)
        got = bytearray()
        while len(got) < sum(map(len, messages)):
            batch = sub.recv_batch(timeout=10)
            assert batch is not None
            got += batch.tobytes()
    assert bytes(got) == b"".join(messages)


def test_no_relay_at_a_tcp_address_says_so(start_relay: StartRelay) -> None:
    from jitrelay.testing.nats_cluster import free_ports

    port = free_ports(1)[0]
    with pytest.raises(RelayConnectionError, match=f"no market_data relay at tcp://127.0.0.1:{port}"):
        Publisher("market_data", f"tcp://127.0.0.1:{port}")
