"""Messages as Torq (dawsh2/Torq on GitHub) puts them on the wire, byte for byte.

Written from Torq's own struct layouts and builders, with ``struct`` and ``zlib`` only. It must not use
jitrelay's encoder: it is the independent witness the per-relay byte-for-byte tests compare against.

Where Torq's builders come from (paths in dawsh2/Torq):

- header: ``MessageHeader`` in ``libs/types/src/protocol/message/header.rs`` (``#[repr(C)]``, 32 bytes:
  magic u32, relay_domain u8, version u8, source u8, flags u8, sequence u64, timestamp u64,
  payload_size u32, checksum u32, all little-endian);
- fast path: ``TLVMessageBuilder::build_direct_into_buffer`` / ``build_message_direct`` in
  ``libs/codec/src/builder.rs``: one TLV, version 1, flags 0, checksum 0, the standard record for values up
  to 255 bytes and the extended one (255, 0, type, len u16) above;
- checksummed path: ``TLVMessageBuilder::build`` (same file): the header of ``MessageHeader::new`` (version
  ``PROTOCOL_VERSION`` = 1, flags 0, sequence 0 unless ``with_sequence``), records in order, standard up to
  255 bytes and extended above, then ``MessageHeader::calculate_checksum``: CRC-32 (``crc32fast``, the IEEE
  polynomial, identical to ``zlib.crc32``) of header bytes 0..27, then bytes 32..32 (the slice "after the
  checksum, up to the header's end", which is empty), then the payload. That is exactly PROTOCOL.md's
  definition. Torq's parser (``parse_header`` in ``libs/codec/src/parser.rs``) verifies the same bytes.

Relay domain numbers are the codec's and the relays' (``libs/codec/src/protocol/relay_domain.rs``:
1 market data, 2 signal, 3 execution, 4 system; the relay configs in
``libs/messaging/relays/config/environments/*/*.toml`` agree). ``libs/types/src/protocol/constants.rs`` has
a second, 0-based ``RelayDomain`` (0 market data, 1 signal, 2 execution, 3 system), and it is the one
``libs/codec/src/builder.rs`` imports (``use types::{RelayDomain, SourceType}``) and the services pass:
see ``OUT_OF_CONTRACT`` for what that puts on the wire.

Source bytes are the codec's ``SourceType`` (``libs/codec/src/protocol/source_type.rs``), the enum that
sits beside the 1-based ``RelayDomain``. ``libs/types/src/protocol/constants.rs`` numbers sources
differently (``TYPES_SOURCE``); the relays never read the byte.
"""

from __future__ import annotations

import struct
import zlib

MAGIC = 0xDEADBEEF
PROTOCOL_VERSION = 1  # libs/types/src/protocol/constants.rs and libs/codec/src/protocol_constants.rs
HEADER = struct.Struct("<IBBBBQQII")  # MessageHeader, libs/types/src/protocol/message/header.rs
HEADER_SIZE = HEADER.size
CHECKSUM_OFFSET = 28

# libs/codec/src/protocol/relay_domain.rs (enum RelayDomain, 1-based): what Torq's relays compare
# header.relay_domain with. libs/types/src/protocol/constants.rs numbers the same domains 0..3.
MARKET_DATA, SIGNAL, EXECUTION, SYSTEM = 1, 2, 3, 4
DOMAIN_IDS = {"market_data": MARKET_DATA, "signal": SIGNAL, "execution": EXECUTION, "system": SYSTEM}
TYPES_DOMAIN = {"market_data": 0, "signal": 1, "execution": 2, "system": 3}

