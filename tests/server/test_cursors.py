"""Cursors into the log on real relays: a stopped subscriber process never holds the others back.

A subscriber stopped with SIGSTOP (a strategy in a long pause) while a
publisher runs at full speed: under ``disconnect`` the others get every byte
and it alone is cut off, counted once, having received an exact prefix of the
stream; under ``block`` nothing is lost by anyone, and the publisher waits
only once the log is full up to the stopped cursor. Times are measured by
``jitrelay bench``; these tests assert delivery, order and counts only.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from support.clients import Clients, NumberedStream, StreamCheck, publish_while_stopped, sync
from support.processes import ReaderProcess
from support.relays import StartRelay

from jitrelay.core import protocol
from jitrelay.core.units import MiB


def test_a_stopped_subscriber_is_cut_off_alone_and_the_others_get_everything(
    start_relay: StartRelay, clients: Clients, short_dir: Path
) -> None:
    summary = short_dir / "figures.json"
    relay = start_relay("market_data", "--log-size", str(8 * MiB), "--summary-file", str(summary))
    stream = NumberedStream(1, [(1, b"q" * 37)], chunk_messages=14768, chunks=48)  # ~48 MiB of 71-byte messages
    checks = [StreamCheck(stream) for _ in range(3)]
    healthy = [clients.reader(relay, sink=check) for check in checks]
    stopped = ReaderProcess(relay.socket_path, short_dir / "stopped.bin")
    try:
        relay.wait_line("connected", f"pid={stopped.pid}")
        publisher = clients.connect(relay)
        sync(publisher, healthy, 1)
        stopped.wait_probe()
        os.kill(stopped.pid, signal.SIGSTOP)
        publisher.settimeout(60)
        for i in range(stream.chunks):
            publisher.sendall(stream.chunk(i))
        for reader, check in zip(healthy, checks, strict=True):
            reader.wait_received(stream.total, 30)
            assert check.mismatch is None and check.offset == stream.total, check.verdict()
        relay.wait_line("disconnecting slow subscriber", f"pid={stopped.pid}", "fell out of the log")
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
    assert stopped.wait_exit() == 0  # the relay closed its connection
    got = stopped.stream()
    assert 0 < len(got) < stream.total
    assert got == stream.prefix(len(got)), "the stopped subscriber's bytes are not an exact prefix of the stream"
    relay.kill()
    figures = json.loads(summary.read_text())
    assert figures["slow_actions"] == {"hold": 0, "disconnect": 1, "gap_notice": 0}
    assert figures["slow_disconnected_pids"] == [stopped.pid]
    assert figures["messages_forwarded"] >= stream.chunks * stream.chunk_messages


def test_under_block_a_stopped_subscriber_holds_the_publisher_and_nobody_loses_anything(
    start_relay: StartRelay, clients: Clients, short_dir: Path
) -> None:
    relay = start_relay("execution", "--log-size", str(8 * MiB))
    stream = NumberedStream(3, [(40, b"x" * 400)], chunk_messages=1024, chunks=72)  # ~31 MiB of 435-byte messages
    check = StreamCheck(stream)
    other = clients.reader(relay, sink=check)
    stopped = ReaderProcess(relay.socket_path, short_dir / "stopped.bin")
    relay.wait_line("connected", f"pid={stopped.pid}")
    publisher = clients.connect(relay)
    sync(publisher, [other], 3)
    stopped.wait_probe()
    publish_while_stopped(relay, publisher, stream, stopped.pid, other)
    assert check.mismatch is None and check.offset == stream.total, check.verdict()
    publisher.close()
    assert relay.find_line("disconnecting slow subscriber") is None
    relay.kill()  # the stopped one has caught up: it has everything when the relay closes it
    assert stopped.wait_exit() == 0
    assert stopped.stream() == stream.prefix(stream.total)


def test_a_filtered_subscriber_that_stops_mid_batch_catches_up_with_exactly_its_selection(
    start_relay: StartRelay, clients: Clients
) -> None:
    relay = start_relay("market_data", "--log-size", str(128 * MiB))
    count = 48 * MiB // 71  # a stream cycling through types 1..4: its quarter is more than the socket holds
    batch = protocol.build_cycled_batch(protocol.MARKET_DATA, count, [[(t, b"q" * 37)] for t in (1, 2, 3, 4)])
    messages = batch.reshape(count, 71)
    sock = clients.connect(relay)
    sock.sendall(protocol.subscribe_message([2]))
    relay.wait_line("subscribes to")
    filtered = clients.reader(relay, sock)
    everything = clients.reader(relay)
    publisher = clients.connect(relay)
    sync(publisher, [everything], protocol.MARKET_DATA)
    filtered.pause()  # its socket fills in the middle of a batch: it owes its group's ranges from there
    publisher.settimeout(60)
    for at in range(0, len(batch), MiB):
        publisher.sendall(batch[at : at + MiB])
    assert everything.wait_received(len(batch), 60)
    assert bytes(everything.data) == batch.tobytes()
    filtered.resume()
    want = messages[1::4].tobytes()
    assert filtered.wait_received(len(want), 60)
    assert bytes(filtered.data) == want
    assert relay.find_line("disconnecting") is None


@pytest.mark.parametrize("first", [[2], None], ids=["filtered", "unfiltered"])
def test_a_subscriber_behind_mid_message_that_changes_its_subscription_gets_that_message_whole_first(
    start_relay: StartRelay, clients: Clients, first: list[int] | None
) -> None:
    """Its new selection starts at the head; the message its socket took part of under the old one is finished."""
    relay = start_relay("market_data", "--log-size", str(128 * MiB))
    count = 48 * MiB // 71
    batch = protocol.build_cycled_batch(protocol.MARKET_DATA, count, [[(t, b"q" * 37)] for t in (1, 2, 3, 4)])
    messages = batch.reshape(count, 71)
    sock = clients.connect(relay)
    if first is not None:
        sock.sendall(protocol.subscribe_message(first))
        relay.wait_line("subscribes to", "types 2")
    filtered = clients.reader(relay, sock)
    everything = clients.reader(relay)
    publisher = clients.connect(relay)
    sync(publisher, [everything, filtered] if first is None else [everything], protocol.MARKET_DATA)
    filtered.pause()  # its socket fills, almost surely in the middle of a message
    publisher.settimeout(60)
    for at in range(0, len(batch), MiB):
        publisher.sendall(batch[at : at + MiB])
    assert everything.wait_received(len(batch), 60)
    sock.sendall(protocol.subscribe_message([3]))  # while it is behind: from now on, the head and type 3
    relay.wait_line("subscribes to", "types 3")
    later = protocol.build_cycled_batch(protocol.MARKET_DATA, 4000, [[(t, b"r" * 37)] for t in (1, 2, 3, 4)])
    publisher.sendall(later)
    assert everything.wait_received(len(batch) + len(later), 60)
    filtered.resume()
    then = later.reshape(4000, 71)[2::4].tobytes()
    old = messages[1::4].tobytes() if first is not None else batch.tobytes()
    assert filtered.wait_for(lambda: bytes(filtered.data).endswith(then), 60)
    got = bytes(filtered.data)
    before = got[: len(got) - len(then)]
    assert len(before) % 71 == 0 and before == old[: len(before)], "the old selection's last message was cut"
    assert 0 < len(before) < len(old)  # it stopped part way through what it owed
