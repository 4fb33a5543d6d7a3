"""The compiled kernels agree with the plain-Python reference of PROTOCOL.md.

Run twice in CI: compiled, and as Python with ``NUMBA_DISABLE_JIT=1`` (which
is how coverage sees the kernel bodies), so every example stays small.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import reference as ref
from support import strategies as gen

from jitrelay import kernels
from jitrelay.core import protocol as p
from jitrelay.core.domains import logic_for
from jitrelay.kernels import loops

pytestmark = pytest.mark.kernels

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = tuple(ref.DOMAINS)
names = st.sampled_from(NAMES)
SMALL_MAX_PAYLOADS = (0, 1, 7, 32, 80)


def arr(data: bytes) -> np.ndarray:
    """A writable uint8 array holding ``data``, as the relay's receive buffer would."""
    return np.frombuffer(bytearray(data), dtype=np.uint8)


def tables_for(name: str, max_payload: int | None = None) -> kernels.KernelTables:
    if max_payload is None:
        return kernels.tables_for(logic_for(name))
    return kernels.tables_for(logic_for(name, max_payload=max_payload))


def draw_stream(data: st.DataObject) -> tuple[str, kernels.KernelTables, bytes]:
    """A domain, its kernel tables, and a stream of its messages within its payload limit."""
    name = data.draw(names)
    tables = tables_for(name)
    return name, tables, data.draw(gen.stream(ref.DOMAINS[name], tables.max_payload))


def expected(name: str, data: bytes, max_payload: int) -> tuple[list[ref.Judged], int, int]:
    spec = ref.DOMAINS[name]
    return ref.reference_scan(data, spec.ident, max_payload, spec.checksum, spec.ranges)


def assert_scan_matches(name: str, data: bytes, max_payload: int | None = None) -> None:
    tables = tables_for(name, max_payload)
    judged, consumed, fault = expected(name, data, tables.max_payload)
    result, out = kernels.scan(arr(data), tables)

    assert (result.count, result.consumed, result.fault) == (len(judged), consumed, fault)
    assert out.offsets[: result.count + 1].tolist() == [o for o, _, _ in judged] + [consumed]
    assert out.verdicts[: result.count].tolist() == [v for _, _, v in judged]
    runs = ref.reference_runs(judged)
    assert result.runs == len(runs)
    assert out.runs[: 2 * result.runs].tolist() == [bound for run in runs for bound in run]
    assert result.forwarded_bytes == sum(b - a for a, b in runs)
    assert out.counts.tolist() == ref.reference_counts(judged)


def max_payloads(name: str) -> st.SearchStrategy[int]:
    return st.sampled_from((ref.DOMAINS[name].max_payload, *SMALL_MAX_PAYLOADS))


# --- the domain tables --------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_kernel_tables_follow_the_domain_table(name: str) -> None:
    spec = ref.DOMAINS[name]
    tables = tables_for(name)
    assert tables.domain == spec.ident
    assert tables.max_payload == spec.max_payload
    assert tables.checksum_policy == {"off": p.CHECKSUM_OFF, "if_set": p.CHECKSUM_IF_SET, "required": 2}[spec.checksum]
    assert tables.type_allowed.dtype == np.uint8
    assert tables.type_allowed.tolist() == [int(ref.in_ranges(t, spec.ranges)) for t in range(256)]
    assert tables.version_allowed.tolist() == [int(v in spec.versions) for v in range(256)]


@pytest.mark.parametrize("name", NAMES)
def test_vendor_types_can_be_turned_off(name: str) -> None:
    tables = kernels.tables_for(logic_for(name, vendor_types=False))
    assert not tables.type_allowed[200:255].any()
    assert tables.type_allowed.tolist() == [
        int(ref.in_ranges(t, ref.DOMAINS[name].ranges) and not 200 <= t <= 254) for t in range(256)
    ]


# --- scan against the reference -------------------------------------------------