# libs/codec/src/protocol/source_type.rs (enum SourceType)
SOURCE = {
    "binance_collector": 1,
    "kraken_collector": 2,
    "coinbase_collector": 3,
    "polygon_collector": 4,
    "gemini_collector": 5,
    "arbitrage_strategy": 20,
    "market_maker": 21,
    "trend_follower": 22,
    "kraken_signal_strategy": 23,
    "portfolio_manager": 40,
    "risk_manager": 41,
    "execution_engine": 42,
    "dashboard": 60,
    "metrics_collector": 61,
    "state_manager": 62,
    "market_data_relay": 80,
    "signal_relay": 81,
    "execution_relay": 82,
}
# libs/types/src/protocol/constants.rs (enum SourceType): the other numbering
TYPES_SOURCE = {
    "unknown": 0,
    "binance_collector": 1,
    "coinbase_collector": 2,
    "kraken_collector": 3,
    "polygon_collector": 4,
    "gemini_collector": 5,
    "arbitrage_strategy": 10,
    "state_manager": 15,
    "execution_engine": 20,
    "dashboard": 30,
    "test_client": 99,
}

# libs/types/src/protocol/identifiers/instrument/venues.rs (enum VenueId, enum AssetType)
VENUE_KRAKEN = 101
VENUE_POLYGON = 202
VENUE_QUICKSWAP = 400
VENUE_SUSHISWAP_POLYGON = 401
ASSET_COIN = 51

# Fixed, realistic values shared by the fixtures (nanoseconds since the epoch, 2024-09-10).
T0 = 1_725_960_000_123_456_789


def symbol_to_u64(symbol: str) -> int:
    """``symbol_to_u64`` of libs/types/src/protocol/identifiers/instrument/core.rs: up to 8 bytes, big-endian."""
    return int.from_bytes(symbol.encode()[:8].ljust(8, b"\0"), "big")


def address(hex_: str) -> bytes:
    """A 20-byte EVM address from hex."""
    raw = bytes.fromhex(hex_.removeprefix("0x"))
    assert len(raw) == 20
    return raw


# ---------------------------------------------------------------------------------------------------------
# Framing: records, header, checksum (libs/codec/src/builder.rs, libs/types/src/protocol/message/header.rs)


def record(tlv_type: int, value: bytes) -> bytes:
    """One TLV record as ``TLVMessageBuilder`` writes it: ``type, len8, value`` up to 255 bytes of value,
    above that ``255, 0, type, len16 LE, value`` (libs/codec/src/builder.rs, ``TLVData::Extended``)."""
    if len(value) <= 255:
        return bytes((tlv_type, len(value))) + value
    return bytes((255, 0, tlv_type)) + struct.pack("<H", len(value)) + value


def header(
    domain: int,
    source: int,
    payload_size: int,
    *,
    sequence: int,
    timestamp_ns: int,
    checksum: int = 0,
    version: int = PROTOCOL_VERSION,
    flags: int = 0,
) -> bytes:
    """``MessageHeader`` (libs/types/src/protocol/message/header.rs), ``#[repr(C)]``, 32 bytes, no padding."""
    return HEADER.pack(MAGIC, domain, version, source, flags, sequence, timestamp_ns, payload_size, checksum)


def torq_checksum(message: bytes) -> int:
    """``MessageHeader::calculate_checksum``: CRC-32 of bytes 0..27, bytes 32..32 (empty), then the payload."""
    return zlib.crc32(message[:CHECKSUM_OFFSET] + message[CHECKSUM_OFFSET + 4 : HEADER_SIZE] + message[HEADER_SIZE:])


def build_direct(domain: int, source: int, tlv_type: int, value: bytes, *, sequence: int, timestamp_ns: int) -> bytes:
    """``TLVMessageBuilder::build_direct_into_buffer`` (libs/codec/src/builder.rs): one record, version 1,
    flags 0, checksum 0 ("TODO: Calculate if needed"). Torq takes the sequence from a process-wide counter
    starting at 1 and the timestamp from the clock; the fixtures fix both."""
    payload = record(tlv_type, value)
    return header(domain, source, len(payload), sequence=sequence, timestamp_ns=timestamp_ns) + payload


