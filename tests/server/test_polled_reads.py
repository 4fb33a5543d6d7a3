"""The relay's own reads (``server/polled_reads.py``): a failure of the poll loop costs its speed, never a byte.

A relay in this process, on one event loop, with a publisher and a
subscriber on socket pairs. The poll loop is made to fail at its first call
after some reads: the relay must say so once, hand every publisher back to
the event loop, and forward every message, byte for byte, before and after.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
import uvloop

from jitrelay.core import protocol
from jitrelay.core.domains import logic_for
from jitrelay.kernels.polling import PollLoop
from jitrelay.server.engine import Relay


def message(n: int) -> bytes:
    return protocol.build_message(protocol.MARKET_DATA, [(1, bytes([n % 251]) * 40)], sequence=n, timestamp_ns=n)


async def relay_run(batches: list[bytes]) -> tuple[bytes, Relay]:
    relay = Relay(logic_for("market_data"))
    loop = asyncio.get_running_loop()
    ours = []
    try:
        for _ in range(2):
            mine, theirs = socket.socketpair()
            mine.setblocking(False)
            ours.append(mine)
            await loop.connect_accepted_socket(relay.new_connection, theirs)
        subscriber, publisher = ours
        await asyncio.sleep(0)
        want = sum(len(b) for b in batches)
        got = bytearray()
        for batch in batches:
            await loop.sock_sendall(publisher, batch)
            for _ in range(10):
                await asyncio.sleep(0)
        while len(got) < want:
            got += await asyncio.wait_for(loop.sock_recv(subscriber, 1 << 16), 10)
        return bytes(got), relay
    finally:
        for sock in ours:
            sock.close()
        await relay.drain_and_close(0.1)


def test_a_failing_poll_loop_hands_every_publisher_back_and_loses_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []
    works = PollLoop.read_ready

    def fails_at_the_third(self: PollLoop, *args: object) -> int:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a bug in the poll loop")
        return works(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(PollLoop, "read_ready", fails_at_the_third)
    batches = [b"".join(message(100 * k + n) for n in range(20)) for k in range(30)]
    with caplog.at_level(logging.ERROR, logger="jitrelay.relay"):
        got, relay = uvloop.run(relay_run(batches))
    assert got == b"".join(batches)
    assert relay.reads_polled > 0 and len(calls) == 3  # it read for itself, then never tried again
    failures = [r for r in caplog.records if "own reads failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


def test_the_relays_own_reads_take_an_ordinary_stream() -> None:
    batches = [b"".join(message(100 * k + n) for n in range(20)) for k in range(30)]
    got, relay = uvloop.run(relay_run(batches))
    assert got == b"".join(batches) and relay.reads_polled >= 20  # the first read is the event loop's
