"""The client's fast paths: messages built in its buffer, coalesced writes, message views.

Expected bytes come from ``protocol.build_message`` (the readable builder,
itself checked against the reference encoder in tests/core) and from
``reference``; coalescing is checked against a real relay process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.commands import no_more, receive
from support.reference import extended_record, message, standard_record
from support.relays import RelayProcess

from jitrelay.client import AsyncPublisher, AsyncSubscriber, MessageView, Publisher, Subscriber
from jitrelay.client.encoder import Encoder as _PublisherState
from jitrelay.core import protocol
from jitrelay.core.domains import logic_for
from jitrelay.core.views import COLUMNS_FROM, batch_headers, iter_views, message_offsets

MARKET_DATA = 1
SIZE = 71  # one type-1 record of 37 bytes
VALUE = bytes(range(37))


def numbered(first: int, count: int, source: int = 0) -> bytes:
    """What a publisher's messages ``first..first+count-1`` of VALUE are, stamped with timestamp = sequence."""
    return b"".join(
        message(MARKET_DATA, standard_record(1, VALUE), source=source, sequence=s, timestamp_ns=s, checksum=0)
        for s in range(first, first + count)
    )


def publish_numbered(pub: Publisher, first: int, count: int) -> None:
    for s in range(first, first + count):
        pub.publish([(1, VALUE)], sequence=s, timestamp_ns=s)


# --- built in the buffer == protocol.build_message -----------------------------------------------------------------


class _Offline(_PublisherState):
    """The publishers' message building without a socket."""

    def __init__(self, domain: str, source: int, checksum: bool | None, version: int = protocol.VERSION):
        super().__init__(domain, None, source, checksum, False, 1024, version)


values = st.one_of(st.binary(max_size=300), st.sampled_from([b"", bytes(255), bytes(256), bytes(3000)]))
record_lists = st.lists(st.tuples(st.integers(0, 255), values), max_size=4)


@settings(max_examples=300, deadline=None)
@given(
    domain=st.sampled_from(["market_data", "signal", "execution", "system"]),
    checksum=st.sampled_from([None, True, False]),
    version=st.sampled_from([1, 2]),
    records=record_lists,
    shape=st.sampled_from(["list", "tuple", "iterator", "bytearray values"]),
    source=st.integers(0, 255),
    flags=st.integers(0, 255),
    sequence=st.none() | st.integers(0, 2**64 - 1),
    timestamp_ns=st.integers(0, 2**64 - 1),
    crowded=st.booleans(),
)
def test_fast_path_builds_exactly_what_build_message_builds(
    domain: str,
    checksum: bool | None,
    version: int,
    records: list[tuple[int, bytes]],
    shape: str,
    source: int,
    flags: int,
    sequence: int | None,
    timestamp_ns: int,
    crowded: bool,
) -> None:
    state = _Offline(domain, source, checksum, version)
    start = state._limit - 3 if crowded else 0  # nearly full: the message must grow the buffer
    state._fill = start
    state._buf[:start] = bytes(start)
    given_records: object = {
        "list": list(records),
        "tuple": tuple(records),
        "iterator": iter(records),
        "bytearray values": [(t, bytearray(v)) for t, v in records],
    }[shape]
    number = state._encode(given_records, flags, sequence, timestamp_ns)  # type: ignore[arg-type]
    assert number == (0 if sequence is None else sequence)
    assert state.next_sequence == number + 1
    verify = state.logic.verifies_checksums if checksum is None else checksum
    expected = protocol.build_message(
        state.domain_id,
        records,
        source=source,
        flags=flags,
        sequence=number,
        timestamp_ns=timestamp_ns,
        checksum=None if verify else 0,
        version=version,
    )
    assert bytes(state._buf[start : state._fill]) == expected


def test_a_long_value_takes_an_extended_record_and_an_impossible_one_raises() -> None:
    state = _Offline("market_data", 0, True)
    state._encode([(1, bytes(65535))], 0, 0, 5)
    assert bytes(state._buf[: state._fill]) == protocol.build_message(1, [(1, bytes(65535))], timestamp_ns=5)
    with pytest.raises(ValueError, match="exceeds"):
        state._encode([(1, bytes(65536))], 0, 1, 5)
    with pytest.raises(ValueError):
        state._encode([(256, b"x"), (1, b"")], 0, 1, 5)
    assert state._fill == 32 + 5 + 65535  # nothing of the failed messages counts as buffered


