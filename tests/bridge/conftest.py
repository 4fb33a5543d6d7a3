"""Fixtures of the bridge tests: a NATS cluster, and hosts (a relay and a bridge each) joined through it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.bridges import BridgeProcess, Host, StartHosts
from support.relays import StartRelay

from jitrelay.testing.nats_cluster import NatsCluster


@pytest.fixture
def cluster() -> Iterator[NatsCluster]:
    with NatsCluster(3) as nats:
        yield nats


@pytest.fixture
def start_hosts(start_relay: StartRelay, short_dir: Path) -> Iterator[StartHosts]:
    """``start_hosts(cluster, domain, n=2, *bridge_options, relay_options=())``: n relays in separate folders, each
    with a bridge named for its folder (``--host host0``)."""
    bridges: list[BridgeProcess] = []

    def start(
        cluster: NatsCluster,
        domain: str = "market_data",
        n: int = 2,
        *options: str,
        relay_options: tuple[str, ...] = (),
    ) -> list[Host]:
        relays = []
        for i in range(n):
            folder = short_dir / f"host{i}"
            folder.mkdir()
            relays.append(start_relay(domain, *relay_options, socket_path=folder / f"{domain}.sock", ready=False))
        for relay in relays:
            relay.wait_ready()
        hosts = []
        for relay in relays:
            name = ("--host", relay.socket_path.parent.name)  # the JetStream bridges' durable names, one per host
            bridges.append(BridgeProcess(domain, relay.socket_path, cluster.servers, (*name, *options)))
            hosts.append(Host(relay, bridges[-1]))
        for host in hosts:
            host.bridge.wait_ready()
        return hosts

    yield start
    for bridge in bridges:
        bridge.kill()
