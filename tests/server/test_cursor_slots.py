"""The cursor table inside a relay: a slot per admitted connection, and the modes and flags its cursor goes through.

A relay in this process, on one event loop, with peers on socket pairs, so
that the test can look at the table between steps: what the relay's
behaviour is made of, and what its figures count.
"""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import uvloop

from jitrelay.core import protocol
from jitrelay.core.domains import BLOCK, logic_for
from jitrelay.core.units import KiB, MiB
from jitrelay.server.cursors import CATCHING_UP, CursorFlag, CursorMode, CursorTable
from jitrelay.server.engine import Relay

WAIT_SECONDS = 60.0  # the first relay of a session may build the kernels first


def assert_recount(table: CursorTable) -> None:
    """The table's counts are those of its arrays."""
    for mode in CursorMode:
        assert table.count(mode) == int(np.count_nonzero(table.mode == mode)) == table.mode_counts[mode], mode
    for flag in CursorFlag:
        assert table.count_flagged(flag) == int(np.count_nonzero(table.flags & flag)), flag


async def until(condition: object, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def connect(relay: Relay) -> socket.socket:
    mine, theirs = socket.socketpair()
    mine.setblocking(False)
    await asyncio.get_running_loop().connect_accepted_socket(relay.new_connection, theirs)
    await asyncio.sleep(0)
    return mine


async def slots_run() -> None:
    relay = Relay(logic_for("market_data", max_connections=3))
    table = relay.cursors
    peers = [await connect(relay) for _ in range(3)]
    try:
        conns = list(relay.connections.values())
        assert [c.cursor_slot for c in conns] == [0, 1, 2] and table.full
        assert table.count(CursorMode.KEEPING_UP) == 3 and [table.fd[c.cursor_slot] for c in conns] == [
            c.fd for c in conns
        ]
        refused = await connect(relay)  # the limit: refused before it takes a slot
        refused.close()
        assert relay.refused["connection_limit"] == 1 and len(relay.connections) == 3

        peers.pop(1).close()
        await until(lambda: conns[1].conn_id not in relay.connections, "the closed peer to be removed")
        assert conns[1].cursor_slot == -1 and table.count(CursorMode.FREE) == 1 and not table.full
        assert_recount(table)

        peers.append(await connect(relay))
        newcomer = list(relay.connections.values())[-1]
        assert newcomer.cursor_slot == 1 and table.connections[1] is newcomer
        assert_recount(table)
    finally:
        for peer in peers:
            peer.close()
        await relay.drain_and_close(0.1)


def test_each_connection_has_a_slot_from_admission_to_close_and_a_freed_slot_is_taken_again() -> None:
    uvloop.run(slots_run())


def message(n: int) -> bytes:
    return protocol.build_message(protocol.MARKET_DATA, [(1, bytes([n % 251]) * (60 * KiB))], sequence=n)


async def held_run() -> None:
    # Under ``block``, a log of 2 MiB: a subscriber that stops reading holds the publisher once the log is full.
    relay = Relay(logic_for("market_data", slow_policy=BLOCK, buffer_size=1 * MiB, log_size=2 * MiB))
    table = relay.cursors
    loop = asyncio.get_running_loop()
    subscriber = await connect(relay)
    publisher = await connect(relay)
    sub, pub = relay.connections.values()
    stream = b"".join(message(n) for n in range(400))  # 24 MiB: more than the log and the socket buffers hold
    sending = loop.create_task(loop.sock_sendall(publisher, stream))
    try:
        await until(lambda: pub.held, "the publisher to be held")
        assert sub.behind and table.mode[sub.cursor_slot] == CursorMode.BEHIND
        assert table.count(*CATCHING_UP) == 1 and table.members(*CATCHING_UP) == [sub]
        assert table.flagged(CursorFlag.HELD) == [pub] and pub.polled < 0  # held: out of the relay's epoll set
        assert relay.figures().subscribers_behind == 1
        assert_recount(table)

        got = bytearray()
        while len(got) < len(stream):
            got += await asyncio.wait_for(loop.sock_recv(subscriber, 1 << 20), WAIT_SECONDS)
        assert bytes(got) == stream
        await sending
        await until(lambda: not sub.behind, "the subscriber to catch up")
        assert table.mode[sub.cursor_slot] == CursorMode.KEEPING_UP and not pub.held
        assert table.count(*CATCHING_UP) == 0 and table.count_flagged(CursorFlag.HELD) == 0
        assert relay.slow_pauses >= 1 and relay.fell_behind >= 1
        assert_recount(table)
    finally:
        sending.cancel()
        subscriber.close()
        publisher.close()
        await relay.drain_and_close(0.1)


def test_a_stopped_subscriber_falls_behind_holds_the_publisher_and_both_resume_from_the_table() -> None:
    uvloop.run(held_run())
