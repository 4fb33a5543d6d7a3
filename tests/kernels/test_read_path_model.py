"""The compiled read paths against the engine's Python steps: the same input, the same bytes to every subscriber.

A model-based property, run in every build of the loops with the other
kernel tests. Three relays (``read_path`` compiled: the relay's own epoll set
and one compiled call per wake-up; uvloop: one compiled call per read the
event loop makes; and python: the model) run
in this process on one event loop, each fed the same stream over a socket
pair: valid and invalid messages of every kind, cut at arbitrary read
boundaries, perhaps a control message in the middle of a read, perhaps a
close in the middle of a message; a subscriber may have a filter (TLV types,
sources), so that the read loop routes each read to its group. Their logs are small, so the ring wraps,
and their subscribers' sockets are small, so they fall behind mid-batch and
catch up from their cursors (under ``block``, so nobody is cut off). Each
subscriber of each relay must receive exactly the messages the protocol
forwards, and so exactly what the other relay's does.
"""

from __future__ import annotations

import asyncio
import random
import socket

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.clients import DOMAINS, mixed_messages
from support.reference import selects

from jitrelay.core import protocol
from jitrelay.core.domains import logic_for
from jitrelay.server import connection
from jitrelay.server.engine import Relay

pytestmark = pytest.mark.kernels

SUBSCRIBERS = 2
SMALL_SOCKET = 4096  # the relay's send buffers for its subscribers: they fall behind within a batch


WRAPS: list[bool] = []  # for each relay run: whether its log wrapped
POLLED: list[int] = []  # and how many reads it made from its own epoll set
POLLED_BEHIND: list[int] = []  # and how many of those while a subscriber was behind


async def received(
    read_path: str,
    domain: str,
    pieces: list[bytes],
    wants: list[int],
    filters: list[protocol.Filter],
    late: int = 0,
) -> list[bytes]:
    """What each subscriber of a relay on ``read_path`` receives of ``pieces``, sent in order, then a close.

    Subscriber ``i`` subscribes to ``filters[i]`` first (unless it is everything) and reads ``wants[i]`` bytes;
    the first starts reading only once ``late`` pieces are sent, so that it is behind while they are forwarded.
    """
    # A small log (about 96 KiB): the largest payload the stream holds is under 16 KiB.
    logic = logic_for(
        domain, read_path=read_path, slow_policy="block", max_payload=1 << 14, buffer_size=1 << 15, log_size=1 << 16
    )
    relay = Relay(logic)
    polled_behind = 0
    polled_read = relay._polled_read

    def count_behind(*args: object) -> None:  # a row is the poll loop's read, made before this runs
        nonlocal polled_behind
        polled_behind += any(conn.behind for conn in relay.connections.values())
        polled_read(*args)  # type: ignore[arg-type]

    relay._polled_read = count_behind  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    ours: list[socket.socket] = []
    try:
        for _ in range(SUBSCRIBERS + 1):
            mine, theirs = socket.socketpair()
            mine.setblocking(False)
            ours.append(mine)
            await loop.connect_accepted_socket(relay.new_connection, theirs)
        *subscribers, publisher = ours
        for sub, (tlv_types, sources) in zip(subscribers, filters, strict=True):
            if (tlv_types, sources) != protocol.EVERYTHING:
                await loop.sock_sendall(sub, protocol.subscribe_message(tlv_types, sources))
        for _ in range(4):  # every connection is the relay's, and every filter set, before anything is published
            await asyncio.sleep(0)

        started = asyncio.Event()

        async def read(sock: socket.socket, want: int) -> bytes:
            if sock is subscribers[0]:
                await started.wait()
            got = bytearray()
            while len(got) < want:
                got += await loop.sock_recv(sock, 1 << 16)
            return bytes(got)

        readers = [asyncio.ensure_future(read(sub, want)) for sub, want in zip(subscribers, wants, strict=True)]
        for k, piece in enumerate(pieces):
            if k == late:
                started.set()
            await loop.sock_sendall(publisher, piece)
            for _ in range(4):  # the relay reads it, and the subscribers may catch up before the next
                await asyncio.sleep(0)
        started.set()
        publisher.close()
        got = list(await asyncio.wait_for(asyncio.gather(*readers), 30))
        WRAPS.append(relay.log.head > relay.log.size)
        POLLED.append(relay.reads_polled)
        POLLED_BEHIND.append(polled_behind)
        return got
    finally:
        for sock in ours:
            sock.close()
        await relay.drain_and_close(0.1)