class _Collector:
    """A Unix socket that accepts one connection and keeps every byte sent on it, until the sender closes."""

    def __init__(self, path: str):
        self.path = path
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(1)
        self.data = b""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn, _ = self._server.accept()
        with conn:
            chunks = []
            while chunk := conn.recv(1 << 16):
                chunks.append(chunk)
        self.data = b"".join(chunks)
        self._server.close()

    def received(self) -> bytes:
        self._thread.join(10.0)
        assert not self._thread.is_alive()
        return self.data


publications = st.lists(
    st.tuples(
        st.sampled_from(
            [[(1, VALUE)], [(1, VALUE)], [(2, VALUE)], [(1, bytes(5))], [(0, VALUE)], [(1, VALUE), (2, b"")]]
        ),
        st.sampled_from(["list", "tuple", "bytearray", "iterator"]),
        st.integers(0, 255),
        st.none() | st.integers(0, 2**63),  # room for the numbers that follow
        st.none() | st.integers(0, 2**64 - 1),
    ),
    max_size=40,
)


def _declared(wire: bytes) -> bytes:
    """What follows the publish-only declaration a publisher's bytes start with (its timestamp aside)."""
    declaration = protocol.publish_only_message()
    first = next(protocol.decode_messages(wire[: len(declaration)]))
    assert first.records == next(protocol.decode_messages(declaration)).records
    return wire[len(declaration) :]


def _shaped(records: list[tuple[int, bytes]], shape: str) -> object:
    if shape == "tuple":
        return tuple(records)
    if shape == "bytearray":
        return [(t, bytearray(v)) for t, v in records]
    if shape == "iterator":
        return iter(records)
    return list(records)


def _expected(domain: str, checksum: bool | None, items: list, times: list[int]) -> bytes:
    """What the publications should put on the wire after the publish-only declaration."""
    verify = logic_for(domain).verifies_checksums if checksum is None else checksum
    out, following = [], 0
    for (records, _, flags, sequence, _), stamp in zip(items, times, strict=True):
        number = following if sequence is None else sequence
        out.append(
            protocol.build_message(
                logic_for(domain).domain_id,
                records,
                flags=flags,
                sequence=number,
                timestamp_ns=stamp,
                checksum=None if verify else 0,
            )
        )
        following = number + 1
    return b"".join(out)


@settings(max_examples=60, deadline=None)
@given(
    items=publications,
    domain=st.sampled_from(["market_data", "execution"]),
    checksum=st.sampled_from([None, True, False]),
    kind=st.sampled_from(["blocking", "blocking-batch", "await", "nowait"]),
    flush_size=st.sampled_from([1, 200, 1 << 16]),
)
def test_every_publish_method_puts_exactly_the_built_messages_on_the_wire(
    tmp_path_factory: pytest.TempPathFactory,
    items: list,
    domain: str,
    checksum: bool | None,
    kind: str,
    flush_size: int,
) -> None:
    """The publish methods' inlined fast path and its fallbacks write what ``build_message`` builds, in order."""
    path = str(tmp_path_factory.mktemp("wire") / "s")
    collector = _Collector(path)
    times: list[int] = []  # each message's timestamp: given, or read from the (patched) clock
    numbers = []

    def clock() -> int:
        times.append(10**6 + len(times))
        return times[-1]

    def stamped(timestamp_ns: int | None) -> int | None:
        if timestamp_ns is not None:
            times.append(timestamp_ns)
        return timestamp_ns

    with mock.patch("jitrelay.client.encoder._time_ns", clock):
        if kind.startswith("blocking"):
            with (
                Publisher(domain, path, checksum=checksum, flush_size=flush_size) as pub,
                pub.batch() if kind == "blocking-batch" else contextlib_null(),
            ):
                for records, shape, flags, sequence, timestamp_ns in items:
                    shaped, stamp = _shaped(records, shape), stamped(timestamp_ns)
                    numbers.append(pub.publish(shaped, flags=flags, sequence=sequence, timestamp_ns=stamp))
        else:

            async def scenario() -> None:
                async with AsyncPublisher(domain, path, checksum=checksum, flush_size=flush_size) as pub:
                    publish = pub.publish if kind == "await" else pub.publish_nowait
                    for k, (records, shape, flags, sequence, timestamp_ns) in enumerate(items):
                        shaped, stamp = _shaped(records, shape), stamped(timestamp_ns)
                        result = publish(shaped, flags=flags, sequence=sequence, timestamp_ns=stamp)
                        numbers.append(await result if kind == "await" else result)
                        if k % 7 == 3:
                            await asyncio.sleep(0)

            asyncio.run(scenario())
    assert _declared(collector.received()) == _expected(domain, checksum, items, times)
    following = 0
    for (_, _, _, sequence, _), number in zip(items, numbers, strict=True):
        assert number == (following if sequence is None else sequence)
        following = number + 1


