"""Torq's record layouts as numpy structured dtypes, registered by TLV type number.

Each dtype has Torq's field names, in Torq's order, at Torq's offsets, with
Torq's padding named as Torq names it, so ``dtype.itemsize`` is the record's
size on the wire and a record's bytes *are* one element of its dtype. Every
layout cites the file of dawsh2/Torq it is read from (``docs/records.md`` has
the table, ``docs/torq.md`` how the offsets follow from Torq's macros).

Torq's ``define_tlv!`` (``libs/types/src/protocol/tlv/macros.rs``) emits a
``#[repr(C)]`` struct with its field groups in the order u128, u64, u32,
u16, u8, special, so offsets are that order plus natural alignment; every
layout here is written out in that order. numpy has no 128-bit integer:
Torq's ``u128`` fields are two little-endian ``uint64`` words, low word
first (``u128_value`` joins them). Types for which Torq defines only a size
(most execution and risk records) have no layout and stay bytes.

Pure data and numpy only, so that anything can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jitrelay.core.tlv_types import TLV_TYPE_NAMES

MAX_STANDARD_VALUE = 255  # a record longer than this is always written in the extended form

_U128 = ("<u8", (2,))  # Torq's u128: low word, high word
_ADDRESS = ("u1", (20,))  # an Ethereum address
_ADDRESS_PADDING = ("u1", (12,))

# libs/types/src/protocol/tlv/market_data.rs (OrderLevel, #[repr(C)]): 24 bytes.
ORDER_LEVEL = np.dtype([("price", "<i8"), ("size", "<i8"), ("order_count", "<u4"), ("reserved", "<u4")])
MAX_ORDER_LEVELS = 50  # libs/types/src/protocol/tlv/dynamic_payload.rs (MAX_ORDER_LEVELS)
MAX_INSTRUMENTS = 16  # the same file (MAX_INSTRUMENTS)
# libs/types/src/protocol/tlv/dynamic_payload.rs (FixedVec<T, N>: count u16, _padding [u8; 6], elements [T; N]).
ORDER_LEVELS = np.dtype([("count", "<u2"), ("_padding", "u1", (6,)), ("elements", ORDER_LEVEL, (MAX_ORDER_LEVELS,))])
# libs/types/src/protocol/identifiers/instrument/core.rs (InstrumentId, #[repr(C, packed)]): 12 bytes.
INSTRUMENT_ID = np.dtype([("asset_id", "<u8"), ("venue", "<u2"), ("asset_type", "u1"), ("reserved", "u1")])
INSTRUMENTS = np.dtype([("count", "<u2"), ("_padding", "u1", (6,)), ("elements", INSTRUMENT_ID, (MAX_INSTRUMENTS,))])


@dataclass(frozen=True)
class RecordLayout:
    """One record type Torq gives a layout: its number, names, dtype and where Torq defines it."""

    tlv_type: int
    name: str  # Torq's ``TLVType`` variant in snake case, as ``tlv_types`` names it
    struct: str  # Torq's struct name
    dtype: np.dtype
    source: str  # the file of dawsh2/Torq the layout is read from
    fixed_point: tuple[str, ...] = ()  # fields holding decimals as integers scaled by 10**8

    @property
    def size(self) -> int:
        """The value's length on the wire."""
        return int(self.dtype.itemsize)

    @property
    def extended(self) -> bool:
        """Whether the record is always written in the extended form (a value over 255 bytes)."""
        return self.size > MAX_STANDARD_VALUE


def _padded_address(name: str, padding: str) -> tuple[tuple, tuple]:
    """An Ethereum address field and the 12 bytes Torq pads it with to 32 (``EthAddress``, ``AddressPadding``)."""
    return (name, *_ADDRESS), (padding, *_ADDRESS_PADDING)


def _packed(fields: list) -> np.dtype:
    """A dtype with no gaps: each field right after the one before, as Torq's explicit padding makes them."""
    return np.dtype(fields)


