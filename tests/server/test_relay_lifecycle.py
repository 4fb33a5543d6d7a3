"""End-to-end: starting and stopping a real relay process, and the socket it owns."""

from __future__ import annotations

import signal
import socket
import stat
import time
from pathlib import Path

import pytest
from support.relays import RelayProcess, StartRelay

from jitrelay.core.protocol import build_message


def round_trip(relay: RelayProcess) -> None:
    """One message from a new publisher reaches a new subscriber, byte for byte."""
    with relay.connect() as subscriber, relay.connect() as publisher:
        message = build_message(1, [(1, b"round trip")], sequence=7)
        # The relay may not have accepted the subscriber yet: publish until it hears.
        subscriber.settimeout(0.1)
        deadline = time.monotonic() + 10
        while True:
            publisher.sendall(message)
            try:
                got = subscriber.recv(len(message), socket.MSG_WAITALL)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "subscriber got nothing"
        assert got == message


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_relay_and_removes_socket(start_relay: StartRelay, signum: int) -> None:
    relay = start_relay("market_data")
    assert relay.socket_path is not None and relay.socket_path.is_socket()
    with relay.connect() as client:  # an open connection must not hold the relay up
        client.sendall(build_message(1, [(1, b"hello")]))
        time.sleep(0.1)
        relay.send_signal(signum)
        assert relay.wait_exit(2.5) == 0, relay.stderr
    assert not relay.socket_path.exists()


def test_second_relay_on_live_socket_is_refused(start_relay: StartRelay) -> None:
    first = start_relay("market_data")
    second = start_relay("market_data", socket_path=first.socket_path, ready=False)
    assert second.wait_exit(30) != 0
    assert "already" in second.stderr
    assert first.proc.poll() is None and first.socket_path is not None and first.socket_path.is_socket()
    round_trip(first)


def test_stale_socket_is_replaced(start_relay: StartRelay) -> None:
    first = start_relay("market_data")
    first.proc.kill()
    first.wait_exit(10)
    assert first.socket_path is not None and first.socket_path.is_socket(), "SIGKILL should leave the socket file"
    second = start_relay("market_data", socket_path=first.socket_path)
    round_trip(second)


@pytest.mark.parametrize("how", ["env", "option"])
def test_new_socket_folder_and_socket_modes(start_relay: StartRelay, short_dir: Path, how: str) -> None:
    folder = short_dir / "run" / "relays"
    path = folder / "market_data.sock"
    if how == "env":
        relay = start_relay(
            "market_data", socket_path=path, pass_socket=False, env={"JITRELAY_SOCKET_DIR": str(folder)}, umask=0o077
        )
    else:
        relay = start_relay("market_data", socket_path=path, umask=0o077)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert oct(stat.S_IMODE(folder.stat().st_mode)) == oct(0o770)
    assert oct(stat.S_IMODE(path.stat().st_mode)) == oct(0o660)
    round_trip(relay)


def test_unknown_domain_exits_2(start_relay: StartRelay) -> None:
    relay = start_relay("no_such_domain", ready=False)
    assert relay.wait_exit(30) == 2
    assert "no_such_domain" in relay.stderr