def build_checksummed(
    domain: int, source: int, records: list[tuple[int, bytes]], *, sequence: int, timestamp_ns: int
) -> bytes:
    """``TLVMessageBuilder::build`` (libs/codec/src/builder.rs): header of ``MessageHeader::new`` (version 1,
    flags 0), the records in order, then the checksum of ``MessageHeader::calculate_checksum``."""
    payload = b"".join(record(t, v) for t, v in records)
    unsigned = header(domain, source, len(payload), sequence=sequence, timestamp_ns=timestamp_ns) + payload
    return unsigned[:CHECKSUM_OFFSET] + struct.pack("<I", torq_checksum(unsigned)) + unsigned[HEADER_SIZE:]


# ---------------------------------------------------------------------------------------------------------
# Values: Torq's struct layouts. ``define_tlv!`` (libs/types/src/protocol/tlv/macros.rs) emits #[repr(C)]
# structs with the fields in the order written (u64 group, u32, u16, u8, special), so with Rust's C layout
# the byte offsets below follow from the declared order plus natural alignment; packed structs say so.

# TradeTLV, libs/types/src/protocol/tlv/market_data.rs, #[repr(C)] via define_tlv!, 40 bytes:
# asset_id u64 @0, price i64 @8, volume i64 @16, execution_timestamp_ns u64 @24, venue_id u16 @32,
# asset_type u8 @34, reserved u8 @35, side u8 @36 (0 buy, 1 sell), _padding [u8; 3] @37.
TRADE = struct.Struct("<QqqQHBBB3x")
# QuoteTLV, same file, #[repr(C)] via define_tlv!, 56 bytes (the registry says 52, see tlv_types.py):
# asset_id u64 @0, bid_price i64 @8, bid_size i64 @16, ask_price i64 @24, ask_size i64 @32,
# quote_timestamp_ns u64 @40, venue_id u16 @48, asset_type u8 @50, reserved u8 @51, _padding [u8; 4] @52.
QUOTE = struct.Struct("<QqqqqQHBB4x")
# ArbitrageSignalTLV, libs/types/src/protocol/tlv/arbitrage_signal.rs, #[repr(C, packed)], 170 bytes.
ARBITRAGE_SIGNAL = struct.Struct("<HQI20s20sHH20s20sqqHqqqqHIIH2sQ")
# OrderLevel (market_data.rs, #[repr(C)], 24 bytes): price i64, size i64, order_count u32, reserved u32.
ORDER_LEVEL = struct.Struct("<qqII")
MAX_ORDER_LEVELS = 50  # libs/types/src/protocol/tlv/dynamic_payload.rs
# OrderBookTLV (market_data.rs, #[repr(C)] via define_tlv!): snapshot_timestamp_ns u64 @0, sequence u64 @8,
# precision_factor i64 @16, asset_id u64 @24, venue_id u16 @32, asset_type u8 @34, reserved u8 @35, then
# bids and asks, each a FixedVec<OrderLevel, 50> (dynamic_payload.rs, #[repr(C)]: count u16, _padding [u8; 6],
# elements [OrderLevel; 50] = 1208 bytes, 8-aligned). C layout puts bids at 40 (4 padding bytes after
# ``reserved``), asks at 1248, total 2456. The doc comment in market_data.rs says bids @36 and 2452 bytes.
ORDER_BOOK_HEAD = struct.Struct("<QQqQHBB4x")
FIXED_VEC_HEAD = struct.Struct("<H6x")
# PoolInfoTLV, libs/types/src/protocol/tlv/pool_cache.rs, #[repr(C)] via define_tlv!, 88 bytes:
# discovered_at u64, last_seen u64, fee_tier u32, venue u16, tlv_type u8 (200), tlv_length u8 (86),
# token0_decimals u8, token1_decimals u8, pool_type u8, _padding u8, pool_address, token0, token1 [u8; 20].
POOL_INFO = struct.Struct("<QQIHBBBBBx20s20s20s")
# SystemHealthTLV, libs/types/src/protocol/tlv/system.rs, #[repr(C)] via define_tlv!, 48 bytes.
SYSTEM_HEALTH = struct.Struct("<QIIIHHBBBB20x")
# TraceContextTLV, same file, 32 bytes: start_timestamp_ns u64, current_timestamp_ns u64, source_service u8,
# span_depth u8, stage_flags u8, reserved u8, _padding [u8; 4], trace_id [u8; 8].
TRACE_CONTEXT = struct.Struct("<QQBBBB4x8s")
# RecoveryRequestTLV, libs/network/src/recovery/request.rs, #[repr(C)], 24 bytes.
RECOVERY_REQUEST = struct.Struct("<QQII")
# SnapshotTLVHeader, libs/network/src/recovery/snapshot.rs, #[repr(C)], 32 bytes, then the snapshot data.
SNAPSHOT_HEADER = struct.Struct("<QQIIIBBBx")
# StateInvalidationTLV, libs/types/src/protocol/tlv/market_data.rs, #[repr(C)], 224 bytes: sequence u64,
# timestamp_ns u64, instruments FixedVec<InstrumentId, 16> (count u16, _padding [u8; 6], 16 x InstrumentId
# of 12 bytes, #[repr(C, packed)]: asset_id u64, venue u16, asset_type u8, reserved u8) = 200 bytes,
# venue u16, reason u8, _padding [u8; 5].
INSTRUMENT_ID = struct.Struct("<QHBB")
MAX_INSTRUMENTS = 16
STATE_INVALIDATION_TAIL = struct.Struct("<HB5x")

