"""The builder and decoder of ``jitrelay.protocol`` write and read the bytes PROTOCOL.md describes."""

from __future__ import annotations

import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import reference as ref

from jitrelay.core import protocol as p

FAST = settings(max_examples=200, deadline=None)

SAMPLE = dict(source=0x33, flags=0x44, sequence=0x0102030405060708, timestamp_ns=0x1112131415161718)


def test_constants_follow_the_contract() -> None:
    assert p.MAGIC == 0xDEADBEEF
    assert p.MAGIC_BYTES == b"\xef\xbe\xad\xde" == struct.pack("<I", p.MAGIC)
    assert (p.VERSION, p.HEADER_SIZE, p.CHECKSUM_COVERED) == (2, 32, 28)
    assert (p.MARKET_DATA, p.SIGNAL, p.EXECUTION, p.SYSTEM) == (1, 2, 3, 4)
    assert p.DOMAIN_NAMES == {1: "market_data", 2: "signal", 3: "execution", 4: "system"}
    assert p.DOMAIN_IDS == {"market_data": 1, "signal": 2, "execution": 3, "system": 4}
    assert p.DOMAIN_TLV_RANGES == {1: ((1, 19),), 2: ((20, 39), (60, 79)), 3: ((40, 59),), 4: ((80, 119),)}
    assert p.VENDOR_TLV_RANGE == (200, 254)
    for name, spec in ref.DOMAINS.items():
        assert (*p.DOMAIN_TLV_RANGES[p.DOMAIN_IDS[name]], p.VENDOR_TLV_RANGE) == spec.ranges
    assert p.VERSIONS == ref.VERSIONS and p.CONTROL_DOMAIN == ref.CONTROL_DOMAIN == 255
    assert p.CONTROL_DOMAIN not in p.DOMAIN_NAMES
    assert p.VERDICT_NAMES == ref.VERDICTS
    assert [p.VERDICT_NAMES[v] for v in (p.FORWARD, p.BAD_VERSION, p.WRONG_DOMAIN)] == [
        "forward",
        "bad_version",
        "wrong_domain",
    ]
    assert [p.VERDICT_NAMES[v] for v in (p.MALFORMED_TLV, p.TLV_OUT_OF_RANGE, p.BAD_CHECKSUM)] == [
        "malformed_tlv",
        "tlv_out_of_range",
        "bad_checksum",
    ]
    assert p.VERDICT_NAMES[1:-1] == p.REJECT_NAMES
    assert p.VERDICT_NAMES[p.CONTROL] == "control"
    assert [p.FAULT_NAMES[f] for f in (p.NO_FAULT, p.BAD_MAGIC, p.OVERSIZE)] == ["none", "bad_magic", "oversize"]


# --- the header, byte by byte ------------------------------------------------------------


def test_every_header_field_sits_at_its_offset() -> None:
    payload = p.encode_record(40, b"fill")
    msg = p.build_message(p.EXECUTION, [(40, b"fill")], **SAMPLE)
    assert len(msg) == 32 + len(payload)
    assert msg[0:4] == b"\xef\xbe\xad\xde"
    assert msg[4] == 3
    assert msg[5] == 2
    assert msg[6] == 0x33
    assert msg[7] == 0x44
    assert msg[8:16] == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert msg[16:24] == bytes([0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11])
    assert msg[24:28] == len(payload).to_bytes(4, "little") == b"\x06\x00\x00\x00"
    assert msg[28:32] == zlib.crc32(msg[:28] + payload).to_bytes(4, "little")
    assert msg[32:] == payload == b"\x28\x04fill"


def test_header_offsets_match_the_contract() -> None:
    offsets = (p.OFF_MAGIC, p.OFF_DOMAIN, p.OFF_VERSION, p.OFF_SOURCE, p.OFF_FLAGS)
    assert offsets == (0, 4, 5, 6, 7)
    assert (p.OFF_SEQUENCE, p.OFF_TIMESTAMP, p.OFF_PAYLOAD_SIZE, p.OFF_CHECKSUM) == (8, 16, 24, 28)


