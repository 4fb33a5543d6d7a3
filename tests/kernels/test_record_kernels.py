"""The record kernels agree with the plain-Python reference (``support.record_reference``) on any batch.

Run in every build of the kernels (marked ``kernels``): compiled ahead of time, by numba's JIT and
as plain Python, so examples stay small.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import record_reference as ref
from support.reference import CONTROL_DOMAIN, message

from jitrelay import records
from jitrelay.kernels.framer import MessageFramer

pytestmark = pytest.mark.kernels

FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TYPES = {1: 40, 2: 56, 3: 2456}  # trade, quote, order book (always extended)


def arr(data: bytes) -> np.ndarray:
    return np.frombuffer(bytearray(data), dtype=np.uint8)


@st.composite
def records_of(draw: st.DrawFn) -> bytes:
    """A payload: records of the typed kinds (right or wrong length, either form) and others, or any bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=120))  # arbitrary bytes: records that may run past the payload
    payload = b""
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from([1, 1, 2, 3, 7, 200]))
        size = TYPES.get(kind, draw(st.integers(0, 60)))
        if kind in TYPES and draw(st.integers(0, 5)) == 0:
            size = draw(st.integers(0, 60))  # of the type, not of its layout's length
        value = (
            draw(st.binary(min_size=size, max_size=size)) if size < 300 else bytes(range(256)) * 9 + bytes(size - 2304)
        )
        payload += ref.record(kind, value, extended=draw(st.booleans()))
    return payload


@st.composite
def batches(draw: st.DrawFn) -> bytes:
    """Whole messages of any domain (control ones too), each with its own header fields."""
    out = b""
    for _ in range(draw(st.integers(0, 8))):
        domain = draw(st.sampled_from([1, 1, 1, 2, CONTROL_DOMAIN]))
        out += message(
            domain,
            draw(records_of()),
            source=draw(st.integers(0, 255)),
            sequence=draw(st.integers(0, (1 << 64) - 1)),
            timestamp_ns=draw(st.integers(0, (1 << 64) - 1)),
            checksum=0,
        )
    return out


def check(batch: bytes, tlv_type: int, *, copy: bool) -> None:
    got = records.decode(arr(batch), tlv_type, copy=copy)
    want = ref.gather(batch, tlv_type, TYPES[tlv_type])
    assert [r.tobytes() for r in got.records] == want.values
    assert got.sequence.tolist() == want.sequences
    assert got.timestamp_ns.tolist() == want.timestamps
    assert got.source.tolist() == want.sources
    assert (got.wrong_size, got.truncated) == (want.wrong_size, want.truncated)


@FEW
@given(batches(), st.sampled_from(sorted(TYPES)), st.booleans())
def test_decode_agrees_with_the_reference(batch: bytes, tlv_type: int, copy: bool) -> None:
    check(batch, tlv_type, copy=copy)


@FEW
@given(batches(), st.integers(0, 400))
def test_a_batch_cut_short_keeps_every_whole_message_and_counts_the_rest(batch: bytes, cut: int) -> None:
    part = batch[: max(0, len(batch) - cut)]
    got = records.decode(arr(part), 1, copy=True)
    want = ref.gather(part, 1, 40)
    assert [r.tobytes() for r in got.records] == want.values
    assert got.truncated == want.truncated


@FEW
@given(st.lists(batches(), min_size=1, max_size=4), st.lists(st.integers(1, 3000), min_size=1, max_size=8))
def test_any_split_into_batches_decodes_to_the_whole(parts: list[bytes], reads: list[int]) -> None:
    """A stream read in arbitrary pieces, framed into batches of whole messages, decodes to the reference."""
    stream = b"".join(parts)
    framer = MessageFramer(64)
    decoded: list[bytes] = []
    at = 0
    k = 0
    while at < len(stream) or framer.buffered:
        n = reads[k % len(reads)]
        k += 1
        chunk = stream[at : at + n]
        space = framer.space()
        take = min(len(chunk), len(space))
        space[:take] = np.frombuffer(chunk[:take], dtype=np.uint8)
        framer.commit(take)
        at += take
        while (batch := framer.maybe_extract_batch()) is not None:
            decoded += [r.tobytes() for r in records.decode(batch, "trade").records]
        if not take and at >= len(stream):
            break
    assert decoded == ref.gather(stream, 1, 40).values


