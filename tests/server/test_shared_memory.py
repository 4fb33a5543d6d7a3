"""Shared-memory subscribers on real relays: the mapped log gives the same stream as the socket, or says why not.

A subscriber that asks for shared memory is caught up over its socket, then
reads the relay's log from a memory file the relay hands it. For the same
publishes it must receive what a socket subscriber receives, byte for byte,
filtered or not. A reader the log overwrites never returns a torn or
overwritten message: it is cut off (counted once) or, with positions, told
of the exact gap. Under ``block`` a stopped reader holds the publishers back
and nothing is lost. Nothing of the memory outlives the processes, however
they die, and a refused peer never maps it.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import reference as ref
from support import strategies as gen
from support.mapped import drain
from support.relays import RelayProcess, StartRelay
from support.streams import ThreadedReader

from jitrelay import kernels
from jitrelay.client import AsyncSubscriber, Subscriber
from jitrelay.core import protocol as p

MARK = 0xEE  # source and flags of the test's markers
WAIT = 15.0
GRANTED = "reads the log from shared memory"


def marker(domain: int, sequence: int, flags: int = MARK) -> bytes:
    return ref.message(domain, b"", source=MARK, flags=flags, sequence=sequence)


def is_marker(message: bytes) -> bool:
    return message[6] == MARK and message[7] in (MARK, MARK + 1)


class Peer(ThreadedReader):
    """A raw socket subscriber whose reader thread cuts what arrives into whole messages."""

    def __init__(self, relay: RelayProcess) -> None:
        self.sock = relay.connect(WAIT)
        super().__init__(self.sock, 1 << 20)
        self.messages: list[bytes] = []
        self._pending = bytearray()
        self.start()

    def _received(self, chunk: memoryview) -> None:
        self._pending += chunk
        _, consumed, fault = kernels.frame(np.frombuffer(bytes(self._pending), dtype=np.uint8))
        assert fault == p.NO_FAULT, "the relay sent bytes that are not whole messages"
        found = [m.raw for m in p.decode_messages(bytes(self._pending[:consumed]))]
        del self._pending[:consumed]
        with self.changed:
            self.messages += found
            self.changed.notify_all()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_for(self, message: bytes, timeout: float = WAIT) -> list[bytes]:
        """Everything received before ``message``, once it has arrived (markers dropped)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while message not in self.messages:
                left = deadline - time.monotonic()
                assert left > 0, f"{message.hex()} did not arrive within {timeout} s"
                self.changed.wait(left)
            at = self.messages.index(message)
            before, self.messages = self.messages[:at], self.messages[at + 1 :]
        return [m for m in before if not is_marker(m)]

    def close(self) -> None:
        self.stop()
        self.sock.close()


def settle(witness: Peer, peers: list[Peer], controls: list[bytes], round_: int, domain: int) -> None:
    """Each peer sends its control bytes then a marker: once the witness has every marker, all are in force."""
    marks = []
    for k, (peer, control) in enumerate(zip(peers, controls, strict=True)):
        mark = marker(domain, round_ * 1000 + k)
        peer.send(control + mark)
        marks.append(mark)
    for mark in marks:
        witness.wait_for(mark)


def publish_all(relay: RelayProcess, data: bytes, rng: random.Random) -> None:
    """Send ``data`` in random pieces and close gracefully: when this returns, the relay has handled every byte."""
    with relay.connect(WAIT) as sock:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            n = rng.choice((1, 7, 64, 500, 4096))
            sock.sendall(view[pos : pos + n])
            pos += n
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 16):
            pass


def split(data: bytes) -> list[bytes]:
    return [m.raw for m in p.decode_messages(data)]


# --- the same stream as the socket ---------------------------------------------------------

TYPES = {"market_data": (1, 4), "signal": (20, 23)}


@pytest.fixture(params=["market_data", "signal"])
def any_relay(request: pytest.FixtureRequest, start_relay: StartRelay) -> RelayProcess:
    """A relay of each domain that forwards to subscribers (one per test, shared by its hypothesis examples)."""
    return start_relay(request.param)


@st.composite
def streams(draw: st.DrawFn, domain: str) -> list[bytes]:
    """Messages of every verdict kind, and many a filter selects: types and sources from small sets."""
    spec = ref.DOMAINS[domain]
    lo, hi = TYPES[domain]
    selectable = st.builds(
        lambda records, source: ref.message(spec.ident, b"".join(records), source=source),
        st.lists(st.builds(ref.standard_record, st.integers(lo, hi), st.binary(max_size=6)), max_size=3),
        st.integers(0, 3),
    )
    kinds = st.sampled_from(gen.KINDS).flatmap(lambda kind: gen.judged_message(spec, kind))
    messages = draw(st.lists(st.one_of(selectable, kinds, gen.any_message(spec)), max_size=60))
    return [m for m in messages if not is_marker(m)]


