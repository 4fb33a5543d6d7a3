"""Clients that survive their relay: a relay SIGKILLed and restarted under a publisher and a subscriber.

The subscriber runs in a process of its own and writes every message it
receives; the publisher publishes in this one, before the kill and while the
relay is down (its publish waits for the new relay). What the subscriber
received, byte for byte, plus its gap notices, must account for every message
published: on market data the relay's new epoch is announced as a gap whose
size is not known (and none is lost, as the relay had forwarded everything
when it died); on execution the journal replays the old epoch and there is no
gap at all. Then the same without a relay to come back to: both give up with
``ReconnectFailed``, never a silent end. And back-pressure: a publisher held
under ``block`` gets ``PublishTimeout`` within its timeout, the message not
published, and without a timeout still waits.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from support.clients import Clients
from support.relays import RelayProcess, StartRelay

from jitrelay import AsyncPublisher, AsyncSubscriber, Publisher, Subscriber
from jitrelay.client import PublishTimeout, Reconnect, ReconnectBufferFull, ReconnectFailed
from jitrelay.client.reconnect import whole_from
from jitrelay.core import protocol
from jitrelay.core.units import MiB

TYPES = {"market_data": 1, "execution": 40}
SOURCE = 7
STAMP = 1_700_000_000_000_000_000

# Subscribes with positions (and shared memory if asked), writes each message's bytes, stops at the last sequence.
_SUBSCRIBER = """
import json, sys
from jitrelay import Subscriber
from jitrelay.client import Reconnect
domain, path, out, last, shm = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
events = []
policy = Reconnect(on_disconnected=lambda error: events.append("lost"), on_reconnected=lambda n: events.append("back"))
with open(out, "wb") as data, Subscriber(domain, path, positions=True, shared_memory=shm, reconnect=policy) as sub:
    sub.recv_batch(timeout=0.5)  # the relay's first notice: from here on, everything published is ours
    open(out + ".ready", "w").close()
    for message in sub:
        data.write(message.raw)
        data.flush()
        if message.sequence == last:
            break
    result = {"gaps": [list(gap) for gap in sub.gaps], "events": events, "reconnects": sub.reconnects}
with open(out + ".json", "w") as done:
    json.dump(result, done)
"""


def expected(domain: str, first: int, stop: int) -> bytes:
    """The messages ``first..stop-1`` exactly as the publisher below builds them."""
    logic_id = {"market_data": protocol.MARKET_DATA, "execution": protocol.EXECUTION}[domain]
    out = b""
    for n in range(first, stop):
        message = protocol.build_message(
            logic_id, [(TYPES[domain], b"%08d" % n * 4)], source=SOURCE, sequence=n, timestamp_ns=STAMP + n
        )
        if domain != "execution":  # market data's policy does not check it, so the publisher leaves it 0
            message = message[: protocol.OFF_CHECKSUM] + bytes(4) + message[protocol.OFF_CHECKSUM + 4 :]
        out += message
    return out


def differences(received: bytes, total: int) -> str:
    """What a received stream lacks or has twice, by sequence number: what a failure must say to be read."""
    sequences = [message.header.sequence for message in protocol.decode_messages(received)]
    counted = Counter(sequences)
    missing = sorted(set(range(total)) - set(counted))
    doubled = sorted(n for n, k in counted.items() if k > 1)
    return f"{len(sequences)} messages, missing {ranges_of(missing)}, doubled {ranges_of(doubled)}"


def ranges_of(numbers: list[int]) -> str:
    """``[3, 4, 5, 9]`` as ``3-5, 9``."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and spans[-1][1] == n - 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans) or "none"