def filters(domain: str) -> st.SearchStrategy[protocol.Filter]:
    """What a subscriber asks for: everything, or some of the domain's TLV types, or some sources, or both."""
    _, lo, hi, _ = DOMAINS[domain]
    types = st.none() | st.frozensets(st.integers(lo, hi), min_size=1, max_size=6)
    sources = st.none() | st.frozensets(st.integers(0, 200), min_size=20, max_size=150)
    return st.just(protocol.EVERYTHING) | st.tuples(types, sources)


def selected(stream: list[bytes], selection: protocol.Filter) -> bytes:
    """The forwarded messages of ``stream`` a subscriber with ``selection`` receives, back to back."""
    return b"".join(m for m in stream if selection == protocol.EVERYTHING or selects(selection, m))


@st.composite
def streams(draw: st.DrawFn) -> tuple[str, list[bytes], list[bytes], list[protocol.Filter]]:
    """A domain, its stream cut into sends, the bytes each subscriber must get, and their filters."""
    domain = draw(st.sampled_from(["market_data", "execution"]))
    rng = random.Random(draw(st.integers(0, 2**32)))
    mixed = mixed_messages(rng, domain, draw(st.integers(1, 600) | st.just(600)))
    if draw(st.booleans()):  # mostly stretches of valid messages: the reads the compiled path takes
        mixed = [(m, ok) for m, ok in mixed if ok] or mixed
    stream = b"".join(m for m, _ in mixed)
    chosen = [draw(filters(domain)) for _ in range(SUBSCRIBERS)]
    wants = [selected([m for m, ok in mixed if ok], selection) for selection in chosen]
    if draw(st.booleans()):  # a control message between two messages, often in the middle of a read
        k = draw(st.integers(0, len(mixed)))
        at = sum(len(m) for m, _ in mixed[:k])
        stream = stream[:at] + protocol.publish_only_message() + stream[at:]
    if draw(st.booleans()) and mixed:  # closed in the middle of one more message: it is dropped
        extra = mixed[0][0]
        stream += extra[: draw(st.integers(1, len(extra) - 1))]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=12))))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True) if b > a]
    return domain, pieces, wants, chosen


@pytest.fixture(autouse=True)
def small_send_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay's send buffers per connection, made small so that its subscribers fall behind mid-batch."""
    monkeypatch.setattr(connection, "SOCKET_BUFFER", SMALL_SOCKET)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=streams())
def test_every_read_path_gives_every_subscriber_exactly_the_forwarded_bytes(
    case: tuple[str, list[bytes], list[bytes], list[protocol.Filter]],
) -> None:
    domain, pieces, wants, chosen = case
    sizes = [len(want) for want in wants]
    model = uvloop.run(received("python", domain, pieces, sizes, chosen))
    assert model == wants
    for path in ("compiled", "uvloop"):
        assert uvloop.run(received(path, domain, pieces, sizes, chosen)) == model, path


@pytest.mark.parametrize(
    "chosen",
    [
        [protocol.EVERYTHING] * SUBSCRIBERS,
        [protocol.EVERYTHING, (frozenset({2, 5, 11}), None)],
        [(frozenset({2, 5, 11}), None), protocol.EVERYTHING],
    ],
    ids=["unfiltered", "one-filtered", "filtered-and-late"],
)
def test_a_stream_that_wraps_the_small_log_reaches_both_relays_subscribers_whole(chosen: list[protocol.Filter]) -> None:
    """The property's larger cases, made sure of: the log wraps more than once on every read path, and the
    compiled path's own reads take part, filtered subscriber or not, and go on while one subscriber that
    starts late (the filtered one, in the last case: it is owed its group's ranges) catches up from its cursor."""
    rng = random.Random(5)
    messages = [m for m, ok in mixed_messages(rng, "market_data", 1500) if ok]
    stream = b"".join(messages)
    wants = [selected(messages, selection) for selection in chosen]
    assert all(0 < len(want) < len(stream) for want, c in zip(wants, chosen, strict=True) if c != protocol.EVERYTHING)
    pieces = [stream[a : a + n] for a, n in zip(range(0, len(stream), 9000), [9000] * len(stream), strict=False)]
    WRAPS.clear()
    POLLED.clear()
    POLLED_BEHIND.clear()
    sizes = [len(want) for want in wants]
    got = [
        uvloop.run(received(path, "market_data", pieces, sizes, chosen, late=3))
        for path in ("python", "uvloop", "compiled")
    ]
    assert got == [wants] * 3
    assert WRAPS == [True, True, True] and len(stream) > 2 * (1 << 16)
    assert POLLED[:2] == [0, 0] and POLLED[2] > 0, POLLED  # the relay's own reads took part on the compiled path
    assert POLLED_BEHIND[2] > 0, POLLED_BEHIND  # and went on while a subscriber caught up from its cursor
