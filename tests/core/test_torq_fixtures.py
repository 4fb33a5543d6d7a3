"""The Torq fixtures (tests/support/torq.py) are well-formed by PROTOCOL.md, checked without any relay.

These tests read the bytes with ``struct`` and ``zlib`` against PROTOCOL.md, so that a fixture can only be
used to judge jitrelay once it is itself a valid message of the domain it is filed under.
"""

from __future__ import annotations

import struct
import zlib

import pytest
from support import torq

from jitrelay.core.tlv_types import TLV_FIXED_SIZES, TLV_TYPE_NAMES

DOMAINS = {"market_data": 1, "signal": 2, "execution": 3, "system": 4}
# PROTOCOL.md, "Domains"; vendor types 200-254 are accepted in every domain.
RANGES = {1: ((1, 19),), 2: ((20, 39), (60, 79)), 3: ((40, 59),), 4: ((80, 119),)}
VENDOR = (200, 254)


# MessageHeader's fields in order, as ``<IBBBBQQII`` packs them.
HEADER_FIELDS = ("magic", "domain", "version", "source", "flags", "sequence", "timestamp_ns", "payload_size")
HEADER_FIELDS += ("checksum",)


def parse(message: bytes) -> dict[str, int]:
    return dict(zip(HEADER_FIELDS, struct.unpack_from("<IBBBBQQII", message), strict=True))


def records(payload: bytes) -> list[tuple[int, bytes, bool]]:
    """(type, value, extended) of each record; fails unless the records fill the payload exactly."""
    out, i = [], 0
    while i < len(payload):
        assert len(payload) - i >= 2, "truncated record header"
        if payload[i] == 255:
            assert len(payload) - i >= 5 and payload[i + 1] == 0, "bad extended header"
            type_, (length,) = payload[i + 2], struct.unpack_from("<H", payload, i + 3)
            start, extended = i + 5, True
        else:
            type_, length, start, extended = payload[i], payload[i + 1], i + 2, False
        assert start + length <= len(payload), "record overruns the payload"
        out.append((type_, payload[start : start + length], extended))
        i = start + length
    assert i == len(payload)
    return out


def crc(message: bytes) -> int:
    """PROTOCOL.md: zlib.crc32 of header bytes 0..27 followed by the payload."""
    return zlib.crc32(message[:28] + message[32:])


def in_domain(type_: int, domain: int) -> bool:
    return any(lo <= type_ <= hi for lo, hi in (*RANGES[domain], VENDOR))


@pytest.mark.parametrize("name", sorted(torq.FIXTURES))
def test_fixture_is_a_valid_message_of_its_domain(name: str) -> None:
    domain_name, message = torq.FIXTURES[name]
    h = parse(message)
    assert message[:4] == b"\xef\xbe\xad\xde"
    assert h["magic"] == 0xDEADBEEF
    assert h["version"] == 1  # what Torq writes today
    assert h["domain"] == DOMAINS[domain_name]
    assert len(message) == 32 + h["payload_size"]
    recs = records(message[32:])
    for type_, _, _ in recs:
        assert type_ != 0
        assert in_domain(type_, h["domain"]), (name, type_)
        assert type_ in TLV_TYPE_NAMES
    if h["domain"] == DOMAINS["execution"]:
        assert h["checksum"] != 0 and h["checksum"] == crc(message)
    else:
        assert h["checksum"] in (0, crc(message))


@pytest.mark.parametrize("name", sorted(torq.FIXTURES))
def test_fixed_size_types_have_their_fixed_size(name: str) -> None:
    _, message = torq.FIXTURES[name]
    for type_, value, _ in records(message[32:]):
        if type_ in TLV_FIXED_SIZES:
            assert len(value) == TLV_FIXED_SIZES[type_], (name, type_)


def test_torq_checksum_is_protocol_md_crc() -> None:
    for _, message in torq.FIXTURES.values():
        assert torq.torq_checksum(message) == crc(message)


def test_direct_path_writes_version_1_flags_0_checksum_0() -> None:
    for name in ("trade_direct", "quote_direct", "arbitrage_signal", "order_book_extended", "system_110"):
        h = parse(torq.FIXTURES[name][1])
        assert (h["version"], h["flags"], h["checksum"]) == (1, 0, 0), name