def filters(domain: str) -> st.SearchStrategy[tuple[set[int] | None, set[int] | None]]:
    lo, hi = TYPES[domain]
    return st.tuples(
        st.none() | st.sets(st.integers(lo - 1, hi + 1), max_size=3),
        st.none() | st.sets(st.integers(0, 4), max_size=3),
    ).filter(lambda chosen: chosen != (None, None))


_rounds = iter(range(1, 1 << 30))


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data(), rng=st.randoms(use_true_random=False))
def test_a_mapped_subscriber_receives_what_a_socket_subscriber_does(
    any_relay: RelayProcess, data: st.DataObject, rng: random.Random
) -> None:
    relay, domain = any_relay, any_relay.domain
    spec = ref.DOMAINS[domain]
    stream = data.draw(streams(domain), label="stream")
    chosen = [(None, None), *data.draw(st.lists(filters(domain), max_size=2), label="filters")]
    sent = b"".join(stream)
    judged, _, _ = ref.reference_scan(sent, spec.ident, spec.max_payload, spec.verify, spec.ranges)
    forwarded = [sent[o : o + n] for o, n, v in judged if v == p.FORWARD]

    round_ = next(_rounds)
    witness = Peer(relay)
    peers = [Peer(relay) for _ in chosen]
    mapped: list[Subscriber] = []
    try:
        controls = [b"" if f == (None, None) else p.subscribe_message(*f) for f in chosen]
        settle(witness, peers, controls, 2 * round_, spec.ident)
        # Each blocks until the relay has handed it the log: from then on it reads every append.
        mapped = [Subscriber(domain, relay.socket_path, shared_memory=True, tlv_types=t, sources=s) for t, s in chosen]
        publish_all(relay, sent, rng)
        got_mapped = [drain(sub) for sub in mapped]  # the log holds the whole stream once publish_all returns
        settle(witness, peers, [p.unsubscribe_message()] * len(peers), 2 * round_ + 1, spec.ident)
        fence = marker(spec.ident, round_, flags=MARK + 1)
        witness.send(fence)
        for k, (peer, selection, got) in enumerate(zip(peers, chosen, got_mapped, strict=True)):
            wanted = (
                None if selection[0] is None else frozenset(selection[0]),
                None if selection[1] is None else frozenset(selection[1]),
            )
            on_socket = peer.wait_for(fence)
            assert on_socket == [m for m in forwarded if ref.selects(wanted, m)], f"socket subscriber {k}"
            assert got == b"".join(on_socket), f"mapped subscriber {k} ({p.describe_filter(wanted)}) differs"
    finally:
        for sub in mapped:
            sub.close()
        witness.close()
        for peer in peers:
            peer.close()


def test_an_async_mapped_subscriber_receives_what_a_socket_subscriber_does(start_relay: StartRelay) -> None:
    relay = start_relay("market_data")
    rng = random.Random(7)
    stream = [
        ref.message(1, ref.standard_record(1 + i % 4, rng.randbytes(i % 40)), source=i % 3, sequence=i)
        for i in range(5000)
    ]
    witness, peer = Peer(relay), Peer(relay)
    settle(witness, [peer], [b""], 1, 1)

    async def run() -> tuple[bytes, bytes]:
        async with (
            AsyncSubscriber("market_data", relay.socket_path, shared_memory=True) as every,
            AsyncSubscriber(
                "market_data", relay.socket_path, shared_memory=True, tlv_types=[2, 3], sources=[1]
            ) as some,
        ):
            await asyncio.get_running_loop().run_in_executor(None, publish_all, relay, b"".join(stream), rng)
            got_every, views = bytearray(), bytearray()
            while (batch := await every.recv_batch(timeout=0)) is not None:
                got_every += batch.tobytes()
            async for view in some:  # iteration, as the blocking subscriber's
                views += view.raw
                if len(views) >= len(wanted_some):
                    break
            while (batch := await some.recv_batch(timeout=0)) is not None:  # nothing more than that
                views += batch.tobytes()
            return bytes(got_every), bytes(views)

    wanted_some = b"".join(m for m in stream if ref.selects((frozenset({2, 3}), frozenset({1})), m))
    try:
        got_every, got_some = asyncio.run(run())
        fence = marker(1, 2, flags=MARK + 1)
        witness.send(fence)
        on_socket = b"".join(peer.wait_for(fence))
    finally:
        witness.close()
        peer.close()
    assert on_socket == b"".join(stream)
    assert got_every == on_socket
    assert got_some == wanted_some
