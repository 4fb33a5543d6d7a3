"""Hypothesis strategies for Protocol V2 streams, good and bad.

Every message is encoded by ``reference`` (from PROTOCOL.md), never by the
project's builder. ``judged_message`` draws a message meant to get one
particular verdict, so a test can check that the reference agrees before it
compares the kernel with the reference; ``stream`` strings many of them
together and may end in a partial message, a stream fault or garbage.
"""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import strategies as st

from jitrelay.core.protocol import (
    BAD_CHECKSUM,
    BAD_VERSION,
    CONTROL,
    FORWARD,
    MALFORMED_TLV,
    TLV_OUT_OF_RANGE,
    WRONG_DOMAIN,
)
from support import reference as ref

KINDS = ("empty", *ref.VERDICTS, "malformed_control", "zero_checksum")  # what a generated message may be
EXPECTED = {
    "forward": FORWARD,
    "empty": FORWARD,
    "bad_version": BAD_VERSION,
    "wrong_domain": WRONG_DOMAIN,
    "malformed_tlv": MALFORMED_TLV,
    "tlv_out_of_range": TLV_OUT_OF_RANGE,
    "bad_checksum": BAD_CHECKSUM,
    "control": CONTROL,
    "malformed_control": MALFORMED_TLV,
    "zero_checksum": BAD_CHECKSUM,
}


def expected_verdict(domain: ref.Domain, kind: str) -> int:
    """``EXPECTED[kind]`` as a relay of ``domain`` gives it: its checksum policy may let the checksum kinds pass."""
    if kind == "bad_checksum" and domain.checksum == "off":
        return FORWARD
    if kind == "zero_checksum" and domain.checksum != "required":
        return FORWARD
    return EXPECTED[kind]


MALFORMED_KINDS = (
    "dangling_byte",
    "standard_overrun",
    "extended_overrun",
    "extended_truncated",
    "extended_second_byte",
    "standard_type_0",
    "extended_type_0",
)

small_values = st.binary(max_size=24)
# Occasionally a value too long for a standard record.
extended_values = st.one_of(st.binary(max_size=24), st.binary(min_size=256, max_size=300))


def in_range_types(domain: ref.Domain) -> st.SearchStrategy[int]:
    return st.one_of(*(st.integers(lo, hi) for lo, hi in domain.ranges))


def out_of_range_types(domain: ref.Domain, extended: bool) -> st.SearchStrategy[int]:
    """Types 1..254 (and 255, reachable only as an extended record's inner type) the domain does not carry."""
    top = 255 if extended else 254
    return st.integers(1, top).filter(lambda t: not ref.in_ranges(t, domain.ranges))


@st.composite
def record(draw: st.DrawFn, types: st.SearchStrategy[int]) -> bytes:
    if draw(st.booleans()):
        return ref.standard_record(draw(types), draw(small_values))
    return ref.extended_record(draw(types), draw(extended_values))


@st.composite
def out_of_range_record(draw: st.DrawFn, domain: ref.Domain) -> bytes:
    if draw(st.booleans()):
        return ref.standard_record(draw(out_of_range_types(domain, False)), draw(small_values))
    return ref.extended_record(draw(out_of_range_types(domain, True)), draw(small_values))


def valid_payload(domain: ref.Domain, max_records: int = 4) -> st.SearchStrategy[bytes]:
    return st.lists(record(in_range_types(domain)), max_size=max_records).map(b"".join)