def test_the_fast_path_writes_a_checksum_once_asked_for_one(tmp_path: object) -> None:
    path = str(tmp_path / "s")  # type: ignore[operator]
    collector = _Collector(path)
    with Publisher("market_data", path) as pub:
        pub.publish([(1, VALUE)], timestamp_ns=1)
        pub.publish([(1, VALUE)], timestamp_ns=2)  # the fast path, no checksum: market data does not verify
        pub.checksum = True
        pub.publish([(1, VALUE)], timestamp_ns=3)
        pub.publish([(1, VALUE)], timestamp_ns=4)
    expected = [protocol.build_message(1, [(1, VALUE)], sequence=s, timestamp_ns=s + 1, checksum=0) for s in (0, 1)]
    expected += [protocol.build_message(1, [(1, VALUE)], sequence=s, timestamp_ns=s + 1) for s in (2, 3)]
    assert _declared(collector.received()) == b"".join(expected)


def test_publish_nowait_needs_a_connection_and_raises_once_the_relay_is_gone(market_relay: RelayProcess) -> None:
    async def scenario() -> None:
        pub = AsyncPublisher("market_data", market_relay.socket_path)
        with pytest.raises(RuntimeError, match="not connected"):
            pub.publish_nowait([(1, VALUE)])
        await pub.connect()
        assert pub.publish_nowait([(1, VALUE)]) == 0
        await pub.close()
        with pytest.raises(ConnectionError):
            pub.publish_nowait([(1, VALUE)])

    asyncio.run(scenario())


# --- coalescing, against a real relay -------------------------------------------------------------------------------


def test_default_publish_is_on_the_wire_before_it_returns(market_relay: RelayProcess) -> None:
    with (
        Subscriber("market_data", market_relay.socket_path) as sub,
        Publisher("market_data", market_relay.socket_path) as pub,
    ):
        publish_numbered(pub, 0, 3)
        assert pub.buffered == 0
        assert receive(sub, 3 * SIZE) == numbered(0, 3)


def test_batch_writes_by_size_and_on_leaving_the_block(market_relay: RelayProcess) -> None:
    path = market_relay.socket_path
    with Subscriber("market_data", path) as sub, Publisher("market_data", path, flush_size=10 * SIZE) as pub:
        with pub.batch():
            publish_numbered(pub, 0, 25)  # written out after the 10th and the 20th
            assert pub.buffered == 5 * SIZE
            assert receive(sub, 20 * SIZE) == numbered(0, 20)
            no_more(sub)
            pub.publish_raw(b"")  # raw bytes go after what is buffered, nothing is left behind
            assert pub.buffered == 0
            publish_numbered(pub, 25, 3)
            pub.publish_batch(np.frombuffer(numbered(28, 2), dtype=np.uint8))
            publish_numbered(pub, 30, 4)
            assert pub.buffered == 4 * SIZE
        assert pub.buffered == 0
        assert receive(sub, 14 * SIZE) == numbered(20, 14)


def test_flush_and_close_write_out_everything_buffered(market_relay: RelayProcess) -> None:
    path = market_relay.socket_path
    with Subscriber("market_data", path) as sub:
        pub = Publisher("market_data", path)
        with pub.batch():
            publish_numbered(pub, 0, 7)
            no_more(sub)
            pub.flush()
            assert pub.buffered == 0
            assert receive(sub, 7 * SIZE) == numbered(0, 7)
            publish_numbered(pub, 7, 5)
            pub.close()  # inside the block: close writes out, leaving the block has nothing left to do
        assert receive(sub, 5 * SIZE) == numbered(7, 5)
        with pytest.raises(ConnectionError):
            pub.publish([(1, VALUE)])