def test_header_dtype_lays_fields_out_as_the_wire_does() -> None:
    fields = p.HEADER_DTYPE.fields
    assert p.HEADER_DTYPE.itemsize == 32
    layout = {name: (fields[name][1], fields[name][0].itemsize) for name in p.HEADER_DTYPE.names}
    assert layout == {
        "magic": (0, 4),
        "relay_domain": (4, 1),
        "version": (5, 1),
        "source": (6, 1),
        "flags": (7, 1),
        "sequence": (8, 8),
        "timestamp_ns": (16, 8),
        "payload_size": (24, 4),
        "checksum": (28, 4),
    }
    for name in ("magic", "sequence", "timestamp_ns", "payload_size", "checksum"):
        assert fields[name][0].byteorder in "<="
        assert fields[name][0].newbyteorder("<") == fields[name][0]


def test_header_dtype_views_a_message() -> None:
    msg = p.build_message(p.SIGNAL, [(21, b"xyz")], **SAMPLE)
    head = np.frombuffer(msg[:32], dtype=p.HEADER_DTYPE)[0]
    assert int(head["magic"]) == 0xDEADBEEF
    assert (int(head["relay_domain"]), int(head["version"])) == (2, 2)
    assert (int(head["source"]), int(head["flags"])) == (0x33, 0x44)
    assert int(head["sequence"]) == SAMPLE["sequence"]
    assert int(head["timestamp_ns"]) == SAMPLE["timestamp_ns"]
    assert int(head["payload_size"]) == 5
    assert int(head["checksum"]) == ref.expected_checksum(msg)


def test_header_unpack_reads_at_an_offset() -> None:
    msg = p.build_message(p.MARKET_DATA, payload=b"\x01\x00", **SAMPLE)
    head = p.Header.unpack(b"junk" + msg, 4)
    assert head == p.Header(0xDEADBEEF, 1, 2, 0x33, 0x44, SAMPLE["sequence"], SAMPLE["timestamp_ns"], 2, head.checksum)
    assert head.checksum == ref.expected_checksum(msg)


@FAST
@given(
    domain=st.integers(0, 255),
    fields=st.fixed_dictionaries(
        {
            "source": st.integers(0, 255),
            "flags": st.integers(0, 255),
            "sequence": st.integers(0, 2**64 - 1),
            "timestamp_ns": st.integers(0, 2**64 - 1),
        }
    ),
    payload=st.binary(max_size=100),
)
def test_build_message_equals_the_contract_encoding(domain: int, fields: dict[str, int], payload: bytes) -> None:
    assert p.build_message(domain, payload=payload, **fields) == ref.message(domain, payload, **fields)


def test_build_message_overrides_make_bad_messages() -> None:
    msg = p.build_message(p.SIGNAL, payload=b"\x00", version=7, magic=0x01020304, checksum=0xCAFEF00D, timestamp_ns=0)
    assert msg == b"\x04\x03\x02\x01\x02\x07\x00\x00" + bytes(16) + b"\x01\x00\x00\x00" + b"\x0d\xf0\xfe\xca\x00"


def test_build_message_stamps_the_current_time() -> None:
    before = time.time_ns()
    msg = p.build_message(p.MARKET_DATA)
    after = time.time_ns()
    assert before <= int.from_bytes(msg[16:24], "little") <= after
    assert msg[24:28] == bytes(4)
    assert len(msg) == 32


# --- records ------------------------------------------------------------------------------


def test_standard_record_bytes() -> None:
    assert p.encode_record(5, b"abc") == b"\x05\x03abc"
    assert p.encode_record(19, b"") == b"\x13\x00"
    assert p.encode_record(1, bytes(255)) == b"\x01\xff" + bytes(255)


def test_extended_record_bytes() -> None:
    assert p.encode_record(7, b"x" * 300) == b"\xff\x00\x07\x2c\x01" + b"x" * 300
    assert p.encode_record(7, b"ab", extended=True) == b"\xff\x00\x07\x02\x00ab"
    assert p.encode_record(255, b"") == b"\xff\x00\xff\x00\x00"
    assert p.encode_record(42, bytes(65535)) == b"\xff\x00\x2a\xff\xff" + bytes(65535)


def test_encode_record_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="not a byte"):
        p.encode_record(256, b"")
    with pytest.raises(ValueError, match="not a byte"):
        p.encode_record(-1, b"")
    with pytest.raises(ValueError, match="exceeds 65535"):
        p.encode_record(1, bytes(65536))
    with pytest.raises(ValueError, match="needs an extended record"):
        p.encode_record(1, bytes(256), extended=False)