@FEW
@given(st.lists(st.binary(min_size=40, max_size=40), min_size=1, max_size=30), st.booleans())
def test_a_uniform_batch_is_read_in_place(values: list[bytes], extended: bool) -> None:
    batch = b"".join(
        message(1, ref.record(1, v, extended=extended), sequence=i, timestamp_ns=7 * i, source=i % 256, checksum=0)
        for i, v in enumerate(values)
    )
    buf = arr(batch)
    view = records.decode(buf, "trade")
    assert np.shares_memory(view.records, buf)  # not a copy
    copied = records.decode(buf, "trade", copy=True)
    assert not np.shares_memory(copied.records, buf)
    for got in (view, copied):
        assert [r.tobytes() for r in got.records] == values
        assert got.sequence.tolist() == list(range(len(values)))
        assert got.timestamp_ns.tolist() == [7 * i for i in range(len(values))]


@FEW
@given(
    st.lists(st.binary(min_size=40, max_size=40), max_size=20),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, 255),
    st.sampled_from([1, 2]),
    st.booleans(),
    st.booleans(),
)
def test_encode_agrees_with_the_reference(
    values: list[bytes], first: int, source: int, version: int, checksums: bool, per_record: bool
) -> None:
    trades = np.frombuffer(b"".join(values), dtype=records.layout("trade").dtype).copy()
    stamps = [1_000 + 3 * i for i in range(len(values))] if per_record else [42] * len(values)
    got = records.encode(
        trades,
        domain=1,
        source=source,
        version=version,
        first_sequence=first,
        timestamp_ns=np.array(stamps, dtype=np.uint64) if per_record else 42,
        checksums=checksums,
    )
    want = ref.encode(
        values,
        1,
        domain=1,
        source=source,
        version=version,
        first_sequence=first,
        timestamps=stamps,
        checksums=checksums,
    )
    assert got.tobytes() == want


def test_extended_records_encode_and_decode() -> None:
    books = np.zeros(3, dtype=records.layout("order_book").dtype)
    books["sequence"] = [5, 6, 7]
    books["bids"]["count"] = 2
    books["bids"]["elements"][:, 0]["price"] = [100, 200, 300]
    data = records.encode(books, domain=1, timestamp_ns=9)
    assert len(data) == 3 * records.message_size("order_book") == 3 * (32 + 5 + 2456)
    assert data[32:37].tolist() == [255, 0, 3, 2456 & 0xFF, 2456 >> 8]
    assert data.tobytes() == ref.encode(
        [b.tobytes() for b in books],
        3,
        domain=1,
        source=0,
        version=2,
        first_sequence=0,
        timestamps=[9] * 3,
        checksums=False,
    )
    back = records.decode(data, "order_book")
    np.testing.assert_array_equal(back.records, books)


def test_bad_arguments_get_clear_errors() -> None:
    with pytest.raises(TypeError, match="contiguous one-dimensional uint8"):
        records.decode(np.zeros(10, dtype=np.int64), "trade")
    with pytest.raises(records.UnknownRecord):
        records.decode(arr(b""), 40)
    with pytest.raises(TypeError, match="no record layout's"):
        records.encode(np.zeros(2, dtype=np.int64), domain=1)
    mints = np.zeros(1, dtype=records.layout("pool_mint").dtype)
    with pytest.raises(TypeError, match="pool_mint or pool_burn's: pass record="):
        records.encode(mints, domain=1)
    assert records.encode(mints, domain=1, record="pool_burn")[32] == 13
    with pytest.raises(ValueError, match="2 timestamps for 1 records"):
        records.encode(mints, domain=1, record=12, timestamp_ns=np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="out holds 10 bytes"):
        records.encode(mints, domain=1, record=12, out=np.zeros(10, dtype=np.uint8))