def publish(pub: Publisher, domain: str, first: int, stop: int) -> None:
    for n in range(first, stop):
        pub.publish([(TYPES[domain], b"%08d" % n * 4)], timestamp_ns=STAMP + n)


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("shared_memory", [False, True], ids=["socket", "shared-memory"])
@pytest.mark.parametrize("domain", ["market_data", "execution"])
def test_a_relay_killed_and_restarted_under_its_clients_loses_nothing_unannounced(
    start_relay: StartRelay, short_dir: Path, domain: str, shared_memory: bool
) -> None:
    options = ["--journal-dir", str(short_dir / "audit")] if domain == "execution" else []
    socket_path = short_dir / f"{domain}.sock"
    relay = start_relay(domain, *options, socket_path=socket_path)
    before, total = 500, 1500
    out = short_dir / "received.bin"
    args = [sys.executable, "-c", _SUBSCRIBER, domain, str(socket_path), str(out), str(total - 1)]
    subscriber = subprocess.Popen([*args, "1" if shared_memory else "0"])
    try:
        wait_for(lambda: Path(f"{out}.ready").exists() or subscriber.poll() is not None, 60, "the subscriber")
        assert subscriber.poll() is None, "the subscriber died before it was ready"
        lost, back = [], []
        policy = Reconnect(on_disconnected=lost.append, on_reconnected=back.append)
        with Publisher(domain, socket_path, source=SOURCE, reconnect=policy) as pub:
            publish(pub, domain, 0, before)
            wait_for(lambda: out.stat().st_size >= len(expected(domain, 0, before)), 30, "the first messages")
            relay.proc.kill()  # SIGKILL: no goodbye, no summary
            relay.proc.wait(10)
            restarted: list[RelayProcess] = []
            later = threading.Timer(
                0.3, lambda: restarted.append(start_relay(domain, *options, socket_path=socket_path))
            )
            later.start()
            publish(pub, domain, before, total)  # the first of these waits for the new relay
            later.join(60)
            assert restarted, "the relay did not restart"
            assert pub.reconnects >= 1 and len(lost) == len(back) == pub.reconnects
        assert subscriber.wait(60) == 0
    finally:
        subscriber.kill()
        subscriber.wait(10)
    result = json.loads(Path(f"{out}.json").read_text())
    received = out.read_bytes()
    if received != expected(domain, 0, total):
        pytest.fail(
            f"lost, doubled or changed messages: {differences(received, total)}; subscriber {result}\n"
            f"first relay:\n{relay.stderr}\nrestarted relay:\n{restarted[0].stderr}"
        )
    # A dying relay's listening socket may still take a connection for a moment: then lost and back once more.
    assert result["events"] == ["lost", "back"] * result["reconnects"] and result["reconnects"] >= 1
    if domain == "execution":
        assert result["gaps"] == []  # the journal replayed the old epoch from where the subscriber stood
    else:
        assert result["gaps"] == [[protocol.GAP_UNKNOWN_EPOCH, protocol.UNKNOWN, protocol.UNKNOWN]]


def test_clients_that_cannot_get_their_relay_back_give_up_with_an_error(start_relay: StartRelay) -> None:
    relay = start_relay("market_data")
    policy = Reconnect(attempts=3, first_delay=0.01, max_delay=0.02)
    with (
        Subscriber("market_data", relay.socket_path, reconnect=policy) as sub,
        Subscriber("market_data", relay.socket_path, reconnect=policy, shared_memory=True) as mapped,
        Publisher("market_data", relay.socket_path, reconnect=policy) as pub,
    ):
        relay.proc.kill()
        relay.proc.wait(10)
        with pytest.raises(ReconnectFailed, match="subscriber to the market_data relay .* gave up .* after 3 tries"):
            list(sub)
        with pytest.raises(ReconnectFailed, match="gave up"):
            list(mapped)
        with pytest.raises(ReconnectFailed, match="publisher to the market_data relay .* gave up"):
            pub.publish([(1, b"x")])
        with pytest.raises(ReconnectFailed):  # and it stays given up
            pub.publish([(1, b"x")])


def test_a_held_publisher_times_out_and_without_a_timeout_still_waits(
    start_relay: StartRelay, clients: Clients
) -> None:
    relay = start_relay("execution", "--log-size", str(2 * MiB))
    stopped = clients.reader(relay)  # a subscriber that stops reading: under block, it holds the publishers
    stopped.pause()
    time.sleep(0.1)
    value = bytes(range(200))
    with Publisher("execution", relay.socket_path, source=SOURCE) as pub:
        published: list[int] = []
        started = time.monotonic()
        with pytest.raises(PublishTimeout, match="not published"):
            for n in range(10**6):
                before = time.monotonic()
                published.append(pub.publish([(40, value)], timestamp_ns=STAMP + n, timeout=0.25))
        waited = time.monotonic() - before
        assert 0.2 <= waited < 10, f"the timed-out publish took {waited:.3f} s"
        assert time.monotonic() - started < 120 and len(published) > 2 * MiB // 240
        assert pub.next_sequence == len(published)  # the timed-out message took no sequence number
        with pytest.raises(PublishTimeout):
            pub.publish([(40, value)], timeout=0)  # never wait: would block
        with pytest.raises(PublishTimeout):
            pub.publish([(40, value)], block=False)  # the same, said the other way
        done = threading.Event()
        waiting = threading.Thread(
            target=lambda: (pub.publish([(40, value)], timestamp_ns=STAMP + len(published)), done.set())
        )
        waiting.start()
        assert not done.wait(1.0), "a publish without a timeout did not wait for the held relay"
        stopped.resume()
        assert done.wait(60), "the publish did not go on once the subscriber read again"
        waiting.join(10)
        pub.flush()
        count = len(published) + 1
        messages = b"".join(
            protocol.build_message(protocol.EXECUTION, [(40, value)], source=SOURCE, sequence=n, timestamp_ns=STAMP + n)
            for n in range(count)
        )
        assert stopped.wait_received(len(messages), 60)
    assert bytes(stopped.data) == messages