def test_linger_writes_out_without_a_flush(market_relay: RelayProcess) -> None:
    path = market_relay.socket_path
    with Subscriber("market_data", path) as sub, Publisher("market_data", path, linger=0.02) as pub:
        publish_numbered(pub, 0, 50)
        assert receive(sub, 50 * SIZE) == numbered(0, 50)
        with pub.batch():
            publish_numbered(pub, 50, 3)
        assert receive(sub, 3 * SIZE) == numbered(50, 3)


def test_coalescing_never_reorders_splits_or_loses(market_relay: RelayProcess) -> None:
    """Messages of every size, published in and out of batches, arrive byte for byte in order."""
    path = market_relay.socket_path
    rng = np.random.default_rng(7)
    sizes = rng.integers(0, 2000, 600)
    expected = []
    with Subscriber("market_data", path) as sub, Publisher("market_data", path, flush_size=4096) as pub:
        for k, n in enumerate(sizes):
            value = bytes(int(n))
            if k % 100 == 0:
                pub.flush()
            with pub.batch() if k % 3 else contextlib_null():
                pub.publish([(2, value)], sequence=k, timestamp_ns=k)
            expected.append(protocol.build_message(1, [(2, value)], sequence=k, timestamp_ns=k, checksum=0))
        pub.flush()
        whole = b"".join(expected)
        assert receive(sub, len(whole)) == whole


class contextlib_null:  # noqa: N801 - a stand-in for contextlib.nullcontext that reads as the batch() it replaces
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_async_publisher_writes_once_the_loop_turns(market_relay: RelayProcess, loop_kind: str) -> None:
    path = market_relay.socket_path

    async def scenario() -> None:
        async with AsyncSubscriber("market_data", path) as sub:
            pub = await AsyncPublisher("market_data", path, flush_size=10 * SIZE).connect()
            for s in range(7):  # nothing here yields to the loop
                await pub.publish([(1, VALUE)], sequence=s, timestamp_ns=s)
            assert pub.buffered == 7 * SIZE
            await asyncio.sleep(0)
            assert pub.buffered == 0
            assert await collect(sub, 7) == numbered(0, 7)
            for s in range(7, 32):  # written out by size after 10 and 20 buffered
                await pub.publish([(1, VALUE)], sequence=s, timestamp_ns=s)
            assert pub.buffered == 5 * SIZE
            await pub.flush()
            assert pub.buffered == 0
            await pub.publish([(1, VALUE)], sequence=32, timestamp_ns=32)
            await pub.close()
            assert await collect(sub, 26) == numbered(7, 26)

    runner = asyncio.run if loop_kind == "asyncio" else uvloop_run
    runner(scenario())


def uvloop_run(coro: object) -> None:
    import uvloop

    uvloop.run(coro)  # type: ignore[arg-type]


async def collect(sub: AsyncSubscriber, count: int) -> bytes:
    got = b""
    while len(got) < count * SIZE:
        batch = await sub.recv_batch(10.0)
        assert batch is not None, f"received {len(got)} of {count * SIZE} bytes"
        got += batch.tobytes()
    assert len(got) == count * SIZE
    return got


