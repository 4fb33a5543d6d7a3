"""A relay process reached over TCP: its listeners, read from its log, and connections to them."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable

from support.relays import RelayProcess

LISTENING = re.compile(r"relay listening on tcp://(\S+):(\d+)$")


class TcpRelay:
    """A relay process whose ``connect()`` opens a TCP connection instead of a Unix one."""

    def __init__(self, relay: RelayProcess) -> None:
        self.relay = relay
        self.domain = relay.domain

    @property
    def tcp(self) -> tuple[str, int]:
        return tcp_addresses(self.relay)[0]

    def connect(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.create_connection(self.tcp, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def connect_unix(self, timeout: float = 5.0) -> socket.socket:
        return self.relay.connect(timeout)

    def __getattr__(self, name: str) -> object:  # wait_line, find_line, proc, stderr, ...
        return getattr(self.relay, name)


def tcp_addresses(relay: RelayProcess) -> list[tuple[str, int]]:
    """The TCP addresses the relay reported listening on, before its Unix ready line."""
    found = []
    for line in relay.lines:
        match = LISTENING.search(line)
        if match:
            found.append((match.group(1).strip("[]"), int(match.group(2))))
    assert found, f"the relay reported no TCP listener:\n{relay.stderr}"
    return found


def tcp_relays(start_relay: Callable[..., RelayProcess]) -> Callable[..., TcpRelay]:
    """``start_relay`` with a TCP listener on a free loopback port, returning ``TcpRelay``s."""

    def start(domain: str = "market_data", *options: str, **kwargs: object) -> TcpRelay:
        return TcpRelay(start_relay(domain, "--listen", "tcp://127.0.0.1:0", *options, **kwargs))

    return start