@FAST
@given(
    records=st.lists(
        st.tuples(st.integers(1, 255), st.binary(max_size=40), st.booleans()).map(
            lambda r: (r[0], r[1], r[2] or r[0] == 255)
        ),
        max_size=6,
    )
)
def test_records_encode_as_the_contract_says(records: list[tuple[int, bytes, bool]]) -> None:
    want = b"".join(ref.extended_record(t, v) if extended else ref.standard_record(t, v) for t, v, extended in records)
    assert b"".join(p.encode_record(t, v, extended=extended) for t, v, extended in records) == want
    assert list(p.iter_records(want)) == [(t, v) for t, v, _ in records]


def test_encode_records_chooses_the_form_by_size() -> None:
    records = [(1, b"a"), (2, bytes(256)), (255, b"z")]
    want = b"\x01\x01a" + b"\xff\x00\x02\x00\x01" + bytes(256) + b"\xff\x00\xff\x01\x00z"
    assert p.encode_records(records) == want


# --- round trip -----------------------------------------------------------------------------

record_lists = st.lists(
    st.tuples(st.integers(1, 255), st.one_of(st.binary(max_size=40), st.binary(min_size=256, max_size=300))),
    max_size=5,
)


@FAST
@given(
    messages=st.lists(
        st.tuples(st.integers(1, 4), record_lists, st.integers(0, 255), st.integers(0, 2**64 - 1)), max_size=5
    )
)
def test_decode_reads_back_what_build_wrote(messages: list[tuple[int, list[tuple[int, bytes]], int, int]]) -> None:
    raw = [
        p.build_message(d, records, source=s, flags=s ^ 0xFF, sequence=seq, timestamp_ns=seq // 3)
        for d, records, s, seq in messages
    ]
    decoded = list(p.decode_messages(b"".join(raw)))
    assert len(decoded) == len(messages)
    for msg, data, (d, records, s, seq) in zip(decoded, raw, messages, strict=True):
        assert msg.raw == data
        assert msg.records == tuple(records)
        assert msg.checksum_ok
        h = msg.header
        assert (h.magic, h.relay_domain, h.version, h.source, h.flags) == (p.MAGIC, d, 2, s, s ^ 0xFF)
        assert (h.sequence, h.timestamp_ns, h.payload_size) == (seq, seq // 3, len(data) - 32)
        assert h.checksum == ref.expected_checksum(data) == p.message_checksum(data)


def test_decode_message_returns_the_next_offset() -> None:
    first = p.build_message(p.SIGNAL, [(20, b"a")], timestamp_ns=1)
    second = p.build_message(p.SIGNAL, [], timestamp_ns=2)
    data = first + second
    msg, offset = p.decode_message(data)
    assert (msg.raw, offset) == (first, len(first))
    msg, offset = p.decode_message(memoryview(data), offset)
    assert (msg.raw, msg.records, offset) == (second, (), len(data))


def test_checksum_ok_notices_a_wrong_checksum() -> None:
    good = p.build_message(p.SIGNAL, [(20, b"a")], timestamp_ns=1)
    bad = p.build_message(p.SIGNAL, [(20, b"a")], timestamp_ns=1, checksum=ref.expected_checksum(good) ^ 1)
    assert next(p.decode_messages(good)).checksum_ok
    assert not next(p.decode_messages(bad)).checksum_ok


def test_decode_of_nothing_is_nothing() -> None:
    assert list(p.decode_messages(b"")) == []


# --- decoder errors --------------------------------------------------------------------------


def test_decode_refuses_bad_magic() -> None:
    msg = p.build_message(p.SIGNAL, timestamp_ns=0, magic=0xDEADBEEE)
    with pytest.raises(p.ProtocolError, match="bad magic 0xdeadbeee at offset 0"):
        p.decode_message(msg)
    good = p.build_message(p.SIGNAL, timestamp_ns=0)
    with pytest.raises(p.ProtocolError, match="at offset 32"):
        list(p.decode_messages(good + msg))


@pytest.mark.parametrize(
    ("cut", "error"),
    [(1, "incomplete header"), (31, "incomplete header"), (35, "incomplete payload"), (37, "incomplete payload")],
)
def test_decode_refuses_a_truncated_message(cut: int, error: str) -> None:
    msg = p.build_message(p.SIGNAL, [(20, b"abcd")], timestamp_ns=0)
    with pytest.raises(p.ProtocolError, match=error):
        p.decode_message(msg[:cut])
    with pytest.raises(p.ProtocolError, match=error):
        list(p.decode_messages(msg + msg[:cut]))


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x14", id="dangling-byte"),
        pytest.param(b"\x14\x05abc", id="standard-overrun"),
        pytest.param(b"\x00\x01a", id="standard-type-0"),
        pytest.param(b"\xff\x00\x14\x01", id="extended-truncated"),
        pytest.param(b"\xff\x01\x14\x01\x00a", id="extended-second-byte"),
        pytest.param(b"\xff\x00\x00\x01\x00a", id="extended-type-0"),
        pytest.param(b"\xff\x00\x14\x10\x00abc", id="extended-overrun"),
        pytest.param(b"\x14\x01a\x00\x00", id="type-0-after-a-good-record"),
    ],
)
def test_decode_refuses_malformed_records(payload: bytes) -> None:
    msg = p.build_message(p.SIGNAL, payload=payload, timestamp_ns=0)
    assert ref.record_types(payload) is None
    with pytest.raises(p.ProtocolError):
        p.decode_message(msg)
    with pytest.raises(p.ProtocolError):
        list(p.iter_records(payload))