@pytest.mark.parametrize("kind", gen.KINDS)
@pytest.mark.parametrize("name", NAMES)
@FEW
@given(data=st.data())
def test_each_kind_of_message_gets_its_verdict(name: str, kind: str, data: st.DataObject) -> None:
    spec = ref.DOMAINS[name]
    msg = data.draw(gen.judged_message(spec, kind))
    want = gen.expected_verdict(spec, kind)
    assert ref.verdict(msg, spec.ident, spec.checksum, spec.ranges) == want

    result, out = kernels.scan(arr(msg), tables_for(name))
    assert (result.count, result.consumed, result.fault) == (1, len(msg), p.NO_FAULT)
    assert out.verdicts[0] == want
    assert result.forwarded_bytes == (len(msg) if want == p.FORWARD else 0)


@pytest.mark.parametrize(
    ("payload", "want"),
    [
        pytest.param(b"", p.FORWARD, id="heartbeat"),
        pytest.param(b"\x14\x02ab\x27\x00", p.FORWARD, id="standard-records"),
        pytest.param(b"\xff\x00\x14\x01\x00a", p.FORWARD, id="extended-record"),
        pytest.param(b"\x28\x00\x14", p.MALFORMED_TLV, id="out-of-range-then-dangling-byte"),
        pytest.param(b"\x28\x00\x00\x00", p.MALFORMED_TLV, id="out-of-range-then-type-0"),
        pytest.param(b"\x28\x00\xff\x01\x14\x00\x00", p.MALFORMED_TLV, id="out-of-range-then-bad-extended"),
        pytest.param(b"\xff\x00\x00\x00\x00", p.MALFORMED_TLV, id="extended-type-0"),
        pytest.param(b"\xff\x00\x14\x02\x00a", p.MALFORMED_TLV, id="extended-overrun"),
        pytest.param(b"\x14\x00\x28\x00", p.TLV_OUT_OF_RANGE, id="second-record-out-of-range"),
        pytest.param(b"\xff\x00\xff\x00\x00", p.TLV_OUT_OF_RANGE, id="extended-type-255"),
        pytest.param(b"\xff\x00\x13\x00\x00", p.TLV_OUT_OF_RANGE, id="extended-type-of-another-domain"),
    ],
)
def test_signal_verdicts_by_hand(payload: bytes, want: int) -> None:
    msg = ref.message(p.SIGNAL, payload, sequence=3, timestamp_ns=4)
    spec = ref.DOMAINS["signal"]
    assert ref.verdict(msg, spec.ident, spec.checksum, spec.ranges) == want
    result, out = kernels.scan(arr(msg), tables_for("signal"))
    assert (result.count, result.consumed, out.verdicts[0]) == (1, len(msg), want)
    # Only a message that is otherwise forwarded is judged on its checksum.
    broken = msg[:28] + (ref.expected_checksum(msg) ^ 0x80).to_bytes(4, "little") + msg[32:]
    result, out = kernels.scan(arr(broken), tables_for("signal"))
    assert out.verdicts[0] == (p.BAD_CHECKSUM if want == p.FORWARD else want)


# A payload of exactly one standard record that fills it is judged without the TLV walk; these sit on
# both sides of that condition (type 0, the extended marker, a length one off either way, no room for a header).
ONE_RECORD_PAYLOADS = [
    pytest.param(b"\x01\x03abc", p.FORWARD, id="fills-it"),
    pytest.param(b"\x28\x03abc", p.TLV_OUT_OF_RANGE, id="fills-it-out-of-range"),
    pytest.param(b"\x01\x00", p.FORWARD, id="empty-value-fills-it"),
    pytest.param(b"\x13\xff" + bytes(255), p.FORWARD, id="longest-standard-value"),
    pytest.param(b"\x01\x04abc", p.MALFORMED_TLV, id="length-one-too-many"),
    pytest.param(b"\x01\x02abc", p.MALFORMED_TLV, id="length-one-too-few"),
    pytest.param(b"\x01\x01a\x02\x00", p.FORWARD, id="length-short-by-a-second-record"),
    pytest.param(b"\x01\x01a\x28\x00", p.TLV_OUT_OF_RANGE, id="second-record-out-of-range"),
    pytest.param(b"\x00\x03abc", p.MALFORMED_TLV, id="type-0-fills-it"),
    pytest.param(b"\xff\x03\x01\x00\x00", p.MALFORMED_TLV, id="extended-marker-whose-length-byte-fits"),
    pytest.param(b"\xff\x00", p.MALFORMED_TLV, id="extended-marker-cut-short"),
    pytest.param(b"\xff\x00\x01\x01\x00a", p.FORWARD, id="extended-record-fills-it"),
    pytest.param(b"\xff\x00\x28\x01\x00a", p.TLV_OUT_OF_RANGE, id="extended-record-out-of-range"),
    pytest.param(b"", p.FORWARD, id="no-payload"),
    pytest.param(b"\x01", p.MALFORMED_TLV, id="one-byte"),
]


