"""PROTOCOL.md's forwarding contract, on each transport: the same tests over the Unix socket and over TCP.

A mixed stream sent in random chunks, a publisher that leaves mid-message and
the stream-fatal faults, each run twice: ``transport`` picks how the clients
reach the relay (``start_relay`` of conftest, or one with a TCP listener whose
``connect()`` opens a TCP connection), and ``peer_name`` how the relay's log
names a peer (by pid, or by address).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from collections.abc import Callable

import pytest
from support.clients import (
    DOMAINS,
    Clients,
    assert_stream,
    exact_payload,
    mixed_messages,
    sync,
    valid_payload,
)
from support.reference import extended_record
from support.relays import StartRelay
from support.streams import send_chunked
from support.tcp import tcp_relays

from jitrelay.core.protocol import build_message
from jitrelay.core.units import KiB, MiB


@pytest.fixture(params=["unix", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def start_relay(start_relay: StartRelay, transport: str) -> Callable:
    return start_relay if transport == "unix" else tcp_relays(start_relay)


@pytest.fixture
def peer_name(transport: str) -> Callable[[socket.socket], str]:
    """How the relay's log names the peer on the other end of a client socket."""
    if transport == "tcp":
        return lambda sock: f"addr=127.0.0.1:{sock.getsockname()[1]}"
    return lambda sock: f"pid={os.getpid()}"


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_mixed_stream_in_tiny_chunks_reaches_each_subscriber_exactly(
    start_relay: StartRelay, clients: Clients, domain: str
) -> None:
    relay = start_relay(domain)
    domain_id = DOMAINS[domain][0]
    subscribers = [clients.reader(relay) for _ in range(3)]
    publisher = clients.connect(relay)
    sync(publisher, subscribers, domain_id)

    rng = random.Random(f"mixed {domain}")
    messages = mixed_messages(rng, domain, 400)
    expected = b"".join(m for m, forwarded in messages if forwarded)
    assert 0 < len(expected) < sum(len(m) for m, _ in messages)
    send_chunked(publisher, b"".join(m for m, _ in messages), rng, (1, 1, 1, 2, 3, 5, 31, 32, 33, 100, 700, 4096))

    for sub in subscribers:
        sub.wait_received(len(expected))
    time.sleep(0.2)  # room for any bytes that should not come
    for i, sub in enumerate(subscribers):
        assert_stream(sub.data, expected, f"subscriber {i}")
    publisher.setblocking(False)
    with pytest.raises(BlockingIOError):
        publisher.recv(1)  # a publisher never gets its own messages back


def test_publisher_leaving_mid_message_forwards_nothing_of_it(start_relay: StartRelay, clients: Clients) -> None:
    relay = start_relay("signal")
    subscriber = clients.reader(relay)
    first = clients.connect(relay)
    sync(first, [subscriber], 2)

    rng = random.Random("mid-message")
    expected = b""
    whole = build_message(2, payload=valid_payload(rng, 20, 39) + extended_record(21, b"x" * 600), sequence=99)
    for cut in (1, 4, 8, 27, 31, 32, 33, 40, len(whole) - 1):
        publisher = first if cut == 1 else clients.connect(relay)
        done = [build_message(2, [(20, b"%d" % cut)], sequence=k) for k in range(2)]
        publisher.sendall(b"".join(done) + whole[:cut])
        expected += b"".join(done)
        assert subscriber.wait_received(len(expected)), f"complete messages before a cut at {cut} not forwarded"
        time.sleep(0.05)  # let the relay read the partial message before the publisher goes
        publisher.close()

    last = clients.connect(relay)
    tail = build_message(2, [(39, b"after")], sequence=1000)
    last.sendall(tail)
    expected += tail
    subscriber.wait_received(len(expected))
    time.sleep(0.2)
    assert_stream(subscriber.data, expected)


FAULT_CASES = {
    # name: (domain, relay options, reason, largest payload allowed, bytes that are fatal)
    "bad_magic": ("market_data", (), "bad_magic", None, build_message(1, [(1, b"m")], magic=0xCAFEBABE)),
    "zero_magic": ("execution", (), "bad_magic", None, bytes(40)),
    "oversize_signal": ("signal", (), "oversize", 32 * KiB, None),
    "oversize_market_data": ("market_data", (), "oversize", 1 * MiB, None),
    "oversize_max_payload": ("market_data", ("--max-payload", "4096"), "oversize", 4096, None),
}


@pytest.mark.parametrize("case", list(FAULT_CASES))
def test_stream_fault_closes_only_that_connection(
    start_relay: StartRelay, clients: Clients, peer_name: Callable[[socket.socket], str], case: str
) -> None:
    domain, options, reason, limit, fatal = FAULT_CASES[case]
    domain_id, lo, hi, _ = DOMAINS[domain]
    relay = start_relay(domain, *options)
    subscriber = clients.reader(relay)
    other = clients.connect(relay)
    other_reader = clients.reader(relay, other)
    faulty = clients.connect(relay)
    sync(faulty, [subscriber, other_reader], domain_id)

    before = [build_message(domain_id, [(lo, b"before %d" % k)], sequence=k) for k in range(3)]
    if limit is not None:
        before.append(build_message(domain_id, payload=exact_payload(hi, limit), sequence=3))  # at the limit
        fatal = build_message(domain_id, payload=exact_payload(hi, limit + 1), sequence=4)[:32]  # header only
    after = build_message(domain_id, [(lo, b"after the fault")], sequence=5)
    faulty.sendall(b"".join(before) + fatal + after)

    relay.wait_line(reason, peer_name(faulty))
    faulty.settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        assert faulty.recv(1) == b"", "the relay should have closed the faulty connection"

    others = [build_message(domain_id, [(hi, b"still here %d" % k)], sequence=10 + k) for k in range(2)]
    other.sendall(b"".join(others))
    expected = b"".join(before) + b"".join(others)
    subscriber.wait_received(len(expected))
    other_reader.wait_received(len(b"".join(before)))
    time.sleep(0.2)
    assert_stream(subscriber.data, expected, "subscriber")
    assert_stream(other_reader.data, b"".join(before), "the other client")
    assert relay.proc.poll() is None