# --- batches ------------------------------------------------------------------------------------


@FAST
@given(
    domain=st.sampled_from([1, 2, 3]),
    count=st.integers(0, 8),
    records=record_lists,
    first=st.integers(0, 2**64 - 9),
    stamp=st.integers(0, 2**64 - 1),
    source=st.integers(0, 255),
    flags=st.integers(0, 255),
)
def test_build_batch_equals_build_message_per_message(
    domain: int, count: int, records: list[tuple[int, bytes]], first: int, stamp: int, source: int, flags: int
) -> None:
    batch = p.build_batch(domain, count, records, source=source, flags=flags, first_sequence=first, timestamp_ns=stamp)
    assert batch.dtype == np.uint8 and batch.ndim == 1
    want = b"".join(
        p.build_message(domain, records, source=source, flags=flags, sequence=first + i, timestamp_ns=stamp)
        for i in range(count)
    )
    assert batch.tobytes() == want
    payload = p.encode_records(records)
    for i, msg in enumerate(p.decode_messages(batch.tobytes())):
        assert msg.header.sequence == first + i
        fields = {"source": source, "flags": flags, "sequence": first + i, "timestamp_ns": stamp}
        assert msg.raw == ref.message(domain, payload, **fields)


def test_build_batch_headers_through_the_dtype() -> None:
    records = [(1, b"q" * 37)]
    batch = p.build_batch(p.MARKET_DATA, 5, records, first_sequence=100, timestamp_ns=77)
    size = 32 + 39
    assert batch.size == 5 * size == 355
    heads = batch.reshape(5, size)[:, :32].copy().view(p.HEADER_DTYPE).reshape(5)
    assert heads["sequence"].tolist() == [100, 101, 102, 103, 104]
    assert set(heads["timestamp_ns"].tolist()) == {77}
    assert set(heads["payload_size"].tolist()) == {39}
    raw = batch.tobytes()
    assert heads["checksum"].tolist() == [ref.expected_checksum(raw[i * size : (i + 1) * size]) for i in range(5)]


def test_build_batch_without_checksums_leaves_them_zero() -> None:
    records = [(20, b"sig")]
    batch = p.build_batch(p.SIGNAL, 3, records, first_sequence=7, timestamp_ns=9, checksums=False)
    size = 32 + 5
    for i in range(3):
        msg = batch.tobytes()[i * size : (i + 1) * size]
        assert msg[28:32] == bytes(4)
        assert msg[:28] == p.build_message(p.SIGNAL, records, sequence=7 + i, timestamp_ns=9)[:28]
        assert msg[32:] == b"\x14\x03sig"


def test_build_batch_stamps_one_current_time() -> None:
    before = time.time_ns()
    batch = p.build_batch(p.MARKET_DATA, 4, [(1, b"")])
    after = time.time_ns()
    stamps = {m.header.timestamp_ns for m in p.decode_messages(batch.tobytes())}
    assert len(stamps) == 1
    assert before <= stamps.pop() <= after
    assert all(m.checksum_ok for m in p.decode_messages(batch.tobytes()))


# --- subscriptions ----------------------------------------------------------------