def test_checksummed_path_writes_a_nonzero_correct_checksum() -> None:
    for name in ("trade_checksummed", "order_request", "vendor_record", "heartbeat_only", "system_107"):
        message = torq.FIXTURES[name][1]
        assert parse(message)["checksum"] == crc(message) != 0, name


def test_trade_layout() -> None:
    message = torq.trade_direct()
    ((type_, value, extended),) = records(message[32:])
    assert (type_, len(value), extended) == (1, 40, False)
    asset_id, price, volume, ts, venue, asset_type, reserved, side = struct.unpack("<QqqQHBBB3x", value)
    assert asset_id == int.from_bytes(b"BTC\0\0\0\0\0", "big")
    assert (venue, asset_type, reserved, side) == (101, 51, 0, 1)
    assert price > 0 and volume > 0 and ts > 0
    assert value[37:] == bytes(3)
    # The checksummed build carries the very same record.
    assert records(torq.trade_checksummed()[32:]) == records(message[32:])


def test_quote_is_the_56_byte_struct() -> None:
    ((type_, value, _),) = records(torq.quote_direct()[32:])
    assert (type_, len(value)) == (2, 56)
    assert value[52:] == bytes(4)


def test_arbitrage_signal_is_170_packed_bytes_on_the_signal_domain() -> None:
    message = torq.arbitrage_signal()
    assert parse(message)["domain"] == 2
    ((type_, value, extended),) = records(message[32:])
    assert (type_, len(value), extended) == (32, 170, False)
    strategy_id, signal_id, chain_id = struct.unpack_from("<HQI", value)
    assert (strategy_id, chain_id) == (21, 137)
    assert signal_id == struct.unpack_from("<Q", value, 162)[0]  # signal_id is the timestamp


def test_order_book_uses_the_extended_form() -> None:
    message = torq.order_book_extended()
    assert message[32:35] == bytes((255, 0, 3))
    ((type_, value, extended),) = records(message[32:])
    assert (type_, len(value), extended) == (3, 2456, True)
    assert struct.unpack_from("<H", message, 35)[0] == 2456


def test_vendor_record_is_a_standard_type_200_record() -> None:
    message = torq.vendor_record()
    ((type_, value, extended),) = records(message[32:])
    assert (type_, len(value), extended) == (200, 88, False)
    assert value[22:24] == bytes((200, 86))  # PoolInfoTLV's own tlv_type and tlv_length


def test_heartbeat_only_is_a_bare_header() -> None:
    message = torq.heartbeat_only()
    assert len(message) == 32 and parse(message)["payload_size"] == 0


def test_identification_header_is_relay_output_bytes() -> None:
    message = torq.identification_header()
    assert message == bytes([0xEF, 0xBE, 0xAD, 0xDE, 0x01, 0x01, 0x02, 0x00]) + bytes(24)
    h = parse(message)
    assert (h["domain"], h["version"], h["source"], h["payload_size"], h["checksum"]) == (1, 1, 2, 0, 0)


def test_system_tlvs_cover_100_to_112_with_torq_sizes() -> None:
    assert torq.SYSTEM_TLVS == (100, 101, 102, 103, 104, 105, 106, 107, 108, 110, 111, 112)
    for type_ in torq.SYSTEM_TLVS:
        message = torq.system_tlv(type_)
        assert parse(message)["domain"] == 4
        ((got, value, _),) = records(message[32:])
        lo, hi = torq.SYSTEM_SIZE_BOUNDS[type_]
        assert got == type_ and lo <= len(value) <= hi, (type_, len(value))
    assert len(records(torq.system_tlv(106)[32:])[0][1]) == 224  # StateInvalidationTLV


def test_out_of_contract_messages_really_are() -> None:
    zero_based = torq.OUT_OF_CONTRACT["trade_direct_libs_types_enums"][1]
    assert parse(zero_based)["domain"] == 0
    assert zero_based[32:] == torq.trade_direct()[32:]
    invalidation = torq.OUT_OF_CONTRACT["state_invalidation_on_market_data"][1]
    ((type_, _, _),) = records(invalidation[32:])
    assert parse(invalidation)["domain"] == 1 and not in_domain(type_, 1)
