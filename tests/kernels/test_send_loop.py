"""The send loop, the one compiled code that does I/O: what each socket took, exactly, on real socket pairs.

Runs for every build of the loops (ahead of time, JIT, Python) with the other
kernel tests. Each target's peer reads what arrived, and it must be exactly
the bytes of the iovecs in order, as far as the send loop says it sent.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.streams import drain

from jitrelay import kernels

pytestmark = pytest.mark.kernels


def pair(made: list, sndbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    if sndbuf is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    made.append((ours, theirs))
    return ours, theirs


def aim(fan: kernels.FanOut, data: np.ndarray, pieces: list[tuple[int, int]], slot: int = 0) -> int:
    """Write ``pieces`` of ``data`` as iovecs from ``slot``; the number written."""
    fan.reserve(0, slot + len(pieces))
    for k, (at, length) in enumerate(pieces):
        fan.iovecs[2 * (slot + k)] = data.ctypes.data + at
        fan.iovecs[2 * (slot + k) + 1] = length
    return len(pieces)


def expected(data: np.ndarray, pieces: list[tuple[int, int]]) -> bytes:
    return b"".join(data[at : at + length].tobytes() for at, length in pieces)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 96)), min_size=0, max_size=6), min_size=1, max_size=5
    )
)
def test_each_target_gets_exactly_its_slice(slices: list[list[tuple[int, int]]]) -> None:
    data = np.frombuffer(np.random.default_rng(7).bytes(4096 + 96), dtype=np.uint8).copy()
    made: list = []
    try:
        fan = kernels.FanOut()
        fan.reserve(len(slices), sum(map(len, slices)))
        slot = 0
        peers = []
        for t, pieces in enumerate(slices):
            ours, theirs = pair(made)
            fan.fds[t] = ours.fileno()
            fan.iov_first[t] = slot
            fan.iov_count[t] = aim(fan, data, pieces, slot)
            slot += len(pieces)
            peers.append(theirs)
        assert fan.send(len(slices)) == 0  # every socket took all it was given
        for t, pieces in enumerate(slices):
            want = expected(data, pieces)
            assert fan.sent[t] == len(want) and fan.totals[t] == len(want)
            assert drain(peers[t]) == want
    finally:
        for a, b in made:
            a.close()
            b.close()


def test_a_full_socket_takes_part_and_says_how_much(pairs: list) -> None:
    data = np.frombuffer(bytes(range(256)) * 4096, dtype=np.uint8).copy()  # 1 MiB
    ours, theirs = pair(pairs, sndbuf=4096)
    roomy, reader = pair(pairs)
    fan = kernels.FanOut()
    fan.fds[0], fan.fds[1] = ours.fileno(), roomy.fileno()
    fan.iov_count[0] = fan.iov_count[1] = aim(fan, data, [(0, 200_000)])
    assert fan.send(2) >= 1
    sent = fan.sent[:2].copy()
    assert 0 < sent[0] < 200_000
    assert drain(theirs) == data[: sent[0]].tobytes()
    assert 0 < sent[1] <= 200_000
    assert drain(reader) == data[: sent[1]].tobytes()
    # Nothing more fits until the peer reads: the next call reports that nothing went.
    fan.iov_count[0] = aim(fan, data, [(0, 1)])
    while fan.send(1) == 0:  # the peer's queue has room for a byte or two after the drain
        pass
    assert fan.sent[0] == kernels.SEND_FAILED


def test_the_publisher_is_skipped_and_a_closed_peer_fails(pairs: list) -> None:
    data = np.frombuffer(b"0123456789", dtype=np.uint8).copy()
    publisher, publisher_peer = pair(pairs)
    gone, gone_peer = pair(pairs)
    gone_peer.close()
    alive, alive_peer = pair(pairs)
    fan = kernels.FanOut()
    for t, sock in enumerate((publisher, gone, alive)):
        fan.fds[t] = sock.fileno()
        fan.iov_count[t] = aim(fan, data, [(0, 10)])
    assert fan.send(3, skip=publisher.fileno()) == 1  # the closed one
    assert list(fan.sent[:3]) == [kernels.SEND_SKIPPED, kernels.SEND_FAILED, 10]
    assert list(fan.totals[:3]) == [0, 0, 10]
    assert drain(publisher_peer) == b""
    assert drain(alive_peer) == b"0123456789"


def test_more_iovecs_than_one_call_takes(pairs: list) -> None:
    data = np.frombuffer(bytes(range(256)) * 16, dtype=np.uint8).copy()
    pieces = [(k % 4000, 1 + k % 7) for k in range(3000)]  # three calls of at most 1024 iovecs
    ours, theirs = pair(pairs)
    fan = kernels.FanOut()
    fan.fds[0] = ours.fileno()
    fan.iov_count[0] = aim(fan, data, pieces)
    want = expected(data, pieces)
    assert fan.send(1) == 0 and fan.sent[0] == len(want)
    assert drain(theirs) == want


def test_bad_arguments_are_refused_before_any_send() -> None:
    fan = kernels.FanOut(targets=2, iovecs=4)
    with pytest.raises(ValueError, match="targets"):
        fan.send(3)
    fan.iov_first[0], fan.iov_count[0] = 3, 2
    with pytest.raises(ValueError, match="outside the iovec array"):
        fan.send(1)


def test_uniform_sends_give_every_target_the_same_iovecs(pairs: list) -> None:
    data = np.frombuffer(b"abcdefghij" * 10, dtype=np.uint8).copy()
    ends = [pair(pairs) for _ in range(3)]
    fan = kernels.FanOut()
    for t, (ours, _) in enumerate(ends):
        fan.fds[t] = ours.fileno()
    aim(fan, data, [(0, 4), (50, 6)])
    assert fan.send_uniform(3, 2, skip=ends[1][0].fileno()) == 0
    assert [drain(theirs) for _, theirs in ends] == [
        b"abcdajihgf"[:4] + data[50:56].tobytes(),
        b"",
        b"abcd" + data[50:56].tobytes(),
    ]
    assert fan.send_uniform(3, 1) == 0  # fewer iovecs: the slices follow
    assert [drain(theirs) for _, theirs in ends] == [b"abcd"] * 3
    with pytest.raises(ValueError, match="iovecs"):
        fan.send_uniform(3, 10_000)