def test_bitmaps_put_value_i_at_bit_i_mod_8_of_byte_i_div_8() -> None:
    bits = p.bitmap([0, 9, 255])
    assert len(bits) == 32
    assert bits[0] == 0b1 and bits[1] == 0b10 and bits[31] == 0b1000_0000
    assert sum(bin(b).count("1") for b in bits) == 3
    assert p.bitmap_values(bits) == {0, 9, 255}
    assert p.bitmap_values(p.bitmap([])) == frozenset()
    with pytest.raises(ValueError, match="byte value"):
        p.bitmap([256])
    with pytest.raises(ValueError, match="32 bytes"):
        p.bitmap_values(bytes(31))


def test_subscribe_and_unsubscribe_messages_are_system_domain_control_records() -> None:
    message, _ = p.decode_message(p.subscribe_message([1, 2], [7]))
    assert message.header.relay_domain == p.CONTROL_DOMAIN
    assert message.checksum_ok
    assert message.records == ((100, p.bitmap([1, 2])), (101, p.bitmap([7])))
    only_types, _ = p.decode_message(p.subscribe_message(tlv_types=[]))
    assert only_types.records == ((100, bytes(32)),)
    everything, _ = p.decode_message(p.unsubscribe_message())
    assert everything.records == ((102, b""),)
    with pytest.raises(ValueError, match="tlv_types, sources"):
        p.subscribe_message()


def test_control_records_apply_in_order_each_replacing_its_own_set() -> None:
    types_only = p.apply_control(p.EVERYTHING, p.subscribe_message(tlv_types=[3]))
    assert types_only == (frozenset({3}), None)
    both = p.apply_control(types_only, p.subscribe_message(sources=[1, 2]))
    assert both == (frozenset({3}), frozenset({1, 2}))
    assert p.apply_control(both, p.unsubscribe_message()) == p.EVERYTHING
    reset_then_types = p.build_message(p.CONTROL_DOMAIN, [(102, b""), (100, p.bitmap([5]))])
    assert p.apply_control(both, reset_then_types) == (frozenset({5}), None)
    with pytest.raises(p.ProtocolError, match="not a control record"):
        p.apply_control(both, p.build_message(p.CONTROL_DOMAIN, [(119, b"")]))
    assert p.describe_filter(both) == "types 3; sources 1,2"
    assert p.describe_filter((frozenset(), None)) == "types none; sources any"


def test_publish_only_is_a_control_record_that_leaves_the_filter_alone() -> None:
    declared = p.publish_only_message()
    message, _ = p.decode_message(declared)
    assert message.header.relay_domain == p.CONTROL_DOMAIN and message.records == ((p.PUBLISH_ONLY, b""),)
    assert p.declares_publish_only(declared)
    assert not p.declares_publish_only(p.unsubscribe_message())
    narrowed = (frozenset({3}), None)
    assert p.apply_control(narrowed, declared) == narrowed
    both = p.build_message(p.CONTROL_DOMAIN, [(p.PUBLISH_ONLY, b""), (p.SUBSCRIBE_SOURCES, p.bitmap([4]))])
    assert p.apply_control(narrowed, both) == (frozenset({3}), frozenset({4})) and p.declares_publish_only(both)


def test_shared_memory_records_are_the_bytes_docs_protocol_md_gives() -> None:
    asked = p.shared_memory_message()
    assert asked[4] == p.CONTROL_DOMAIN and asked[32:] == bytes((105, 0))
    assert p.requests_shared_memory(asked) and not p.requests_shared_memory(p.unsubscribe_message())
    assert p.apply_control(p.EVERYTHING, asked) == p.EVERYTHING  # it leaves the filter alone

    report = p.Lapped(offset=4096, messages=7, bytes=300)
    lapped = p.lapped_message(report)
    assert lapped[32:] == bytes((106, 24)) + struct.pack("<QQQ", 4096, 7, 300)
    assert p.lapped_report(lapped) == report and p.lapped_report(asked) is None
    assert p.apply_control(p.EVERYTHING, lapped) == p.EVERYTHING


def test_a_shared_log_notice_reads_back_with_its_position() -> None:
    grant = p.SharedLog(epoch=0x1234, offset=640, message=20, slot=3)
    notice = p.shared_log_notice(grant)
    assert notice[4] == p.CONTROL_DOMAIN and notice[32:34] == bytes((112, 32))
    assert notice[34:] == struct.pack("<QQQQ", 0x1234, 640, 20, 3)
    assert zlib.crc32(notice[:28] + notice[32:]) == struct.unpack_from("<I", notice, 28)[0]
    assert p.read_notice(notice) == grant
    assert grant.position == p.Position(0x1234, 640, 20)
