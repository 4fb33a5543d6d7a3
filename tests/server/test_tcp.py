"""The relay's TCP listener: one stream shared with Unix clients, an allow-list of networks, TCP_NODELAY.

The forwarding contract itself runs over TCP in ``test_contract.py``. Here the
``start_relay`` fixture starts each relay with ``--listen tcp://127.0.0.1:0``
and hands the test a relay whose ``connect()`` opens a TCP connection.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.clients import Clients, assert_stream, mixed_messages, sync
from support.relays import StartRelay
from support.streams import send_chunked
from support.tcp import TcpRelay, tcp_addresses, tcp_relays

from jitrelay.core.protocol import build_message


@pytest.fixture
def start_relay(start_relay: StartRelay) -> Callable[..., TcpRelay]:
    """``start_relay`` of conftest with a TCP listener on a free loopback port, returning a ``TcpRelay``."""
    return tcp_relays(start_relay)


def test_unix_and_tcp_clients_share_one_stream(start_relay: Callable, clients: Clients) -> None:
    """Publishers and subscribers on either transport get each other's valid messages, exactly."""
    relay = start_relay("signal")
    unix_sub = clients.reader(relay, _track(clients, relay.connect_unix()))
    tcp_sub = clients.reader(relay)
    tcp_pub = clients.connect(relay)
    unix_pub = _track(clients, relay.connect_unix())
    unix_pub_reads = clients.reader(relay, unix_pub)
    sync(tcp_pub, [unix_sub, tcp_sub, unix_pub_reads], 2)

    rng = random.Random("unix and tcp")
    messages = mixed_messages(rng, "signal", 300)
    over_tcp = b"".join(m for m, forwarded in messages if forwarded)
    send_chunked(tcp_pub, b"".join(m for m, _ in messages), rng, (1, 7, 32, 500, 4096))
    for reader in (unix_sub, tcp_sub, unix_pub_reads):
        reader.wait_received(len(over_tcp))
    over_unix = build_message(2, [(21, b"from the unix socket")], sequence=7)
    unix_pub.sendall(over_unix)
    tcp_sub.wait_received(len(over_tcp) + len(over_unix))
    unix_sub.wait_received(len(over_tcp) + len(over_unix))
    time.sleep(0.2)
    assert_stream(tcp_sub.data, over_tcp + over_unix, "TCP subscriber")
    assert_stream(unix_sub.data, over_tcp + over_unix, "Unix subscriber")
    assert_stream(unix_pub_reads.data, over_tcp, "Unix publisher")


def test_tcp_peer_outside_the_allowed_networks_is_refused(start_relay: Callable, clients: Clients) -> None:
    relay = start_relay("market_data", "--allow-network", "10.0.0.0/8", "--allow-network", "192.168.0.0/16")
    refused = relay.connect()
    port = refused.getsockname()[1]
    line = relay.wait_line("refusing", f"addr=127.0.0.1:{port}")
    assert "address 127.0.0.1 is not in an allowed network" in line
    refused.settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        assert refused.recv(1) == b""
    refused.close()
    # The Unix socket is not subject to the network list, and nothing else changed.
    subscriber = clients.reader(relay, relay.connect_unix())
    publisher = relay.connect_unix()
    clients.sockets.append(publisher)
    sync(publisher, [subscriber], 1)
    message = build_message(1, [(1, b"still open")])
    publisher.sendall(message)
    subscriber.wait_received(len(message))
    assert bytes(subscriber.data) == message


def test_loopback_is_allowed_by_default_over_ipv4_and_ipv6(start_relay: StartRelay, clients: Clients) -> None:
    if not socket.has_ipv6 or not _ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    relay = start_relay("execution", "--listen", "tcp://[::1]:0")
    by_family = {":" in host: (host, port) for host, port in tcp_addresses(relay.relay)}
    v4, v6 = by_family[False], by_family[True]
    subscriber = clients.reader(relay, _track(clients, socket.create_connection(v6, timeout=5)))
    publisher = _track(clients, socket.create_connection(v4, timeout=5))
    sync(publisher, [subscriber], 3)
    message = build_message(3, [(45, b"fill over v4, read over v6")])
    publisher.sendall(message)
    subscriber.wait_received(len(message))
    assert bytes(subscriber.data) == message
    relay.wait_line("connected", "addr=[::1]:")


def test_relay_sets_tcp_nodelay_on_accepted_connections(start_relay: Callable, clients: Clients) -> None:
    relay = start_relay("market_data")
    client = clients.connect(relay)
    port = client.getsockname()[1]
    relay.wait_line("connected", f"addr=127.0.0.1:{port}")
    with _peer_socket(relay.proc.pid, port) as accepted:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--listen", "udp://127.0.0.1:7001", "not a TCP listen address"),
        ("--listen", "tcp://127.0.0.1", "not a TCP listen address"),
        ("--allow-network", "10.0.0.0/33", "allowed_networks"),
    ],
)
def test_bad_listen_options_are_usage_errors(short_dir: Path, option: str, value: str, message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "jitrelay", "run", "market_data", "--socket", str(short_dir / "r.sock"), option, value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_port_in_use_is_refused_and_the_socket_is_cleaned_up(start_relay: StartRelay, short_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        relay = start_relay(
            "market_data", "--listen", f"tcp://127.0.0.1:{port}", socket_path=short_dir / "busy.sock", ready=False
        )
        assert relay.wait_exit(60) == 1
    assert "address already in use" in relay.stderr.lower()
    assert not (short_dir / "busy.sock").exists()


# helpers


def _track(clients: Clients, sock: socket.socket) -> socket.socket:
    clients.sockets.append(sock)
    return sock


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _peer_socket(pid: int, client_port: int) -> Iterator[socket.socket]:
    """The socket process ``pid`` accepted from our ``client_port``, duplicated into this process (pidfd_getfd)."""
    inode = None
    with open(f"/proc/{pid}/net/tcp") as table:
        for row in table.read().splitlines()[1:]:
            fields = row.split()
            if int(fields[2].split(":")[1], 16) == client_port:
                inode = fields[9]
    assert inode is not None, f"no socket of pid {pid} is connected to port {client_port}"
    target = next(
        int(fd) for fd in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]"
    )
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        fd = libc.syscall(438, pidfd, target, 0)  # pidfd_getfd(2)
        assert fd >= 0, f"pidfd_getfd: {os.strerror(ctypes.get_errno())}"
    finally:
        os.close(pidfd)
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()
        os.close(fd)