@pytest.mark.parametrize(("payload", "want"), ONE_RECORD_PAYLOADS)
def test_one_record_payloads_by_hand(payload: bytes, want: int) -> None:
    msg = ref.message(p.MARKET_DATA, payload)
    spec = ref.DOMAINS["market_data"]
    assert ref.verdict(msg, spec.ident, spec.checksum, spec.ranges) == want
    result, out = kernels.scan(arr(msg * 3), tables_for("market_data"))
    assert (result.count, result.consumed, out.verdicts[:3].tolist()) == (3, 3 * len(msg), [want] * 3)
    assert_scan_matches("market_data", msg * 3)


@FAST
@given(
    name=names,
    messages=st.lists(
        st.tuples(
            st.sampled_from((0, 1, 19, 20, 40, 60, 200, 254, 255)) | st.integers(0, 255),
            st.integers(0, 255),
            st.integers(-3, 3),
            st.binary(max_size=6),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_one_record_payloads_match_the_reference(name: str, messages: list[tuple[int, int, int, bytes]]) -> None:
    """One record header declaring ``length`` bytes with ``length + off`` bytes after it (or ``tail`` when short)."""
    stream = b""
    for tlv_type, length, off, tail in messages:
        value = (tail * (length + off + 1))[: length + off] if length + off >= 0 else b""
        payload = bytes((tlv_type, length)) + value if length + off >= -2 else tail[:1]
        stream += ref.message(ref.DOMAINS[name].ident, payload)
    assert_scan_matches(name, stream)


@pytest.mark.parametrize("checksum", ("off", "if_set", "required"))
@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.data(), versions=st.sampled_from([(1, 2), (1,), (2,)]) | st.sets(st.integers(0, 255), min_size=1))
def test_scan_follows_any_checksum_policy_and_version_set(
    name: str, checksum: str, versions: tuple[int, ...] | set[int], data: st.DataObject
) -> None:
    """Random streams, random versions and checksum values: the kernel agrees with the reference under every setting."""
    accepted = tuple(sorted(versions))
    spec = ref.DOMAINS[name]._replace(checksum=checksum, versions=accepted)
    tables = kernels.tables_for(logic_for(name, checksum=checksum, versions=accepted))
    stream = data.draw(gen.stream(spec, spec.max_payload))
    judged, consumed, fault = ref.reference_scan(stream, spec.ident, spec.max_payload, checksum, spec.ranges, accepted)
    result, out = kernels.scan(arr(stream), tables)
    assert (result.count, result.consumed, result.fault) == (len(judged), consumed, fault)
    assert out.verdicts[: result.count].tolist() == [v for _, _, v in judged]
    assert out.counts.tolist() == ref.reference_counts(judged)


@pytest.mark.parametrize(
    ("name", "zero", "wrong"),
    [
        ("market_data", p.FORWARD, p.FORWARD),
        ("signal", p.FORWARD, p.BAD_CHECKSUM),
        ("system", p.FORWARD, p.BAD_CHECKSUM),
        ("execution", p.BAD_CHECKSUM, p.BAD_CHECKSUM),
    ],
)
@pytest.mark.parametrize("version", (1, 2))
def test_zero_and_wrong_checksums_by_domain(name: str, zero: int, wrong: int, version: int) -> None:
    """A zero checksum means "not computed" where the policy allows it (Torq's fast path writes 0)."""
    spec = ref.DOMAINS[name]
    tlv_type = spec.ranges[0][0]
    good = ref.message(spec.ident, ref.standard_record(tlv_type, b"value"), version=version)
    right = ref.expected_checksum(good)
    for stored, want in ((0, zero), (right ^ 1, wrong), (right, p.FORWARD)):
        msg = good[:28] + stored.to_bytes(4, "little") + good[32:]
        assert ref.verdict(msg, spec.ident, spec.checksum, spec.ranges) == want
        result, out = kernels.scan(arr(msg), tables_for(name))
        assert (result.count, out.verdicts[0]) == (1, want)


@FAST
@given(name=names, data=st.binary(max_size=300))
def test_scan_matches_reference_on_arbitrary_bytes(name: str, data: bytes) -> None:
    assert_scan_matches(name, data)


@FAST
@given(name=names, data=gen.magic_rich_bytes(), small=st.sampled_from((None, *SMALL_MAX_PAYLOADS)))
def test_scan_matches_reference_on_bytes_carrying_the_magic(name: str, data: bytes, small: int | None) -> None:
    assert_scan_matches(name, data, small)


@FAST
@given(data=st.data())
def test_scan_matches_reference_on_mixed_streams(data: st.DataObject) -> None:
    name = data.draw(names)
    max_payload = data.draw(max_payloads(name))
    stream = data.draw(gen.stream(ref.DOMAINS[name], max_payload))
    assert_scan_matches(name, stream, max_payload)


@FEW
@given(data=st.data())
def test_scan_honours_start_and_end(data: st.DataObject) -> None:
    name, tables, stream = draw_stream(data)
    before = data.draw(st.binary(max_size=40))
    after = data.draw(st.binary(max_size=40))
    start, end = len(before), len(before) + len(stream)

    judged, consumed, fault = expected(name, stream, tables.max_payload)
    result, out = kernels.scan(arr(before + stream + after), tables, start, end)

    assert (result.count, result.consumed, result.fault) == (len(judged), start + consumed, fault)
    assert out.offsets[: result.count].tolist() == [start + o for o, _, _ in judged]
    assert out.verdicts[: result.count].tolist() == [v for _, _, v in judged]
    runs = [bound + start for run in ref.reference_runs(judged) for bound in run]
    assert out.runs[: 2 * result.runs].tolist() == runs


def test_scan_of_a_buffer_full_of_heartbeats_fills_every_slot() -> None:
    beats = [ref.message(p.SIGNAL, sequence=i) for i in range(50)]
    data = b"".join(beats)
    out = kernels.ScanBuffers(len(data))
    result = kernels.scan_into(arr(data), 0, len(data), tables_for("signal"), out)
    assert result == kernels.ScanResult(50, len(data), p.NO_FAULT, 1, len(data))
    assert out.offsets[:51].tolist() == list(range(0, len(data) + 1, 32))
    assert out.runs[:2].tolist() == [0, len(data)]
    assert out.counts.tolist() == [50, 0, 0, 0, 0, 0, 0]


def test_fault_at_the_start_leaves_nothing_consumed() -> None:
    good = ref.message(p.MARKET_DATA, ref.standard_record(1, b"abc"))
    tables = tables_for("market_data", 16)
    assert kernels.scan(arr(b"\xef\xbe\xad\x00" + good), tables)[0] == kernels.ScanResult(0, 0, p.BAD_MAGIC, 0, 0)
    oversize = ref.message(p.MARKET_DATA, bytes(17))
    assert kernels.scan(arr(oversize[:32]), tables)[0] == kernels.ScanResult(0, 0, p.OVERSIZE, 0, 0)
    # Payload exactly at the limit is fine.
    at_limit = ref.message(p.MARKET_DATA, ref.standard_record(1, bytes(14)))
    assert kernels.scan(arr(at_limit), tables)[0] == kernels.ScanResult(1, 48, p.NO_FAULT, 1, 48)


def test_scan_needs_four_bytes_to_see_bad_magic() -> None:
    tables = tables_for("signal")
    assert kernels.scan(arr(b"\x00\x00\x00"), tables)[0] == kernels.ScanResult(0, 0, p.NO_FAULT, 0, 0)
    assert kernels.scan(arr(b"\x00\x00\x00\x00"), tables)[0] == kernels.ScanResult(0, 0, p.BAD_MAGIC, 0, 0)
    # A partial header that starts with the magic waits for more bytes.
    assert kernels.scan(arr(ref.MAGIC_WIRE + bytes(27)), tables)[0] == kernels.ScanResult(0, 0, p.NO_FAULT, 0, 0)


def test_scan_into_refuses_a_range_beyond_capacity() -> None:
    data = arr(b"".join(ref.message(p.SIGNAL) for _ in range(3)))
    out = kernels.ScanBuffers(64)
    with pytest.raises(ValueError, match="capacity"):
        kernels.scan_into(data, 0, 96, tables_for("signal"), out)
    assert out.counts.tolist() == [0] * len(p.VERDICT_NAMES)
    assert kernels.scan_into(data, 32, 96, tables_for("signal"), out).count == 2


def test_counts_accumulate_across_calls() -> None:
    tables = tables_for("signal")
    good = ref.message(p.SIGNAL, ref.standard_record(20, b"x"))
    wrong = ref.message(p.EXECUTION, ref.standard_record(40, b"x"))
    out = kernels.ScanBuffers(1024)
    for data in (good + wrong, good, wrong + wrong):
        kernels.scan_into(arr(data), 0, len(data), tables, out)
    assert out.counts.tolist() == [2, 0, 3, 0, 0, 0, 0]


def test_scan_into_can_tally_into_the_callers_counts() -> None:
    """One ``ScanBuffers`` may serve several connections, each keeping its own tally."""
    tables = tables_for("execution")
    good = ref.message(p.EXECUTION, ref.extended_record(59, b"fill"))
    bad = good[:28] + bytes(4) + good[32:]
    data = arr(good + bad + good)
    out = kernels.ScanBuffers(len(data))
    mine = np.zeros(len(p.VERDICT_NAMES), dtype=np.int64)
    for _ in range(2):
        result = kernels.scan_into(data, 0, len(data), tables, out, mine)
    assert result == kernels.ScanResult(3, len(data), p.NO_FAULT, 2, 2 * len(good))
    assert mine.tolist() == [4, 0, 0, 0, 0, 2, 0]
    assert out.counts.tolist() == [0] * len(p.VERDICT_NAMES)


# --- feeding a stream in pieces ---------------------------------------------------


@st.composite
def chunked_stream(draw: st.DrawFn) -> tuple[str, int, bytes, list[int]]:
    name = draw(names)
    max_payload = draw(max_payloads(name))
    data = draw(gen.stream(ref.DOMAINS[name], max_payload))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    return name, max_payload, data, cuts


@FAST
@given(case=chunked_stream(), in_place=st.booleans())
def test_scanning_in_chunks_agrees_with_one_scan(case: tuple[str, int, bytes, list[int]], in_place: bool) -> None:
    """Feed chunks as the relay does: keep the bytes from ``consumed`` on, add the next read, scan again.

    ``in_place`` keeps the leftover where it lies and scans from ``consumed``;
    otherwise the leftover moves to the front of a fresh buffer.
    """
    name, max_payload, data, cuts = case
    tables = tables_for(name, max_payload)
    whole, whole_out = kernels.scan(arr(data), tables)

    out = kernels.ScanBuffers(len(data))
    seen: list[tuple[int, int]] = []
    forwarded = bytearray()
    fault, consumed = p.NO_FAULT, 0
    leftover = b""
    for lo, hi in zip([0, *cuts], [*cuts, len(data)], strict=True):
        if in_place:
            buf, start, base = arr(data), consumed, 0
        else:
            buf, start, base = arr(leftover + data[lo:hi]), 0, consumed
        end = start + (hi - consumed if in_place else len(leftover) + hi - lo)
        result = kernels.scan_into(buf, start, end, tables, out)
        seen += [
            (base + int(o), int(v))
            for o, v in zip(out.offsets[: result.count], out.verdicts[: result.count], strict=True)
        ]
        forwarded += kernels.compact(buf, out.runs, result.runs).tobytes()
        leftover = bytes(buf[result.consumed : end])
        consumed = base + result.consumed
        if result.fault:
            fault = result.fault
            break

    assert seen == list(
        zip(whole_out.offsets[: whole.count].tolist(), whole_out.verdicts[: whole.count].tolist(), strict=True)
    )
    assert (consumed, fault) == (whole.consumed, whole.fault)
    assert out.counts.tolist() == whole_out.counts.tolist()
    assert bytes(forwarded) == kernels.compact(arr(data), whole_out.runs, whole.runs).tobytes()


# --- framing without judging ---------------------------------------------------------


@FAST
@given(data=st.data())
def test_frame_matches_reference_framing(data: st.DataObject) -> None:
    name = data.draw(names)
    stream = data.draw(st.one_of(gen.stream(ref.DOMAINS[name], 0), gen.magic_rich_bytes()))
    before = data.draw(st.binary(max_size=8))
    # ``frame`` knows no payload limit: only a bad magic stops it.
    judged, consumed, fault = expected(name, stream, 2**32 - 1)
    whole = arr(before + stream)
    assert kernels.frame(whole, len(before)) == (len(judged), len(before) + consumed, fault)
    if not before:
        assert kernels.frame(arr(stream)) == (len(judged), consumed, fault)


def test_frame_stops_at_end() -> None:
    two = ref.message(p.SIGNAL) + ref.message(p.SIGNAL, b"\x14\x00")
    assert kernels.frame(arr(two)) == (2, 66, p.NO_FAULT)
    assert kernels.frame(arr(two), 0, 65) == (1, 32, p.NO_FAULT)
    assert kernels.frame(arr(two + b"junk")) == (2, 66, p.BAD_MAGIC)


# --- CRC-32 ----------------------------------------------------------------------------


@FAST
@given(data=st.binary(max_size=300), value=st.integers(0, 2**32 - 1))
def test_crc32_is_zlib_crc32(data: bytes, value: int) -> None:
    assert kernels.crc32(arr(data)) == zlib.crc32(data)
    assert kernels.crc32(arr(data), value) == zlib.crc32(data, value)


def test_crc32_known_values() -> None:
    assert kernels.crc32(arr(b"")) == 0
    assert kernels.crc32(arr(b"123456789")) == 0xCBF43926
    # Chaining two pieces gives the CRC of the whole.
    assert kernels.crc32(arr(b"56789"), kernels.crc32(arr(b"1234"))) == 0xCBF43926


@FAST
@given(data=st.data())
def test_message_crc_is_the_crc_the_header_should_carry(data: st.DataObject) -> None:
    name = data.draw(names)
    msg = data.draw(gen.any_message(ref.DOMAINS[name]))
    before = data.draw(st.binary(max_size=40))
    after = data.draw(st.binary(max_size=8))
    assert kernels.message_crc(arr(before + msg + after), len(before)) == ref.expected_checksum(msg)
    assert kernels.message_crc(arr(msg)) == ref.expected_checksum(msg)


@pytest.mark.parametrize("cut", [0, 31, 32 + 4])
def test_message_crc_needs_a_complete_message(cut: int) -> None:
    msg = ref.message(p.SIGNAL, ref.standard_record(20, b"abcdef"))
    with pytest.raises(ValueError, match="no complete message"):
        kernels.message_crc(arr(msg[:cut]))
    with pytest.raises(ValueError, match="no complete message"):
        kernels.message_crc(arr(b"xx" + msg[:cut]), 2)


# --- compaction ----------------------------------------------------------------------------


@FAST
@given(data=st.data())
def test_compact_joins_the_forwarded_messages(data: st.DataObject) -> None:
    name, tables, stream = draw_stream(data)
    judged, _, _ = expected(name, stream, tables.max_payload)
    want = b"".join(stream[o : o + n] for o, n, v in judged if v == p.FORWARD)

    buf = arr(stream)
    result, out = kernels.scan(buf, tables)
    assert kernels.compact(buf, out.runs, result.runs).tobytes() == want

    spare = np.full(len(want) + data.draw(st.integers(0, 16)), 0xAA, dtype=np.uint8)
    joined = kernels.compact(buf, out.runs, result.runs, spare)
    assert joined.tobytes() == want
    assert np.shares_memory(joined, spare) or not want
    assert spare[len(want) :].tolist() == [0xAA] * (len(spare) - len(want))


def test_compact_refuses_an_output_too_small() -> None:
    runs = np.array([0, 40, 50, 60], dtype=np.int64)
    buf = arr(bytes(range(60)))
    assert kernels.compact(buf, runs, 2).tobytes() == bytes(range(40)) + bytes(range(50, 60))
    assert kernels.compact(buf, runs, 0).tobytes() == b""
    with pytest.raises(ValueError, match="cannot hold 50"):
        kernels.compact(buf, runs, 2, np.zeros(49, dtype=np.uint8))


# --- stamping a reusable batch ---------------------------------------------------------------


@st.composite
def batch_case(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, bytes]]]:
    spec = ref.DOMAINS[draw(names)]
    records = draw(st.lists(st.tuples(gen.in_range_types(spec), gen.small_values), max_size=3))
    return spec.ident, draw(st.integers(0, 6)), records


