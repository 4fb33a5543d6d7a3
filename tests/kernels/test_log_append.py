"""The log's copy kernel against plain slicing: runs back to back into a ring, wrapped, with its mirror."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitrelay import kernels

pytestmark = pytest.mark.kernels


@settings(max_examples=200, deadline=None)
@given(
    st.integers(16, 512),
    st.data(),
)
def test_log_append_copies_the_runs_back_to_back_wrapping_with_the_mirror(size: int, data: st.DataObject) -> None:
    mirror = data.draw(st.integers(0, size))
    buf = np.frombuffer(bytes(range(256)) * 4, dtype=np.uint8).copy()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(buf)), max_size=8)))
    runs = np.array(cuts[: len(cuts) // 2 * 2], dtype=np.int64)
    total = int((runs[1::2] - runs[0::2]).sum())
    if total > size:
        runs = np.zeros(0, dtype=np.int64)
        total = 0
    at = data.draw(st.integers(0, size - 1))
    ring = np.zeros(size + mirror, dtype=np.uint8)
    assert kernels.log_append(buf, runs, len(runs) // 2, ring, size, mirror, at) == total
    expected = np.zeros(size, dtype=np.uint8)
    stream = b"".join(buf[a:b].tobytes() for a, b in zip(runs[0::2], runs[1::2], strict=True))
    for i, byte in enumerate(stream):
        expected[(at + i) % size] = byte
    assert ring[:size].tobytes() == expected.tobytes()
    written = {(at + i) % size for i in range(len(stream))}
    for i in range(mirror):  # the mirror repeats what was written into the ring's first bytes
        assert ring[size + i] == (expected[i] if i in written else 0)


def test_bad_runs_copy_nothing_and_are_refused() -> None:
    buf = np.arange(100, dtype=np.uint8)
    ring = np.zeros(64, dtype=np.uint8)
    for runs in ([0, 101], [10, 5], [-1, 3], [0, 40, 50, 80]):  # outside, backwards, negative, more than the ring
        with pytest.raises(ValueError, match="outside the buffer"):
            kernels.log_append(buf, np.array(runs, dtype=np.int64), len(runs) // 2, ring, 64, 0, 0)
        assert not ring.any()
    with pytest.raises(ValueError, match="cannot be"):
        kernels.log_append(buf, np.array([0, 1], dtype=np.int64), 1, ring, 64, 8, 0)  # no room for the mirror