_MARKET_DATA = "libs/types/src/protocol/tlv/market_data.rs"
_LAYOUTS = [
    RecordLayout(
        1,
        "trade",
        "TradeTLV",
        _packed(
            [
                ("asset_id", "<u8"),
                ("price", "<i8"),
                ("volume", "<i8"),
                ("execution_timestamp_ns", "<u8"),
                ("venue_id", "<u2"),
                ("asset_type", "u1"),
                ("reserved", "u1"),
                ("side", "u1"),
                ("_padding", "u1", (3,)),
            ]
        ),
        _MARKET_DATA,
        ("price", "volume"),
    ),
    RecordLayout(
        2,
        "quote",
        "QuoteTLV",
        _packed(
            [
                ("asset_id", "<u8"),
                ("bid_price", "<i8"),
                ("bid_size", "<i8"),
                ("ask_price", "<i8"),
                ("ask_size", "<i8"),
                ("quote_timestamp_ns", "<u8"),
                ("venue_id", "<u2"),
                ("asset_type", "u1"),
                ("reserved", "u1"),
                ("_padding", "u1", (4,)),
            ]
        ),
        _MARKET_DATA,
        ("bid_price", "bid_size", "ask_price", "ask_size"),
    ),
    RecordLayout(
        3,
        "order_book",
        "OrderBookTLV",
        # #[repr(C)]: the FixedVecs are 8-aligned, so 4 bytes of implicit padding sit between ``reserved`` (35)
        # and ``bids`` (40); named ``_padding`` here so that a copy keeps every byte. Torq's own offset table
        # says 36 and 2,452 bytes, which repr(C) does not give.
        _packed(
            [
                ("snapshot_timestamp_ns", "<u8"),
                ("sequence", "<u8"),
                ("precision_factor", "<i8"),
                ("asset_id", "<u8"),
                ("venue_id", "<u2"),
                ("asset_type", "u1"),
                ("reserved", "u1"),
                ("_padding", "u1", (4,)),
                ("bids", ORDER_LEVELS),
                ("asks", ORDER_LEVELS),
            ]
        ),
        _MARKET_DATA,
    ),
    RecordLayout(
        11,
        "pool_swap",
        "PoolSwapTLV",
        _packed(
            [
                ("amount_in", *_U128),
                ("amount_out", *_U128),
                ("liquidity_after", *_U128),
                ("timestamp_ns", "<u8"),
                ("block_number", "<u8"),
                ("tick_after", "<i4"),
                ("venue", "<u2"),
                ("amount_in_decimals", "u1"),
                ("amount_out_decimals", "u1"),
                ("_padding", "u1", (8,)),
                *_padded_address("pool_address", "pool_address_padding"),
                *_padded_address("token_in_addr", "token_in_padding"),
                *_padded_address("token_out_addr", "token_out_padding"),
                ("sqrt_price_x96_after", "u1", (32,)),
            ]
        ),
        _MARKET_DATA,
    ),
    RecordLayout(
        12,
        "pool_mint",
        "PoolMintTLV",
        _packed(
            [
                ("liquidity_delta", *_U128),
                ("amount0", *_U128),
                ("amount1", *_U128),
                ("timestamp_ns", "<u8"),
                ("tick_lower", "<i4"),
                ("tick_upper", "<i4"),
                ("venue", "<u2"),
                ("token0_decimals", "u1"),
                ("token1_decimals", "u1"),
                ("_padding", "u1", (12,)),
                *_padded_address("pool_address", "pool_address_padding"),
                *_padded_address("provider_addr", "provider_padding"),
                *_padded_address("token0_addr", "token0_padding"),
                *_padded_address("token1_addr", "token1_padding"),
            ]
        ),
        _MARKET_DATA,
    ),
    RecordLayout(
        14,
        "pool_tick",
        "PoolTickTLV",
        _packed(
            [
                ("liquidity_net", "<i8"),
                ("price_sqrt", "<u8"),
                ("timestamp_ns", "<u8"),
                ("tick", "<i4"),
                ("venue", "<u2"),
                ("_padding", "u1", (2,)),
                *_padded_address("pool_address", "pool_address_padding"),
            ]
        ),
        _MARKET_DATA,
    ),
    RecordLayout(
        15,
        "pool_state",
        "PoolStateTLV",
        _packed(
            [
                ("reserve0", *_U128),
                ("reserve1", *_U128),
                ("sqrt_price_x96", *_U128),
                ("liquidity", *_U128),
                ("block_number", "<u8"),
                ("timestamp_ns", "<u8"),
                ("tick", "<i4"),
                ("fee_rate", "<u4"),
                ("venue", "<u2"),
                ("pool_type", "u1"),
                ("token0_decimals", "u1"),
                ("token1_decimals", "u1"),
                ("_padding", "u1", (3,)),
                *_padded_address("pool_address", "pool_address_padding"),
                *_padded_address("token0_addr", "token0_padding"),
                *_padded_address("token1_addr", "token1_padding"),
            ]
        ),
        "libs/types/src/protocol/tlv/pool_state.rs",
    ),
    RecordLayout(
        16,
        "pool_sync",
        "PoolSyncTLV",
        _packed(
            [
                ("reserve0", *_U128),
                ("reserve1", *_U128),
                ("timestamp_ns", "<u8"),
                ("block_number", "<u8"),
                ("venue", "<u2"),
                ("token0_decimals", "u1"),
                ("token1_decimals", "u1"),
                ("_padding", "u1", (12,)),
                *_padded_address("pool_address", "pool_address_padding"),
                *_padded_address("token0_addr", "token0_padding"),
                *_padded_address("token1_addr", "token1_padding"),
            ]
        ),
        _MARKET_DATA,
    ),
    RecordLayout(
        18,
        "gas_price",
        "GasPriceTLV",
        _packed(
            [
                ("block_number", "<u8"),
                ("timestamp_ns", "<u8"),
                ("gas_price_gwei", "<u4"),
                ("base_fee_gwei", "<u4"),
                ("priority_fee_gwei", "<u4"),
                ("venue", "<u2"),
                ("reserved", "<u2"),
            ]
        ),
        "libs/types/src/protocol/tlv/gas_price.rs",
    ),
    RecordLayout(
        32,
        "arbitrage_signal",
        "ArbitrageSignalTLV",
        _packed(  # #[repr(C, packed)]: no alignment at all
            [
                ("strategy_id", "<u2"),
                ("signal_id", "<u8"),
                ("chain_id", "<u4"),
                ("source_pool", *_ADDRESS),
                ("target_pool", *_ADDRESS),
                ("source_venue", "<u2"),
                ("target_venue", "<u2"),
                ("token_in", *_ADDRESS),
                ("token_out", *_ADDRESS),
                ("expected_profit_usd_q8", "<i8"),
                ("required_capital_usd_q8", "<i8"),
                ("spread_bps", "<u2"),
                ("dex_fees_usd_q8", "<i8"),
                ("gas_cost_usd_q8", "<i8"),
                ("slippage_usd_q8", "<i8"),
                ("net_profit_usd_q8", "<i8"),
                ("slippage_tolerance_bps", "<u2"),
                ("max_gas_price_gwei", "<u4"),
                ("valid_until", "<u4"),
                ("priority", "<u2"),
                ("reserved", "u1", (2,)),
                ("timestamp_ns", "<u8"),
            ]
        ),
        "libs/types/src/protocol/tlv/arbitrage_signal.rs",
        (
            "expected_profit_usd_q8",
            "required_capital_usd_q8",
            "dex_fees_usd_q8",
            "gas_cost_usd_q8",
            "slippage_usd_q8",
            "net_profit_usd_q8",
        ),
    ),
    RecordLayout(
        106,
        "state_invalidation",
        "StateInvalidationTLV",
        _packed(
            [
                ("sequence", "<u8"),
                ("timestamp_ns", "<u8"),
                ("instruments", INSTRUMENTS),
                ("venue", "<u2"),
                ("reason", "u1"),
                ("_padding", "u1", (5,)),
            ]
        ),
        _MARKET_DATA,
    ),
    RecordLayout(
        107,
        "system_health",
        "SystemHealthTLV",
        _packed(
            [
                ("timestamp_ns", "<u8"),
                ("connection_count", "<u4"),
                ("message_rate_per_sec", "<u4"),
                ("last_error_code", "<u4"),
                ("error_rate_per_thousand", "<u2"),
                ("latency_p95_us", "<u2"),
                ("service_type", "u1"),
                ("health_status", "u1"),
                ("cpu_usage_pct", "u1"),
                ("memory_usage_pct", "u1"),
                ("reserved", "u1", (20,)),
            ]
        ),
        "libs/types/src/protocol/tlv/system.rs",
    ),
    RecordLayout(
        108,
        "trace_context",
        "TraceContextTLV",
        _packed(
            [
                ("start_timestamp_ns", "<u8"),
                ("current_timestamp_ns", "<u8"),
                ("source_service", "u1"),
                ("span_depth", "u1"),
                ("stage_flags", "u1"),
                ("reserved", "u1"),
                ("_padding", "u1", (4,)),
                ("trace_id", "u1", (8,)),
            ]
        ),
        "libs/types/src/protocol/tlv/system.rs",
    ),
    RecordLayout(
        110,
        "recovery_request",
        "RecoveryRequestTLV",
        _packed(
            [
                ("last_sequence", "<u8"),
                ("current_sequence", "<u8"),
                ("consumer_id", "<u4"),
                ("request_type", "<u4"),
            ]
        ),
        "libs/network/src/recovery/request.rs",
    ),
    RecordLayout(
        200,
        "pool_info",
        "PoolInfoTLV",
        _packed(
            [
                ("discovered_at", "<u8"),
                ("last_seen", "<u8"),
                ("fee_tier", "<u4"),
                ("venue", "<u2"),
                ("tlv_type", "u1"),
                ("tlv_length", "u1"),
                ("token0_decimals", "u1"),
                ("token1_decimals", "u1"),
                ("pool_type", "u1"),
                ("_padding", "u1"),
                ("pool_address", *_ADDRESS),
                ("token0_address", *_ADDRESS),
                ("token1_address", *_ADDRESS),
            ]
        ),
        "libs/types/src/protocol/tlv/pool_cache.rs",
    ),
]
# PoolBurnTLV (13) is PoolMintTLV's layout under other meanings (the same file, the same fields).
_MINT = next(x for x in _LAYOUTS if x.struct == "PoolMintTLV")
_LAYOUTS.append(RecordLayout(13, "pool_burn", "PoolBurnTLV", _MINT.dtype, _MARKET_DATA))