sequences = st.integers(0, 2**64 - 1 - 8)
timestamps = st.integers(0, 2**64 - 1)


@FAST
@given(case=batch_case(), old=st.tuples(sequences, timestamps), new=st.tuples(sequences, timestamps))
def test_stamp_batch_renumbers_and_refreshes_checksums(
    case: tuple[int, int, list[tuple[int, bytes]]], old: tuple[int, int], new: tuple[int, int]
) -> None:
    domain, count, records = case
    batch = p.build_batch(domain, count, records, first_sequence=old[0], timestamp_ns=old[1], source=9, flags=3)
    size = p.HEADER_SIZE + len(p.encode_records(records))
    kernels.stamp_batch(batch, size, new[0], new[1])

    want = p.build_batch(domain, count, records, first_sequence=new[0], timestamp_ns=new[1], source=9, flags=3)
    assert batch.tobytes() == want.tobytes()
    raw = batch.tobytes()
    for i in range(count):
        msg = raw[i * size : (i + 1) * size]
        assert int.from_bytes(msg[8:16], "little") == new[0] + i
        assert int.from_bytes(msg[16:24], "little") == new[1]
        assert int.from_bytes(msg[28:32], "little") == ref.expected_checksum(msg)


def test_stamp_batch_takes_the_whole_range_of_both_fields() -> None:
    """Sequence and timestamp are 8-byte fields: values of 2**63 and above are as valid as small ones."""
    records = [(20, b"s")]
    size = 32 + 3
    for seq, stamp in [(1, 2), (2**63, 5), (7, 2**63 + 1), (2**64 - 2, 2**64 - 1)]:
        batch = p.build_batch(p.SIGNAL, 2, records, first_sequence=0, timestamp_ns=0)
        kernels.stamp_batch(batch, size, seq, stamp)
        assert batch.tobytes() == p.build_batch(p.SIGNAL, 2, records, first_sequence=seq, timestamp_ns=stamp).tobytes()