def test_the_backoff_schedule_grows_to_its_cap_and_stops_at_attempts() -> None:
    policy = Reconnect(attempts=9, first_delay=0.01, max_delay=0.1, multiplier=2.0, jitter=0.0)
    assert list(policy.delays(random.Random(1))) == pytest.approx([0, 0.01, 0.02, 0.04, 0.08, 0.1, 0.1, 0.1, 0.1])
    spread = list(Reconnect(attempts=50, jitter=0.2).delays(random.Random(2)))
    assert len(spread) == 50 and spread[0] == 0 and max(spread) <= 0.2 * 1.2 and min(spread[1:]) >= 0.01 * 0.8
    with pytest.raises(ValueError):
        Reconnect(attempts=0)
    with pytest.raises(ValueError):
        Reconnect(first_delay=1.0, max_delay=0.5)


def test_a_publisher_writes_again_from_the_first_message_not_taken_whole() -> None:
    messages = [protocol.build_message(protocol.MARKET_DATA, [(1, bytes(n))], sequence=n) for n in (5, 40, 0, 7)]
    data = memoryview(b"".join(messages))
    starts = [0, len(messages[0]), len(messages[0]) + len(messages[1]), len(b"".join(messages[:3]))]
    assert [whole_from(data, at) for at in (0, 1, starts[1], starts[1] + 5, starts[2], starts[3] + 1)] == [
        0,
        0,
        starts[1],
        starts[1],
        starts[2],
        starts[3],
    ]
    assert whole_from(memoryview(b"not a message at all, raw bytes"), 9) == 9


@pytest.mark.parametrize("shared_memory", [False, True], ids=["socket", "shared-memory"])
def test_asyncio_clients_survive_a_relay_killed_and_restarted(
    start_relay: StartRelay, short_dir: Path, shared_memory: bool
) -> None:
    domain, before, total = "market_data", 300, 900
    socket_path = short_dir / f"{domain}.sock"
    relay = start_relay(domain, socket_path=socket_path)

    async def scenario() -> tuple[bytes, list[protocol.Gap], int, int]:
        loop = asyncio.get_running_loop()
        received = bytearray()
        async with (
            AsyncSubscriber(domain, socket_path, positions=True, shared_memory=shared_memory) as sub,
            AsyncPublisher(domain, socket_path, source=SOURCE) as pub,
        ):
            await sub.recv_batch(timeout=0.5)  # the relay's first notice: from here on, everything is ours

            async def consume() -> None:
                async for message in sub:
                    received.extend(message.raw)
                    if message.sequence == total - 1:
                        return

            consuming = loop.create_task(consume())
            for n in range(before):
                await pub.publish([(TYPES[domain], b"%08d" % n * 4)], timestamp_ns=STAMP + n)
            await pub.flush()
            while len(received) < len(expected(domain, 0, before)):
                await asyncio.sleep(0.01)
            relay.proc.kill()
            await loop.run_in_executor(None, relay.proc.wait, 10)
            await asyncio.sleep(0.1)  # the publisher hears of it (its connection's end) before it writes again
            restarting = loop.run_in_executor(None, lambda: start_relay(domain, socket_path=socket_path))
            for n in range(before, total):
                await pub.publish([(TYPES[domain], b"%08d" % n * 4)], timestamp_ns=STAMP + n)
            await restarting
            await pub.flush()
            await asyncio.wait_for(consuming, 60)
            return bytes(received), list(sub.gaps), sub.reconnects, pub.reconnects

    got, gaps, sub_reconnects, pub_reconnects = asyncio.run(scenario())
    assert got == expected(domain, 0, total), "lost, doubled or changed messages"
    assert gaps == [(protocol.GAP_UNKNOWN_EPOCH, protocol.UNKNOWN, protocol.UNKNOWN)]
    assert sub_reconnects >= 1 and pub_reconnects >= 1


