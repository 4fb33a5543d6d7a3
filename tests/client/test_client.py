"""Publishers and subscribers, against a real relay process and, for what a relay never sends, a fake one.

Expected bytes come from ``reference`` (an encoder written from PROTOCOL.md),
not from the client's own builder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import socket
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st
from support.commands import no_more, receive, stop
from support.reference import extended_record, message, standard_record
from support.relays import RelayProcess, StartRelay

from jitrelay.client import AsyncPublisher, AsyncSubscriber, Publisher, RelayConnectionError, Subscriber
from jitrelay.client import subscriber as client_module
from jitrelay.core import protocol
from jitrelay.kernels.framer import MessageFramer

MARKET_DATA, SIGNAL, EXECUTION = 1, 2, 3


# --- MessageFramer: no socket needed -------------------------------------------------------------------------------


def sample_stream() -> tuple[bytes, list[bytes]]:
    messages = [
        message(MARKET_DATA, b"", sequence=0),
        message(MARKET_DATA, standard_record(1, b"x" * 37), sequence=1, source=4),
        message(MARKET_DATA, standard_record(2, b"") + standard_record(3, bytes(range(200))), sequence=2),
        message(MARKET_DATA, extended_record(5, bytes(1000)), sequence=3),
        message(MARKET_DATA, standard_record(19, b"\xff"), sequence=4),
    ]
    return b"".join(messages), messages


def split_batches(batches: list[np.ndarray]) -> list[bytes]:
    return [m.raw for batch in batches for m in protocol.decode_messages(batch.tobytes())]


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 31, 32, 33, 64, 71, 1000, 1 << 20])
@pytest.mark.parametrize("buffer_size", [1, 16, 64, 4096])
def test_framer_cuts_any_chunking_into_whole_messages(chunk: int, buffer_size: int) -> None:
    stream, messages = sample_stream()
    framer = MessageFramer(buffer_size)
    batches = []
    for pos in range(0, len(stream), chunk):
        framer.feed(stream[pos : pos + chunk])
        batch = framer.maybe_extract_batch()
        if batch is not None:
            batches.append(batch)
    assert framer.maybe_extract_batch() is None
    assert framer.buffered == 0
    assert b"".join(b.tobytes() for b in batches) == stream
    assert split_batches(batches) == messages


@pytest.mark.parametrize("chunk", [1, 7, 33, 500])
def test_framer_space_and_commit_like_recv_into(chunk: int) -> None:
    stream, messages = sample_stream()
    framer = MessageFramer(8)
    pos, batches = 0, []
    while pos < len(stream):
        space = framer.space()
        assert len(space) > 0
        count = min(len(space), chunk, len(stream) - pos)
        space[:count] = np.frombuffer(stream, dtype=np.uint8, count=count, offset=pos)
        framer.commit(count)
        pos += count
        while (batch := framer.maybe_extract_batch()) is not None:
            batches.append(batch)
    assert split_batches(batches) == messages
    assert framer.capacity == 2048  # doubled from 8 until the 1037-byte message fitted, and no further


@settings(max_examples=60, deadline=None)
@given(
    payload_sizes=st.lists(st.integers(0, 600), min_size=1, max_size=12),
    cuts=st.lists(st.integers(0, 8000), max_size=20),
    buffer_size=st.integers(1, 300),
)
def test_framer_property(payload_sizes: list[int], cuts: list[int], buffer_size: int) -> None:
    messages = [message(MARKET_DATA, bytes([9]) * n, sequence=i) for i, n in enumerate(payload_sizes)]
    stream = b"".join(messages)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    framer = MessageFramer(buffer_size)
    out = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        framer.feed(stream[a:b])
        batch = framer.maybe_extract_batch()
        if batch is not None:
            # Every batch ends on a message boundary of the stream.
            out.append(batch.tobytes())
            assert len(b"".join(out)) in {sum(len(m) for m in messages[:k]) for k in range(len(messages) + 1)}
    assert b"".join(out) == stream
    assert framer.buffered == 0


def test_framer_keeps_the_unfinished_message() -> None:
    first = message(MARKET_DATA, standard_record(1, b"abc"), sequence=1)
    second = message(MARKET_DATA, standard_record(1, b"defg"), sequence=2)
    framer = MessageFramer(64)
    framer.feed(first + second[:20])
    assert framer.maybe_extract_batch().tobytes() == first
    assert framer.buffered == 20
    assert framer.maybe_extract_batch() is None
    framer.feed(second[20:])
    assert framer.maybe_extract_batch().tobytes() == second
    assert framer.buffered == 0


def test_framer_batches_are_copies() -> None:
    first = message(MARKET_DATA, standard_record(1, b"A" * 10))
    second = message(MARKET_DATA, standard_record(1, b"B" * 10))
    framer = MessageFramer(len(first))
    framer.feed(first)
    batch = framer.maybe_extract_batch()
    framer.feed(second)  # lands where ``first`` was
    assert batch.tobytes() == first
    batch[:] = 0
    assert framer.maybe_extract_batch().tobytes() == second


def test_framer_bad_magic_after_good_messages() -> None:
    good = message(MARKET_DATA, standard_record(1, b"ok"))
    framer = MessageFramer(256)
    framer.feed(good + b"\x00\x01\x02")  # three bytes cannot be judged yet
    assert framer.maybe_extract_batch().tobytes() == good
    assert framer.maybe_extract_batch() is None
    framer.feed(b"\x03")
    with pytest.raises(protocol.ProtocolError, match="bad_magic"):
        framer.maybe_extract_batch()


def test_framer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        MessageFramer(0)
    framer = MessageFramer(16)
    with pytest.raises(ValueError):
        framer.commit(17)


# --- a fake relay, for streams a real relay never sends ------------------------------------------------------------


@contextlib.contextmanager
def fake_relay(chunks: list[bytes], pause: float = 0.0) -> Iterator[Path]:
    """A Unix server that sends ``chunks`` to its first client, then closes the connection."""
    with tempfile.TemporaryDirectory(prefix="jr-") as folder:
        path = Path(folder) / "fake.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                for chunk in chunks:
                    conn.sendall(chunk)
                    time.sleep(pause)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield path
        finally:
            thread.join(timeout=5)
            server.close()


def test_subscriber_grows_its_buffer_over_a_socket() -> None:
    stream, messages = sample_stream()
    chunks = [stream[i : i + 100] for i in range(0, len(stream), 100)]
    with (
        fake_relay(chunks, pause=0.001) as path,
        Subscriber("market_data", path, buffer_size=16, reconnect=False) as sub,
    ):
        assert [m.raw for m in sub] == messages


def test_without_reconnecting_eof_between_messages_ends_iteration_and_recv_batch_raises_eof() -> None:
    stream, messages = sample_stream()
    with fake_relay([stream]) as path, Subscriber("market_data", path, reconnect=False) as sub:
        assert [m.raw for m in sub] == messages
        with pytest.raises(EOFError):
            sub.recv_batch()


def test_without_reconnecting_eof_mid_message_raises() -> None:
    stream, messages = sample_stream()
    with fake_relay([stream[:-5]]) as path, Subscriber("market_data", path, reconnect=False) as sub:
        got = []
        with pytest.raises(RelayConnectionError, match="in the middle of a message"):
            got.extend(m.raw for m in sub)
        assert got == messages[:-1]


def test_subscriber_bad_magic_raises_protocol_error() -> None:
    good = message(MARKET_DATA, standard_record(1, b"ok"))
    with fake_relay([good, b"GET / HTTP/1.1\r\n"]) as path, Subscriber("market_data", path, reconnect=False) as sub:
        assert next(iter(sub)).raw == good
        with pytest.raises(protocol.ProtocolError):
            sub.recv_batch()


def test_without_reconnecting_async_eof_mid_message_raises() -> None:
    stream, messages = sample_stream()

    async def run(path: Path) -> list[bytes]:
        got = []
        async with AsyncSubscriber("market_data", path, buffer_size=16, reconnect=False) as sub:
            with pytest.raises(RelayConnectionError, match="in the middle of a message"):
                async for m in sub:
                    got.append(m.raw)
        return got

    with fake_relay([stream[:-1]]) as path:
        assert asyncio.run(run(path)) == messages[:-1]


@contextlib.contextmanager
def slow_reader() -> Iterator[tuple[Path, list[bytes]]]:
    """A Unix server that reads its first client slowly, in small pieces, until EOF, then closes."""
    with tempfile.TemporaryDirectory(prefix="jr-") as folder:
        path = Path(folder) / "slow.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)
        received: list[bytes] = []

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                time.sleep(0.1)
                while data := conn.recv(4096):
                    received.append(data)
                    time.sleep(0.0002)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield path, received
        finally:
            thread.join(timeout=30)
            server.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_async_publish_batch_returns_only_when_the_buffer_may_be_reused(loop_kind: str) -> None:
    # uvloop keeps sending from the caller's memory after write() returns; a caller that
    # reuses its buffer after ``await publish_batch`` must not change what goes out.
    batch = protocol.build_batch(MARKET_DATA, 8192, [(1, bytes(37))])
    original = batch.tobytes()

    async def scenario(path: Path) -> None:
        async with AsyncPublisher("market_data", path, publish_only=False) as pub:  # a bare server: only our bytes
            await pub.publish_batch(batch)
            batch[:] = 0
            await pub.publish_batch(original[:71])

    with slow_reader() as (path, received):
        run_on(loop_kind, scenario, path)
    assert b"".join(received) == original + original[:71]


# --- no relay --------------------------------------------------------------------------------------------------------


@pytest.fixture
def stale_socket() -> Iterator[Path]:
    """A socket file nobody listens on, as a relay that crashed leaves behind."""
    folder = tempfile.mkdtemp(prefix="jr-")
    path = Path(folder) / "execution.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    yield path
    path.unlink()
    os.rmdir(folder)


def test_connection_errors_name_domain_path_and_remedy(stale_socket: Path) -> None:
    missing = stale_socket.parent / "nothing-here.sock"
    for path in (missing, stale_socket):
        for make in (Publisher, Subscriber):
            with pytest.raises(RelayConnectionError) as info:
                make("execution", path)
            text = str(info.value)
            assert str(path) in text and "execution" in text and "jitrelay run execution" in text
            assert isinstance(info.value, ConnectionError)

    async def try_async(make: type) -> None:
        await make("execution", missing).connect()

    for make in (AsyncPublisher, AsyncSubscriber):
        with pytest.raises(RelayConnectionError, match="jitrelay run execution"):
            asyncio.run(try_async(make))


def test_default_socket_path_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JITRELAY_SOCKET_DIR", str(tmp_path))
    with pytest.raises(RelayConnectionError, match=str(tmp_path / "signal.sock")):
        Publisher("signal")
    assert AsyncSubscriber("signal").socket_path == tmp_path / "signal.sock"


def test_unknown_domain() -> None:
    with pytest.raises(ValueError, match="unknown domain"):
        Publisher("nope", "/tmp/none.sock")


# --- against a real relay --------------------------------------------------------------------------------------------


def test_publish_subscribe_exact_bytes(market_relay: RelayProcess) -> None:
    raw = message(MARKET_DATA, standard_record(7, b"raw bytes"), source=2, flags=0x80, sequence=99, timestamp_ns=5)
    with (
        Subscriber("market_data", market_relay.socket_path) as sub,
        Publisher("market_data", market_relay.socket_path, source=3, checksum=True) as pub,
    ):
        before = time.time_ns()
        assert pub.publish([(1, b"\x01\x02\x03"), (19, b"")], flags=0x42) == 0
        assert pub.publish([(2, bytes(300))]) == 1
        pub.publish_raw(raw)
        assert pub.publish([], sequence=10, timestamp_ns=123) == 10
        assert pub.publish([(3, b"z")]) == 11
        pub.flush()
        after = time.time_ns()
        got = list(protocol.decode_messages(receive(sub, 32 + 7 + 32 + 305 + len(raw) + 32 + 35)))
        no_more(sub)

    stamps = [m.header.timestamp_ns for m in got]
    assert all(before <= t <= after for t in stamps[:2] + stamps[4:])
    assert [m.raw for m in got] == [
        message(MARKET_DATA, standard_record(1, b"\x01\x02\x03") + standard_record(19, b""), source=3, flags=0x42,
                sequence=0, timestamp_ns=stamps[0]),
        message(MARKET_DATA, extended_record(2, bytes(300)), source=3, sequence=1, timestamp_ns=stamps[1]),
        raw,
        message(MARKET_DATA, b"", source=3, sequence=10, timestamp_ns=123),
        message(MARKET_DATA, standard_record(3, b"z"), source=3, sequence=11, timestamp_ns=stamps[4]),
    ]  # fmt: skip
    assert got[0].records == ((1, b"\x01\x02\x03"), (19, b""))


def test_checksums_pass_a_verifying_relay(signal_relay: RelayProcess) -> None:
    bad = bytearray(message(SIGNAL, standard_record(20, b"bad crc"), sequence=500))
    bad[28] ^= 0xFF
    with Subscriber("signal", signal_relay.socket_path) as sub, Publisher("signal", signal_relay.socket_path) as pub:
        pub.publish([(20, b"first")])
        pub.publish_raw(bytes(bad))  # dropped by the relay, which carries on
        pub.publish([(39, b"second" * 100)])
        got = list(protocol.decode_messages(receive(sub, 32 + 7 + 32 + 605)))
        no_more(sub)
    assert [m.header.sequence for m in got] == [0, 1]
    assert all(zlib.crc32(m.raw[:28] + m.raw[32:]) == m.header.checksum for m in got)


def test_publish_batch_and_batches(market_relay: RelayProcess) -> None:
    batch = protocol.build_batch(MARKET_DATA, 20_000, [(1, bytes(37))], source=5)
    assert len(batch) == 20_000 * 71
    with Subscriber("market_data", market_relay.socket_path, buffer_size=1000) as sub:
        with Publisher("market_data", market_relay.socket_path) as pub:
            pub.publish_batch(batch)
            pub.publish_batch(batch[: 3 * 71].tobytes())
        got = []
        total = len(batch) + 3 * 71
        while sum(map(len, got)) < total:
            got.append(sub.recv_batch(timeout=10))
            assert got[-1] is not None and len(got[-1]) % 71 == 0
        no_more(sub)
    assert np.array_equal(np.concatenate(got), np.concatenate([batch, batch[: 3 * 71]]))
    assert got[0].flags.writeable and got[0].base is None  # a copy the caller owns


def test_message_larger_than_the_subscriber_buffer(market_relay: RelayProcess) -> None:
    records = [(4, bytes(range(256)) * 200), (5, b"\xaa" * 65535)]
    with Subscriber("market_data", market_relay.socket_path, buffer_size=64) as sub:
        with Publisher("market_data", market_relay.socket_path) as pub:
            pub.publish(records)
            pub.publish([(6, b"after")])
        got = list(protocol.decode_messages(receive(sub, 32 + 5 + 51200 + 5 + 65535 + 32 + 7)))
    assert [m.records for m in got] == [tuple(records), ((6, b"after"),)]


def test_recv_batch_timeout(market_relay: RelayProcess) -> None:
    with Subscriber("market_data", market_relay.socket_path) as sub:
        assert sub.recv_batch(timeout=0.05) is None
        assert sub.recv_batch(timeout=0) is None
        with Publisher("market_data", market_relay.socket_path) as pub:
            pub.publish([(1, b"late")])
        batch = sub.recv_batch(timeout=10)
        assert batch is not None and list(protocol.decode_messages(batch))[0].records == ((1, b"late"),)


def test_closed_clients_refuse_to_work(market_relay: RelayProcess) -> None:
    path = market_relay.socket_path
    with Publisher("market_data", path) as pub, Subscriber("market_data", path) as sub:
        pass
    with pytest.raises(RelayConnectionError, match="closed"):
        pub.publish([(1, b"x")])
    with pytest.raises(RelayConnectionError, match="closed"):
        sub.recv_batch()
    pub.close()  # closing twice is harmless
    sub.close()


def test_without_reconnecting_relay_shutdown_ends_subscription_and_fails_publishing(start_relay: StartRelay) -> None:
    relay = start_relay("execution")
    sub = Subscriber("execution", relay.socket_path, reconnect=False)
    pub = Publisher("execution", relay.socket_path, reconnect=False)
    pub.publish([(40, b"order")])
    first = sub.recv_batch(timeout=10)  # the relay has forwarded it before it is told to stop
    assert stop(relay) == 0
    assert [m.records for m in protocol.decode_messages(first)] == [((40, b"order"),)]
    assert list(sub) == []  # EOF between messages: iteration ends cleanly
    with pytest.raises(RelayConnectionError, match="execution relay .* closed the connection"):
        pub.publish([(40, b"too late")])
    pub.close()
    sub.close()


def test_publishers_read_what_the_relay_sends_them_so_block_policy_cannot_deadlock(start_relay: StartRelay) -> None:
    # Two publishers each receive the other's messages. Under ``block`` the relay stops reading
    # everyone while either has more than 64 KiB pending; one that never read would hang both.
    batch = protocol.build_batch(EXECUTION, 4096, [(40, bytes(200))])  # 4096 x 234 bytes
    rounds = 12
    relay = start_relay("execution", "--pending-limit", "64KiB")
    sub = Subscriber("execution", relay.socket_path)
    errors: queue.Queue[BaseException] = queue.Queue()

    def publish(source: int) -> None:
        try:
            with Publisher("execution", relay.socket_path, source=source) as pub:
                for _ in range(rounds):
                    pub.publish_batch(batch)
        except BaseException as exc:  # reported below
            errors.put(exc)

    threads = [threading.Thread(target=publish, args=(s,), daemon=True) for s in (1, 2)]
    for t in threads:
        t.start()
    received = len(receive(sub, 2 * rounds * len(batch), timeout=60))
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert errors.empty(), errors.get()
    assert received == 2 * rounds * len(batch)
    sub.close()


# --- asyncio flavour -------------------------------------------------------------------------------------------------


def run_on(loop_kind: str, coro_fn, *args):  # type: ignore[no-untyped-def]
    if loop_kind == "uvloop":
        return uvloop.run(coro_fn(*args))
    return asyncio.run(coro_fn(*args))


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_async_round_trip(market_relay: RelayProcess, loop_kind: str) -> None:
    async def scenario(path: Path) -> tuple[list[protocol.Message], list[np.ndarray]]:
        async with (
            AsyncSubscriber("market_data", path) as sub,
            AsyncPublisher("market_data", path, source=6, checksum=True) as pub,
        ):
            assert await pub.publish([(1, b"one")]) == 0
            assert await pub.publish([(2, b"two")], flags=3, timestamp_ns=77) == 1
            await pub.publish_raw(message(MARKET_DATA, standard_record(9, b"raw"), sequence=40))
            await pub.flush()
            messages = []
            async for m in sub:
                messages.append(m)
                if len(messages) == 3:
                    break
            assert await sub.recv_batch(timeout=0.05) is None
            big = protocol.build_batch(MARKET_DATA, 8192, [(1, bytes(37))])
            await pub.publish_batch(big)
            big[:] = 0  # the client must not still be sending from it
            await pub.publish_batch(protocol.build_batch(MARKET_DATA, 1, [(1, b"end")]))
            batches = []
            async for batch in sub.batches():
                batches.append(batch)
                if sum(map(len, batches)) >= 8192 * 71 + 37:
                    break
            return messages, batches

    messages, batches = run_on(loop_kind, scenario, market_relay.socket_path)
    assert [m.raw for m in messages] == [
        message(MARKET_DATA, standard_record(1, b"one"), source=6, sequence=0,
                timestamp_ns=messages[0].header.timestamp_ns),
        message(MARKET_DATA, standard_record(2, b"two"), source=6, flags=3, sequence=1, timestamp_ns=77),
        message(MARKET_DATA, standard_record(9, b"raw"), sequence=40),
    ]  # fmt: skip
    stream = np.concatenate(batches)
    assert len(stream) == 8192 * 71 + 37
    got = list(protocol.decode_messages(stream.tobytes()))
    assert [m.header.sequence for m in got[:8192]] == list(range(8192))
    assert all(m.records == ((1, bytes(37)),) for m in got[:8192])
    assert got[-1].records == ((1, b"end"),)


def test_without_reconnecting_async_shutdown_ends_subscription_and_fails_publishing(start_relay: StartRelay) -> None:
    async def scenario(relay: RelayProcess) -> None:
        path = relay.socket_path
        async with (
            AsyncSubscriber("signal", path, reconnect=False) as sub,
            AsyncPublisher("signal", path, reconnect=False) as pub,
        ):
            await pub.publish([(20, b"x")])
            first = await sub.recv_batch(timeout=10)
            assert first is not None
            await asyncio.get_running_loop().run_in_executor(None, stop, relay)
            assert [m async for m in sub] == []
            with pytest.raises(EOFError):
                await sub.recv_batch()
            with pytest.raises(RelayConnectionError, match="closed the connection"):
                for _ in range(3):  # the relay's close may take a loop iteration to be noticed
                    await pub.publish([(20, b"y")])
                    await asyncio.sleep(0.05)

    asyncio.run(scenario(start_relay("signal")))


def test_subscriber_closes_its_socket_when_the_first_subscription_cannot_be_sent(
    start_relay: StartRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = start_relay("market_data")
    opened: list[socket.socket] = []
    real_connect = client_module._connect

    def connect(domain: str, path: Path) -> socket.socket:
        opened.append(real_connect(domain, path))
        opened[-1].shutdown(socket.SHUT_WR)  # the subscription's send now fails with EPIPE
        return opened[-1]

    monkeypatch.setattr(client_module, "_connect", connect)
    with pytest.raises(RelayConnectionError):
        Subscriber("market_data", relay.socket_path, tlv_types=[1])
    assert len(opened) == 1 and opened[0].fileno() == -1, "the socket was left open"