@FEW
@given(case=batch_case(), new=st.tuples(st.integers(0, 2**63 - 8), st.integers(0, 2**63 - 1)))
def test_stamp_batch_without_checksums_leaves_them_alone(
    case: tuple[int, int, list[tuple[int, bytes]]], new: tuple[int, int]
) -> None:
    domain, count, records = case
    batch = p.build_batch(domain, count, records, first_sequence=5, timestamp_ns=6)
    before = batch.copy()
    size = p.HEADER_SIZE + len(p.encode_records(records))
    kernels.stamp_batch(batch, size, new[0], new[1], checksums=False)

    want = p.build_batch(domain, count, records, first_sequence=new[0], timestamp_ns=new[1])
    rows, old_rows, want_rows = (a.reshape(count, size) for a in (batch, before, want))
    assert (rows[:, 28:32] == old_rows[:, 28:32]).all()
    assert (rows[:, :28] == want_rows[:, :28]).all()
    assert (rows[:, 32:] == want_rows[:, 32:]).all()


@pytest.mark.parametrize(("length", "size"), [(64, 31), (64, 0), (96, 64), (33, 32)])
def test_stamp_batch_refuses_a_ragged_batch(length: int, size: int) -> None:
    batch = np.zeros(length, dtype=np.uint8)
    with pytest.raises(ValueError, match="whole number of messages"):
        kernels.stamp_batch(batch, size, 1, 2)
    assert not batch.any()


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, loops.CRC_ZLIB_MIN - 1, loops.CRC_ZLIB_MIN, 5000])
def test_crc32_agrees_with_zlib_on_both_sides_of_the_zlib_threshold(size: int) -> None:
    data = np.frombuffer(bytes((i * 37 + 11) & 0xFF for i in range(size)), dtype=np.uint8)
    assert kernels.crc32(data) == zlib.crc32(data.tobytes())
    assert kernels.crc32(data, 0xDEADBEEF) == zlib.crc32(data.tobytes(), 0xDEADBEEF)