BTC = symbol_to_u64("BTC")
ETH = symbol_to_u64("ETH")


def trade_value() -> bytes:
    """A Kraken BTC/USD trade as ``process_trade_data`` in services/adapters/src/bin/kraken/kraken.rs builds
    it: ``TradeTLV::new(VenueId::Kraken, InstrumentId::coin(VenueId::Kraken, "BTC"), price, volume, side, ts)``
    with 8-decimal fixed point (libs/types/src/protocol/tlv/market_data.rs, TradeTLV)."""
    return TRADE.pack(BTC, 5_734_210_000_000, 2_500_000, T0 - 350_000, VENUE_KRAKEN, ASSET_COIN, 0, 1)


def quote_value() -> bytes:
    """Kraken's top of book as ``process_book_data`` (kraken.rs) builds it, ``QuoteTLV::new`` (market_data.rs)."""
    return QUOTE.pack(
        ETH, 236_712_000_000, 1_000_000, 236_714_000_000, 1_000_000, T0 + 1_000, VENUE_KRAKEN, ASSET_COIN, 0
    )


def trade_direct() -> bytes:
    """TradeTLV (type 1, 40 bytes) through ``build_message_direct`` (libs/codec/src/builder.rs): market data
    domain, source KrakenCollector, version 1, checksum 0. Layout: TradeTLV in
    libs/types/src/protocol/tlv/market_data.rs."""
    return build_direct(MARKET_DATA, SOURCE["kraken_collector"], 1, trade_value(), sequence=1_042, timestamp_ns=T0)


def quote_direct() -> bytes:
    """QuoteTLV (type 2) through ``build_message_direct``, checksum 0. The value is 56 bytes, the size of
    the #[repr(C)] QuoteTLV (libs/types/src/protocol/tlv/market_data.rs), which is what the direct path writes;
    the registry (``TLVType::size_constraint``, libs/types/src/protocol/tlv/types.rs) and a unit test say 52."""
    return build_direct(
        MARKET_DATA, SOURCE["kraken_collector"], 2, quote_value(), sequence=1_043, timestamp_ns=T0 + 2_000
    )


def trade_checksummed() -> bytes:
    """The same trade through ``TLVMessageBuilder::new(..).add_tlv(TLVType::Trade, &trade).with_sequence(..)
    .build()`` (libs/codec/src/builder.rs): version 1, checksum = CRC-32 of header bytes 0..27 and the payload
    (``MessageHeader::calculate_checksum``, libs/types/src/protocol/message/header.rs)."""
    return build_checksummed(
        MARKET_DATA, SOURCE["kraken_collector"], [(1, trade_value())], sequence=1_044, timestamp_ns=T0 + 3_000
    )