@st.composite
def any_payload(draw: st.DrawFn, domain: ref.Domain) -> bytes:
    """Well-formed records of any type, or raw bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=40))
    return draw(st.lists(record(st.integers(1, 254)), max_size=3).map(b"".join))


@st.composite
def malformed_payload(draw: st.DrawFn, domain: ref.Domain) -> bytes:
    """Records that do not fill the payload exactly, or a record of type 0.

    Records before the fault may be out of the domain's ranges: malformed wins
    wherever it occurs in the payload.
    """
    before = draw(st.lists(st.one_of(record(in_range_types(domain)), out_of_range_record(domain)), max_size=3))
    head = b"".join(before)
    kind = draw(st.sampled_from(MALFORMED_KINDS))
    if kind == "dangling_byte":
        return head + bytes([draw(st.integers(0, 255))])
    if kind == "standard_overrun":
        length = draw(st.integers(1, 255))
        return head + bytes([draw(st.integers(1, 254)), length]) + draw(st.binary(max_size=length - 1))
    if kind == "extended_overrun":
        length = draw(st.integers(1, 65535))
        value = draw(st.binary(max_size=min(length - 1, 40)))
        return head + bytes([255, 0, draw(st.integers(1, 255))]) + length.to_bytes(2, "little") + value
    if kind == "extended_truncated":
        return head + bytes([255]) + draw(st.binary(max_size=3))
    # The remaining kinds are bad wherever they stand, so anything may follow;
    # apart from the one bad byte they are well formed, so nothing else gives them away.
    after = draw(st.one_of(valid_payload(domain), any_payload(domain)))
    if kind == "extended_second_byte":
        value = draw(small_values)
        bad = bytes([255, draw(st.integers(1, 255)), draw(in_range_types(domain))])
        bad += len(value).to_bytes(2, "little") + value
    elif kind == "standard_type_0":
        bad = ref.standard_record(0, draw(small_values))
    else:
        bad = ref.extended_record(0, draw(small_values))
    return head + bad + after


@st.composite
def out_of_range_payload(draw: st.DrawFn, domain: ref.Domain) -> bytes:
    good = draw(st.lists(record(in_range_types(domain)), max_size=3))
    bad = draw(st.lists(out_of_range_record(domain), min_size=1, max_size=2))
    return b"".join(draw(st.permutations(good + bad)))


@st.composite
def header_fields(draw: st.DrawFn) -> dict[str, int]:
    """The fields the relay must treat as opaque."""
    return {
        "source": draw(st.integers(0, 255)),
        "flags": draw(st.integers(0, 255)),
        "sequence": draw(st.integers(0, 2**64 - 1)),
        "timestamp_ns": draw(st.integers(0, 2**64 - 1)),
    }


def _other_than(*values: int) -> st.SearchStrategy[int]:
    return st.integers(0, 255).filter(lambda v: v not in values)


@st.composite
def control_payload(draw: st.DrawFn, kinds: Iterable[int] = tuple(ref.CONTROL_RECORDS)) -> bytes:
    """One to three control records of ``kinds`` (every kind unless told), standard or extended."""
    chosen = draw(st.lists(st.sampled_from(sorted(kinds)), min_size=1, max_size=3))
    encode = draw(st.sampled_from([ref.standard_record, ref.extended_record]))
    values = [
        draw(st.binary(min_size=n, max_size=n)) for n in (draw(st.sampled_from(ref.CONTROL_RECORDS[t])) for t in chosen)
    ]
    return b"".join(encode(t, value) for t, value in zip(chosen, values, strict=True))


@st.composite
def malformed_control_payload(draw: st.DrawFn) -> bytes:
    """What a relay must count as ``malformed_tlv`` in a system-domain message."""
    kinds = [
        "empty",
        "bitmap_length",
        "unsubscribe_value",
        "publish_only_value",
        "positions_length",
        "other_type",
        "broken_records",
    ]
    kind = draw(st.sampled_from(kinds))
    good = draw(control_payload())
    if kind == "empty":
        return b""
    if kind == "bitmap_length":
        tlv_type = draw(st.sampled_from([100, 101]))
        bad = ref.standard_record(tlv_type, draw(st.binary(max_size=40).filter(lambda v: len(v) != 32)))
    elif kind == "unsubscribe_value":
        bad = ref.standard_record(102, draw(st.binary(min_size=1, max_size=8)))
    elif kind == "publish_only_value":
        bad = ref.standard_record(ref.PUBLISH_ONLY, draw(st.binary(min_size=1, max_size=8)))
    elif kind == "positions_length":
        bad = ref.standard_record(104, draw(st.binary(min_size=1, max_size=40).filter(lambda v: len(v) != 24)))
    elif kind == "other_type":
        bad = ref.standard_record(draw(_other_than(0, *ref.CONTROL_RECORDS, 255)), draw(st.binary(max_size=8)))
    else:
        return good + draw(malformed_payload(ref.DOMAINS["market_data"]))
    return b"".join(draw(st.permutations([good, bad])))


@st.composite
def judged_message(draw: st.DrawFn, domain: ref.Domain, kind: str) -> bytes:
    """A message a relay of ``domain`` should give the verdict ``expected_verdict(domain, kind)``."""
    fields = draw(header_fields())
    d = domain.ident
    data_version = st.sampled_from(domain.versions)
    if kind == "forward":
        return ref.message(d, draw(valid_payload(domain)), version=draw(data_version), **fields)
    if kind == "empty":
        return ref.message(d, b"", version=draw(data_version), **fields)
    if kind == "bad_version":
        # A bad version wins over every later check.
        target = draw(st.sampled_from([d, draw(_other_than(d))]))
        payload = draw(st.one_of(any_payload(domain), malformed_payload(domain)))
        checksum = draw(st.none() | st.integers(0, 2**32 - 1))
        return ref.message(target, payload, version=draw(_other_than(*domain.versions)), checksum=checksum, **fields)
    if kind == "wrong_domain":
        payload = draw(st.one_of(any_payload(domain), malformed_payload(domain)))
        checksum = draw(st.none() | st.integers(0, 2**32 - 1))
        target = draw(_other_than(d, ref.CONTROL_DOMAIN))
        return ref.message(target, payload, version=draw(data_version), checksum=checksum, **fields)
    if kind == "malformed_tlv":
        checksum = draw(st.none() | st.integers(0, 2**32 - 1))
        return ref.message(d, draw(malformed_payload(domain)), checksum=checksum, **fields)
    if kind == "tlv_out_of_range":
        checksum = draw(st.none() | st.integers(0, 2**32 - 1))
        return ref.message(d, draw(out_of_range_payload(domain)), checksum=checksum, **fields)
    if kind in ("bad_checksum", "zero_checksum"):
        good = ref.message(d, draw(valid_payload(domain)), version=draw(data_version), **fields)
        if ref.expected_checksum(good) == 0:  # one message in four billion: its zero is right, not "not computed"
            return good
        right = ref.expected_checksum(good)
        wrong = 0 if kind == "zero_checksum" else draw(st.integers(1, 2**32 - 1).filter(lambda w: w != right))
        return good[:28] + wrong.to_bytes(4, "little") + good[32:]
    if kind == "control":
        return ref.message(ref.CONTROL_DOMAIN, draw(control_payload()), version=ref.CONTROL_VERSION, **fields)
    if kind == "malformed_control":
        checksum = draw(st.none() | st.integers(0, 2**32 - 1))
        payload = draw(malformed_control_payload())
        return ref.message(ref.CONTROL_DOMAIN, payload, version=ref.CONTROL_VERSION, checksum=checksum, **fields)
    raise ValueError(kind)


@st.composite
def random_message(draw: st.DrawFn, domain: ref.Domain) -> bytes:
    """Header fields and payload loosely drawn; the reference decides the verdict."""
    version = draw(st.sampled_from([1, 2, 2, draw(st.integers(0, 255))]))
    target = draw(st.sampled_from([domain.ident, domain.ident, ref.CONTROL_DOMAIN, draw(st.integers(0, 255))]))
    checksum = draw(st.none() | st.integers(0, 2**32 - 1))
    return ref.message(target, draw(any_payload(domain)), version=version, checksum=checksum)


def any_message(domain: ref.Domain) -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(KINDS).flatmap(lambda k: judged_message(domain, k)), random_message(domain))


@st.composite
def tail(draw: st.DrawFn, domain: ref.Domain, max_payload: int) -> bytes:
    """What may end a stream: nothing, garbage, a partial message, or a fault followed by anything."""
    kind = draw(st.sampled_from(["none", "short_garbage", "partial", "bad_magic", "oversize"]))
    if kind == "none":
        return b""
    if kind == "short_garbage":
        return draw(st.binary(max_size=3))
    if kind == "partial":
        whole = draw(any_message(domain))
        return whole[: draw(st.integers(0, len(whole) - 1))]
    garbage = draw(st.binary(max_size=64))
    if kind == "bad_magic":
        magic = draw(st.binary(min_size=4, max_size=4).filter(lambda m: m != ref.MAGIC_WIRE))
        return magic + garbage
    size = draw(st.integers(max_payload + 1, 2**32 - 1))
    header = ref.message(domain.ident, b"", payload_size=size, **draw(header_fields()))
    return header + garbage


@st.composite
def stream(draw: st.DrawFn, domain: ref.Domain, max_payload: int, max_messages: int = 12) -> bytes:
    body = draw(st.lists(any_message(domain), max_size=max_messages))
    return b"".join(body) + draw(tail(domain, max_payload))


@st.composite
def magic_rich_bytes(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes that often carry the magic and small payload sizes, so the scan gets past the first header."""
    parts = draw(
        st.lists(
            st.one_of(
                st.binary(max_size=48),
                st.tuples(st.binary(min_size=20, max_size=20), st.integers(0, 48), st.binary(max_size=60)).map(
                    lambda t: ref.MAGIC_WIRE + t[0] + t[1].to_bytes(4, "little") + t[2]
                ),
            ),
            max_size=8,
        )
    )
    return b"".join(parts)