LAYOUTS: dict[int, RecordLayout] = {layout.tlv_type: layout for layout in sorted(_LAYOUTS, key=lambda x: x.tlv_type)}
_BY_NAME: dict[str, RecordLayout] = {}
for _layout in LAYOUTS.values():
    for _key in (_layout.name, _layout.struct, _layout.struct.removesuffix("TLV"), _layout.name.replace("_", "")):
        _BY_NAME[_key.lower()] = _layout


class UnknownRecord(KeyError):
    """A record type asked for by a name or number Torq gives no layout."""

    def __str__(self) -> str:
        return str(self.args[0])


def layout(record: int | str | RecordLayout) -> RecordLayout:
    """The layout of a record type, by number (``1``), name (``"trade"``) or Torq's struct name (``"TradeTLV"``).

    Raises ``UnknownRecord`` (a ``KeyError``) naming the types that have one.
    """
    if isinstance(record, RecordLayout):
        return record
    found = LAYOUTS.get(record) if isinstance(record, int) else _BY_NAME.get(str(record).lower())
    if found is None:
        named = TLV_TYPE_NAMES.get(record) if isinstance(record, int) else None
        what = f"TLV type {record}" + (f" ({named})" if named else "") if isinstance(record, int) else repr(record)
        known = ", ".join(f"{x.name} ({x.tlv_type})" for x in LAYOUTS.values())
        raise UnknownRecord(f"{what} has no record layout; the types with one are: {known}")
    return found


def u128_value(words: np.ndarray) -> int:
    """A Torq ``u128`` field (two uint64 words, low first) as a Python int."""
    low, high = (int(w) for w in words)
    return low | (high << 64)


def u128_words(value: int) -> tuple[int, int]:
    """A Python int as the two uint64 words of a Torq ``u128`` field, low first."""
    if not 0 <= value < 1 << 128:
        raise ValueError(f"{value} does not fit in 128 unsigned bits")
    return value & 0xFFFF_FFFF_FFFF_FFFF, value >> 64