def arbitrage_signal_value() -> bytes:
    """``ArbitrageSignalTLV::from_fixed_point`` (libs/types/src/protocol/tlv/arbitrage_signal.rs) as the
    flash-arbitrage strategy calls it in services/strategies/flash_arbitrage/src/signal_output.rs: strategy 21,
    signal_id = timestamp, chain 137, QuickSwap -> SushiSwap on Polygon, fees 0.6 % and slippage 0.1 % of
    capital, net = expected - fees - gas - slippage, slippage tolerance 50 bps, max gas 100 gwei, valid for
    300 s, priority = spread_bps * 10."""
    ts = T0 + 10_000
    capital = 5_000 * 100_000_000
    expected = 4_210_000_000  # $42.10
    fees = capital * 6 // 1000
    gas = 12_000_000  # $0.12
    slippage = capital // 1000
    spread_bps = 145
    return ARBITRAGE_SIGNAL.pack(
        21,
        ts,
        137,
        address("0x6e7a5FAFcec6BB1e78bAE2A1F0B612012BF14827"),  # source pool
        address("0xcd353F79d9FADe311fC3119B841e1f456b54e858"),  # target pool
        VENUE_QUICKSWAP,
        VENUE_SUSHISWAP_POLYGON,
        address("0x0d500B1d8E8eF31E21C99d1Db9A6444d3ADf1270"),  # WMATIC
        address("0x2791Bca1f2de4661ED88A30C99A7a9449Aa84174"),  # USDC.e
        expected,
        capital,
        spread_bps,
        fees,
        gas,
        slippage,
        expected - fees - gas - slippage,
        50,
        100,
        ts // 1_000_000_000 + 300,
        spread_bps * 10,
        b"\0\0",
        ts,
    )


def arbitrage_signal() -> bytes:
    """ArbitrageSignal (type 32, 170 bytes) as signal_output.rs sends it: ``build_message_direct(Signal,
    ArbitrageStrategy, TLVType::ArbitrageSignal, &tlv)``: signal domain (2), checksum 0."""
    return build_direct(
        SIGNAL, SOURCE["arbitrage_strategy"], 32, arbitrage_signal_value(), sequence=77, timestamp_ns=T0 + 11_000
    )


def order_request_value() -> bytes:
    """32 bytes, the size ``TLVType::size_constraint`` gives OrderRequest (types.rs). Torq defines no wire
    struct for it; the fixture packs the fixed-width fields of ``OrderRequest`` in libs/types/src/messages.rs in
    its order: order_id u64, instrument_id u64, quantity u64, price i64 (8-decimal). Side, order type and
    timestamp (serde enums / the header's) are left out to fit the 32 bytes."""
    return struct.pack("<QQQq", 900_001, BTC, 10_000_000, 5_733_000_000_000)


def order_request() -> bytes:
    """OrderRequest (type 40) on the execution domain (3) through ``TLVMessageBuilder::build``, checksummed:
    Torq's execution relay config (libs/messaging/relays/config/environments/*/execution.toml) requires
    checksums (``checksum = true``, ``strict = true``)."""
    return build_checksummed(
        EXECUTION, SOURCE["portfolio_manager"], [(40, order_request_value())], sequence=5, timestamp_ns=T0 + 20_000
    )


def fixed_vec(elements: list[bytes], capacity: int, element_size: int) -> bytes:
    """``FixedVec<T, N>`` (libs/types/src/protocol/tlv/dynamic_payload.rs): count u16, 6 padding bytes,
    then N elements, the unused ones zeroed."""
    return FIXED_VEC_HEAD.pack(len(elements)) + b"".join(elements) + bytes(element_size * (capacity - len(elements)))