def test_an_asyncio_publisher_held_by_a_stopped_subscriber_times_out(start_relay: StartRelay, clients: Clients) -> None:
    relay = start_relay("execution", "--log-size", str(2 * MiB))
    stopped = clients.reader(relay)
    stopped.pause()
    time.sleep(0.1)

    async def scenario() -> tuple[int, float]:
        async with AsyncPublisher("execution", relay.socket_path, source=SOURCE) as pub:
            for n in range(10**6):
                before = time.monotonic()
                try:
                    await pub.publish([(40, bytes(200))], timestamp_ns=STAMP + n, timeout=0.25)
                except PublishTimeout:
                    waited = time.monotonic() - before
                    with pytest.raises(TimeoutError):  # the same bound with asyncio's own timeout
                        async with asyncio.timeout(0.25):
                            await pub.flush()
                    with pytest.raises(PublishTimeout):  # would block
                        await pub.publish([(40, bytes(200))], timestamp_ns=STAMP + n, block=False)
                    stopped.resume()
                    await pub.flush()
                    return n, waited
        raise AssertionError("the relay never held the publisher")

    published, waited = asyncio.run(scenario())
    assert 0.2 <= waited < 10, f"the timed-out publish took {waited:.3f} s"
    messages = b"".join(
        protocol.build_message(
            protocol.EXECUTION, [(40, bytes(200))], source=SOURCE, sequence=n, timestamp_ns=STAMP + n
        )
        for n in range(published)
    )
    assert stopped.wait_received(len(messages), 60)
    time.sleep(0.2)
    assert bytes(stopped.data) == messages  # the timed-out message was never published


def test_a_subscriber_comes_back_with_the_subscription_it_had_changed_to(start_relay: StartRelay) -> None:
    relay = start_relay("market_data")
    path = relay.socket_path
    with Subscriber("market_data", path, tlv_types=[1], positions=True) as sub:
        sub.subscribe(tlv_types=[2], sources=[SOURCE])
        sub.recv_batch(timeout=0.5)
        relay.proc.kill()
        relay.proc.wait(10)
        start_relay("market_data")  # a new epoch: the subscriber resumes to a gap, then the new relay's whole log
        sent = [
            protocol.build_message(protocol.MARKET_DATA, [(tlv, b"%d" % n)], source=source, sequence=n)
            for n, (tlv, source) in enumerate([(1, SOURCE), (2, SOURCE), (2, 3), (2, SOURCE), (1, 3)] * 20)
        ]
        with Publisher("market_data", path, source=SOURCE) as pub:
            pub.publish_batch(b"".join(sent))
        wanted = [m for m in sent if m[protocol.HEADER_SIZE] == 2 and m[protocol.OFF_SOURCE] == SOURCE]
        got = [message.raw for _, message in zip(range(len(wanted)), sub, strict=False)]
        assert got == wanted
        assert sub.reconnects >= 1
        assert sub.gaps == [(protocol.GAP_UNKNOWN_EPOCH, protocol.UNKNOWN, protocol.UNKNOWN)]


def test_asyncio_clients_that_cannot_get_their_relay_back_give_up_with_an_error(start_relay: StartRelay) -> None:
    relay = start_relay("signal")
    policy = Reconnect(attempts=3, first_delay=0.01, max_delay=0.02)

    async def scenario() -> None:
        async with (
            AsyncSubscriber("signal", relay.socket_path, reconnect=policy) as sub,
            AsyncPublisher("signal", relay.socket_path, reconnect=policy) as pub,
        ):
            relay.proc.kill()
            await asyncio.get_running_loop().run_in_executor(None, relay.proc.wait, 10)
            with pytest.raises(ReconnectFailed, match="subscriber to the signal relay .* gave up .* after 3 tries"):
                async for _ in sub:
                    pass
            with pytest.raises(ReconnectFailed, match="publisher to the signal relay .* gave up"):
                for _ in range(100):  # the first publishes may land in the buffer while it tries
                    await pub.publish([(20, b"x")])
                    await asyncio.sleep(0.01)

    asyncio.run(scenario())


def test_an_asyncio_publisher_keeps_at_most_its_buffer_limit_while_reconnecting(start_relay: StartRelay) -> None:
    relay = start_relay("signal")
    lost = threading.Event()
    policy = Reconnect(
        attempts=None, first_delay=0.05, max_delay=0.05, buffer_limit=1000, on_disconnected=lambda _: lost.set()
    )
    value = bytes(66)  # 100-byte messages

    async def scenario() -> tuple[int, int, int, float]:
        pub = await AsyncPublisher("signal", relay.socket_path, reconnect=policy).connect()
        relay.proc.kill()
        await asyncio.get_running_loop().run_in_executor(None, relay.proc.wait, 10)
        await asyncio.get_running_loop().run_in_executor(None, lost.wait, 10)
        kept = 0
        with pytest.raises(ReconnectBufferFull, match="keeps 1000 bytes already .* not published"):
            while True:
                pub.publish_nowait([(20, value)])
                kept += 1
        with pytest.raises(ReconnectBufferFull):  # and again, while the relay stays away
            pub.publish_nowait([(20, value)])
        buffered, number = pub.buffered, pub.next_sequence
        started = time.monotonic()
        await pub.close(timeout=0.2)  # no relay to flush into: close gives up after its timeout
        return kept, buffered, number, time.monotonic() - started

    kept, buffered, number, closing = asyncio.run(scenario())
    assert kept == 10 and buffered == 1000 and number == 10  # the refused messages took no sequence number
    assert closing < 10