def test_a_killed_publisher_loses_only_its_unflushed_messages(market_relay: RelayProcess) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from jitrelay.client import Publisher
        pub = Publisher("market_data", {str(market_relay.socket_path)!r})
        with pub.batch():
            for s in range(300):
                pub.publish([(1, {VALUE!r})], sequence=s, timestamp_ns=s)
            pub.flush()
            for s in range(300, 350):
                pub.publish([(1, {VALUE!r})], sequence=s, timestamp_ns=s)
            print("buffered", pub.buffered, flush=True)
            time.sleep(60)
        """
    )
    with Subscriber("market_data", market_relay.socket_path) as sub:
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().split() == ["buffered", str(50 * SIZE)]
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        assert receive(sub, 300 * SIZE) == numbered(0, 300)
        no_more(sub)


# --- message views == decode_messages -------------------------------------------------------------------------------

some_records = st.lists(
    st.tuples(st.integers(1, 19), st.binary(max_size=300)).map(
        lambda r: standard_record(*r) if len(r[1]) < 256 else extended_record(*r)
    ),
    max_size=3,
)
streams = st.lists(
    st.builds(
        lambda records, seq, source, flags: message(
            MARKET_DATA, b"".join(records), sequence=seq, source=source, flags=flags
        ),
        some_records,
        st.integers(0, 2**64 - 1),
        st.integers(0, 255),
        st.integers(0, 255),
    ),
    max_size=20,
)


@settings(max_examples=200, deadline=None)
@given(messages=streams, uniform=st.booleans())
def test_views_decode_to_exactly_what_decode_messages_gives(messages: list[bytes], uniform: bool) -> None:
    if uniform and messages:
        messages = [messages[0]] * len(messages)
    data = b"".join(messages)
    decoded = list(protocol.decode_messages(data))
    views = list(iter_views(data))
    assert [v.decode() for v in views] == decoded
    for view, m in zip(views, decoded, strict=True):
        h = m.header
        assert (view.relay_domain, view.version, view.source, view.flags) == (
            h.relay_domain,
            h.version,
            h.source,
            h.flags,
        )
        assert (view.sequence, view.timestamp_ns, view.payload_size, view.checksum) == (
            h.sequence,
            h.timestamp_ns,
            h.payload_size,
            h.checksum,
        )
        assert (view.header, view.records, view.raw, view.checksum_ok) == (h, m.records, m.raw, m.checksum_ok)
        assert bytes(view.payload) == m.raw[32:] and len(view) == len(m.raw)
    headers = batch_headers(np.frombuffer(data, dtype=np.uint8))
    assert headers.dtype == protocol.HEADER_DTYPE
    assert [tuple(int(x) for x in row) for row in headers.tolist()] == [tuple(vars(m.header).values()) for m in decoded]
    assert message_offsets(data).tolist() == list(np.cumsum([0] + [len(m) for m in messages])[:-1])


@settings(max_examples=100, deadline=None)
@given(
    count=st.integers(COLUMNS_FROM - 2, 3 * COLUMNS_FROM),
    value_size=st.sampled_from([0, 5, 37, 300]),
    numbers=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), min_size=1, max_size=8),
    odd=st.none() | st.integers(0, 3 * COLUMNS_FROM),
)
def test_views_of_a_batch_of_one_size_read_as_columns_as_they_would_one_by_one(
    count: int, value_size: int, numbers: list[tuple[int, int]], odd: int | None
) -> None:
    """Batches large enough for the numpy columns: of one message size, or all but one (which must walk)."""
    value = bytes(range(256)) * 2
    messages = []
    for k in range(count):
        sequence, stamp = numbers[k % len(numbers)]
        n = value_size + 3 if k == odd else value_size  # one message of another size: not uniform
        record = standard_record(1, value[:n]) if n < 256 else extended_record(1, value[:n])
        messages.append(message(MARKET_DATA, record, sequence=sequence, timestamp_ns=stamp, source=k % 256))
    data = b"".join(messages)
    decoded = list(protocol.decode_messages(data))
    views = list(iter_views(data))
    assert [v.decode() for v in views] == decoded
    assert [(v.sequence, v.timestamp_ns, v.source, len(v)) for v in views] == [
        (m.header.sequence, m.header.timestamp_ns, m.header.source, len(m.raw)) for m in decoded
    ]
    assert MessageView(data, 0, len(messages[0])).sequence == decoded[0].header.sequence


def test_subscriber_iterates_views_and_still_gives_decoded_messages(market_relay: RelayProcess) -> None:
    path = market_relay.socket_path
    with Subscriber("market_data", path) as sub, Publisher("market_data", path) as pub:
        publish_numbered(pub, 0, 1)
        first = next(iter(sub))
        assert isinstance(first, MessageView) and first.sequence == 0 and first.records == ((1, VALUE),)
        publish_numbered(pub, 1, 2)
        batch = None
        while batch is None or len(batch) < 2 * SIZE:
            more = sub.recv_batch(10.0)
            batch = more if batch is None else np.concatenate([batch, more])
        assert Subscriber.headers(batch)["sequence"].tolist() == [1, 2]
        publish_numbered(pub, 3, 1)
        decoded = next(sub.messages())
        assert isinstance(decoded, protocol.Message) and decoded.raw == numbered(3, 1)