def order_book_value() -> bytes:
    """OrderBookTLV (libs/types/src/protocol/tlv/market_data.rs), 2456 bytes: 5 levels a side of a Kraken
    BTC book, 8-decimal precision factor, the rest of each FixedVec zeroed."""
    bids = [
        ORDER_LEVEL.pack(5_734_200_000_000 - i * 10_000_000, 30_000_000 + i * 1_000_000, 3 + i, 0) for i in range(5)
    ]
    asks = [
        ORDER_LEVEL.pack(5_734_220_000_000 + i * 10_000_000, 25_000_000 + i * 1_000_000, 2 + i, 0) for i in range(5)
    ]
    head = ORDER_BOOK_HEAD.pack(T0 + 30_000, 88_001, 100_000_000, BTC, VENUE_KRAKEN, ASSET_COIN, 0)
    return (
        head + fixed_vec(bids, MAX_ORDER_LEVELS, ORDER_LEVEL.size) + fixed_vec(asks, MAX_ORDER_LEVELS, ORDER_LEVEL.size)
    )


def order_book_extended() -> bytes:
    """OrderBook (type 3) through ``build_message_direct``: its 2456-byte value exceeds 255, so the builder
    writes the extended record ``255, 0, 3, len16`` (libs/codec/src/builder.rs); checksum 0."""
    return build_direct(
        MARKET_DATA, SOURCE["kraken_collector"], 3, order_book_value(), sequence=1_045, timestamp_ns=T0 + 31_000
    )


def pool_info_value() -> bytes:
    """PoolInfoTLV (libs/types/src/protocol/tlv/pool_cache.rs, vendor type 200, 88 bytes), as
    ``PoolInfoTLV::from_config`` fills it: its own tlv_type 200 and tlv_length SIZE - 2 = 86 inside."""
    return POOL_INFO.pack(
        1_725_000_000,
        1_725_960_000,
        30,
        VENUE_QUICKSWAP,
        200,
        86,
        18,
        6,
        3,  # CachePoolType::QuickSwapV2
        address("0x6e7a5FAFcec6BB1e78bAE2A1F0B612012BF14827"),
        address("0x0d500B1d8E8eF31E21C99d1Db9A6444d3ADf1270"),
        address("0x2791Bca1f2de4661ED88A30C99A7a9449Aa84174"),
    )


def vendor_record() -> bytes:
    """A vendor type 200 record as ``VendorTLVBuilder::new(RelayDomain::Signal, SourceType::ArbitrageStrategy)
    .add_vendor_tlv(200, &data).build()`` writes it (libs/codec/src/builder.rs; the domain and source are those
    of Torq's own test, libs/codec/tests/message_builder_integration.rs): signal domain, checksummed, a
    standard record since the value is under 256 bytes."""
    return build_checksummed(
        SIGNAL, SOURCE["arbitrage_strategy"], [(200, pool_info_value())], sequence=78, timestamp_ns=T0 + 40_000
    )


def heartbeat_only() -> bytes:
    """A header-only message: ``TLVMessageBuilder::new(MarketData, BinanceCollector).with_sequence(999).build()``
    with no records (Torq's test_empty_message_workflow, libs/codec/tests/message_builder_integration.rs):
    payload_size 0, the checksum that of the 28 header bytes."""
    return build_checksummed(MARKET_DATA, SOURCE["binance_collector"], [], sequence=999, timestamp_ns=T0 + 50_000)


def identification_header() -> bytes:
    """What ``RelayOutput::connect_with_retry`` (services/adapters/src/output/relay_output.rs) writes first on
    every connection, "to be classified as publisher": magic, relay_domain 0x01 (market data, hard-coded, even
    when the RelayOutput serves the signal or execution relay), version 1, source 0x02 (commented
    "PolygonCollector", but 2 is KrakenCollector in the codec's SourceType and CoinbaseCollector in libs/types';
    PolygonCollector is 4 in both), flags 0, sequence 0, timestamp 0, payload_size 0, checksum 0."""
    return bytes.fromhex("efbeadde01010200") + bytes(24)


# ---------------------------------------------------------------------------------------------------------
# System domain (4): one message per system TLV, 100-112 (libs/types/src/protocol/tlv/types.rs).

