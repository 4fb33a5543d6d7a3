"""The client's fast paths: messages built in its buffer, coalesced writes, message views.

Expected bytes come from ``protocol.build_message`` (the readable builder,
itself checked against the reference encoder in tests/core) and from
``reference``; coalescing is checked against a real relay process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.commands import receive, running_relay
from support.reference import extended_record, message, standard_record
from support.relays import RelayProcess

from jitrelay.client import AsyncPublisher, AsyncSubscriber, MessageView, Publisher, Subscriber, _PublisherState
from jitrelay.core import protocol
from jitrelay.core.views import batch_headers, iter_views, message_offsets

MARKET_DATA = 1
SIZE = 71  # one type-1 record of 37 bytes
VALUE = bytes(range(37))


@pytest.fixture(scope="module")
def market_relay() -> Iterator[RelayProcess]:
    with running_relay("market_data") as relay:
        yield relay


def no_more(sub: Subscriber) -> None:
    assert sub.recv_batch(timeout=0.2) is None


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

    def __init__(self, domain: str, source: int, checksum: bool | None):
        super().__init__(domain, None, source, checksum, False, 1024)


values = st.one_of(st.binary(max_size=300), st.sampled_from([b"", bytes(255), bytes(256), bytes(3000)]))
record_lists = st.lists(st.tuples(st.integers(0, 255), values), max_size=4)


@settings(max_examples=300, deadline=None)
@given(
    domain=st.sampled_from(["market_data", "signal", "execution"]),
    checksum=st.sampled_from([None, True, False]),
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
    records: list[tuple[int, bytes]],
    shape: str,
    source: int,
    flags: int,
    sequence: int | None,
    timestamp_ns: int,
    crowded: bool,
) -> None:
    state = _Offline(domain, source, checksum)
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
    verify = state.logic.verify_checksum if checksum is None else checksum
    expected = protocol.build_message(
        state.domain_id,
        records,
        source=source,
        flags=flags,
        sequence=number,
        timestamp_ns=timestamp_ns,
        checksum=None if verify else 0,
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