# ``TLVType::size_constraint`` (types.rs) for the system types, as Torq writes it: ``Fixed(n)`` or
# ``Bounded { min, max }``; ``SYSTEM_SIZE_BOUNDS`` gives both as (min, max), equal for fixed sizes.
SYSTEM_FIXED_SIZES: dict[int, int] = {100: 16, 105: 64, 107: 48, 110: 24}
SYSTEM_BOUNDED_SIZES: dict[int, tuple[int, int]] = {
    101: (32, 1024),
    102: (16, 512),
    103: (20, 2048),
    104: (24, 512),
    106: (16, 512),
    108: (32, 256),
    111: (20, 1024),
    112: (16, 256),
}
SYSTEM_SIZE_BOUNDS: dict[int, tuple[int, int]] = dict(
    sorted({**{t: (n, n) for t, n in SYSTEM_FIXED_SIZES.items()}, **SYSTEM_BOUNDED_SIZES}.items())
)


def _snapshot_value() -> bytes:
    """SnapshotTLVHeader (libs/network/src/recovery/snapshot.rs) and 16 bytes of uncompressed data."""
    data = b"pool-state:v2\0\0\0"
    head = SNAPSHOT_HEADER.pack(1_044, T0 + 60_000, 7, zlib.crc32(data), len(data), 101, SNAPSHOT_HEADER.size, 0)
    return head + data


def _state_invalidation_value() -> bytes:
    """StateInvalidationTLV (market_data.rs) as services/adapters/src/input/state_manager.rs fills it: Kraken,
    two instruments, reason Disconnection (0)."""
    ids = [INSTRUMENT_ID.pack(s, VENUE_KRAKEN, ASSET_COIN, 0) for s in (BTC, ETH)]
    return (
        struct.pack("<QQ", 1_046, T0 + 70_000)
        + fixed_vec(ids, MAX_INSTRUMENTS, INSTRUMENT_ID.size)
        + STATE_INVALIDATION_TAIL.pack(VENUE_KRAKEN, 0)
    )


def _system_value(type_: int) -> bytes:
    """The value of system TLV ``type_``. Types with a Torq struct use it (snapshot, state invalidation,
    system health, trace context, recovery request); the others have only a registry size in Torq, so the
    fixture fills that many bytes with plausible little-endian fields of its own choosing (said per type)."""
    if type_ == 100:  # Heartbeat, Fixed(16), no struct: timestamp_ns u64, uptime_s u64
        return struct.pack("<QQ", T0 + 80_000, 86_400)
    if type_ == 101:
        return _snapshot_value()
    if type_ == 102:  # Error, min 16, no struct: code u32, source u8, 3 zero bytes, timestamp_ns u64
        return struct.pack("<IB3xQ", 1_001, SOURCE["kraken_collector"], T0 + 81_000)
    if type_ == 103:  # ConfigUpdate, min 20, no struct: config_id u32, version u64, timestamp_ns u64
        return struct.pack("<IQQ", 12, 3, T0 + 82_000)
    if type_ == 104:  # ServiceDiscovery, min 24, no struct: source u8, 7 zero bytes, instance u64, timestamp u64
        return struct.pack("<B7xQQ", SOURCE["execution_engine"], 1, T0 + 83_000)
    if type_ == 105:  # ResourceUsage, Fixed(64), no struct: timestamp, rss, vsz, cpu_ns, 4 zero u64
        return struct.pack("<QQQQ32x", T0 + 84_000, 210_000_000, 1_400_000_000, 9_300_000_000)
    if type_ == 106:
        return _state_invalidation_value()
    if type_ == 107:  # SystemHealthTLV (system.rs): healthy service at 12 % CPU, 34 % memory
        return SYSTEM_HEALTH.pack(T0 + 85_000, 17, 48_000, 0, 0, 31, SOURCE["metrics_collector"], 0, 12, 34)
    if type_ == 108:  # TraceContextTLV (system.rs): collected and relayed, depth 1
        return TRACE_CONTEXT.pack(T0 + 86_000, T0 + 86_250, SOURCE["kraken_collector"], 1, 0x03, 0, b"\x15" * 8)
    if type_ == 110:  # RecoveryRequestTLV (libs/network/src/recovery/request.rs): retransmit 1040..1046
        return RECOVERY_REQUEST.pack(1_040, 1_046, 3, 1)
    if type_ == 111:  # RecoveryResponse, min 20, no struct: consumer u32, first u64, last u64
        return struct.pack("<IQQ", 3, 1_041, 1_045)
    if type_ == 112:  # SequenceSync, min 16, no struct: sequence u64, timestamp_ns u64
        return struct.pack("<QQ", 1_046, T0 + 87_000)
    raise KeyError(f"not a Torq system TLV: {type_}")


SYSTEM_TLVS: tuple[int, ...] = tuple(SYSTEM_SIZE_BOUNDS)


def system_tlv(type_: int) -> bytes:
    """One system-domain (4) message carrying TLV ``type_`` (100-112). RecoveryRequest goes through
    ``build_message_direct`` (checksum 0), as ``RecoveryRequestBuilder`` (libs/network/src/recovery/request.rs)
    sends it; the others through ``TLVMessageBuilder::build``, checksummed. Torq has no system relay, so the
    domain is the codec's ``RelayDomain::System`` = 4 (libs/codec/src/protocol/relay_domain.rs)."""
    value = _system_value(type_)
    seq, ts = 2_000 + type_, T0 + 100_000 + type_
    if type_ == 110:
        return build_direct(SYSTEM, SOURCE["dashboard"], type_, value, sequence=seq, timestamp_ns=ts)
    return build_checksummed(SYSTEM, SOURCE["metrics_collector"], [(type_, value)], sequence=seq, timestamp_ns=ts)


# ---------------------------------------------------------------------------------------------------------

FIXTURES: dict[str, tuple[str, bytes]] = {
    "trade_direct": ("market_data", trade_direct()),
    "quote_direct": ("market_data", quote_direct()),
    "trade_checksummed": ("market_data", trade_checksummed()),
    "arbitrage_signal": ("signal", arbitrage_signal()),
    "order_request": ("execution", order_request()),
    "order_book_extended": ("market_data", order_book_extended()),
    "vendor_record": ("signal", vendor_record()),
    "heartbeat_only": ("market_data", heartbeat_only()),
    "identification_header": ("market_data", identification_header()),
    **{f"system_{t}": ("system", system_tlv(t)) for t in SYSTEM_TLVS},
}
"""name -> (relay domain name, message): every message a relay of that domain must forward unchanged."""


def trade_direct_libs_types_enums() -> bytes:
    """What services/adapters/src/bin/kraken/kraken.rs compiles to today: it passes libs/types'
    ``RelayDomain::MarketData`` (0) and ``SourceType::KrakenCollector`` (3) to ``build_message_direct``, whose
    signature takes those types (libs/codec/src/builder.rs). Torq's own relays compare the domain byte with the
    codec's ``RelayDomain::MarketData`` (1) and would drop it."""
    return build_direct(0, TYPES_SOURCE["kraken_collector"], 1, trade_value(), sequence=1_042, timestamp_ns=T0)


def state_invalidation_on_market_data() -> bytes:
    """What services/adapters/src/input/state_manager.rs sends: StateInvalidation (type 106, a system type)
    through ``build_message_direct(RelayDomain::MarketData, SourceType::StateManager, ..)``. Torq's relays
    forward on the header's domain alone, so this reaches market data subscribers; PROTOCOL.md's ranges
    reject it (``tlv_out_of_range``). Built with the codec's numbering (domain 1, StateManager 62)."""
    return build_direct(
        MARKET_DATA, SOURCE["state_manager"], 106, _state_invalidation_value(), sequence=1_046, timestamp_ns=T0
    )


OUT_OF_CONTRACT: dict[str, tuple[str, bytes]] = {
    "trade_direct_libs_types_enums": ("market_data", trade_direct_libs_types_enums()),
    "state_invalidation_on_market_data": ("market_data", state_invalidation_on_market_data()),
}
"""Messages Torq's services can write that PROTOCOL.md does not let through; for deciding, not for forwarding."""
