"""The record layouts against Torq's structs typed out by hand, and the fixed-point and instrument helpers.

``TORQ`` below is written from dawsh2/Torq's source, not from ``jitrelay.core.records``: each
entry is (field, offset, numpy format) in the struct's order, and the struct's size. The
Torq-built fixtures (``support.torq``, packed with ``struct`` formats of their own) must
read back through the dtypes field for field.
"""

from __future__ import annotations

import struct
from decimal import Decimal

import numpy as np
import pytest
from support import torq

from jitrelay import records
from jitrelay.client.records import build_record
from jitrelay.core import record_text
from jitrelay.core.domains import logic_for

U128 = ("<u8", (2,))
ADDR = ("u1", (20,))
PAD12 = ("u1", (12,))

# type: (size, [(field, offset, format)]). Files are dawsh2/Torq's.
TORQ: dict[int, tuple[int, list[tuple[str, int, object]]]] = {
    # libs/types/src/protocol/tlv/market_data.rs, TradeTLV
    1: (
        40,
        [
            ("asset_id", 0, "<u8"),
            ("price", 8, "<i8"),
            ("volume", 16, "<i8"),
            ("execution_timestamp_ns", 24, "<u8"),
            ("venue_id", 32, "<u2"),
            ("asset_type", 34, "u1"),
            ("reserved", 35, "u1"),
            ("side", 36, "u1"),
            ("_padding", 37, ("u1", (3,))),
        ],
    ),
    # market_data.rs, QuoteTLV
    2: (
        56,
        [
            ("asset_id", 0, "<u8"),
            ("bid_price", 8, "<i8"),
            ("bid_size", 16, "<i8"),
            ("ask_price", 24, "<i8"),
            ("ask_size", 32, "<i8"),
            ("quote_timestamp_ns", 40, "<u8"),
            ("venue_id", 48, "<u2"),
            ("asset_type", 50, "u1"),
            ("reserved", 51, "u1"),
            ("_padding", 52, ("u1", (4,))),
        ],
    ),
    # market_data.rs, OrderBookTLV (#[repr(C)]: FixedVec<OrderLevel, 50> is 8-aligned, 8 + 50 * 24 = 1208 bytes)
    3: (
        2456,
        [
            ("snapshot_timestamp_ns", 0, "<u8"),
            ("sequence", 8, "<u8"),
            ("precision_factor", 16, "<i8"),
            ("asset_id", 24, "<u8"),
            ("venue_id", 32, "<u2"),
            ("asset_type", 34, "u1"),
            ("reserved", 35, "u1"),
            ("_padding", 36, ("u1", (4,))),  # implicit in Torq's struct: repr(C) aligns the FixedVec to 8
            ("bids", 40, None),
            ("asks", 1248, None),
        ],
    ),
    # market_data.rs, PoolSwapTLV (define_tlv!: u128, u64, u32, u16, u8, special)
    11: (
        208,
        [
            ("amount_in", 0, U128),
            ("amount_out", 16, U128),
            ("liquidity_after", 32, U128),
            ("timestamp_ns", 48, "<u8"),
            ("block_number", 56, "<u8"),
            ("tick_after", 64, "<i4"),
            ("venue", 68, "<u2"),
            ("amount_in_decimals", 70, "u1"),
            ("amount_out_decimals", 71, "u1"),
            ("_padding", 72, ("u1", (8,))),
            ("pool_address", 80, ADDR),
            ("pool_address_padding", 100, PAD12),
            ("token_in_addr", 112, ADDR),
            ("token_in_padding", 132, PAD12),
            ("token_out_addr", 144, ADDR),
            ("token_out_padding", 164, PAD12),
            ("sqrt_price_x96_after", 176, ("u1", (32,))),
        ],
    ),
    # market_data.rs, PoolMintTLV (define_tlv_with_padding!, size 208); PoolBurnTLV (13) has the same fields
    12: (
        208,
        [
            ("liquidity_delta", 0, U128),
            ("amount0", 16, U128),
            ("amount1", 32, U128),
            ("timestamp_ns", 48, "<u8"),
            ("tick_lower", 56, "<i4"),
            ("tick_upper", 60, "<i4"),
            ("venue", 64, "<u2"),
            ("token0_decimals", 66, "u1"),
            ("token1_decimals", 67, "u1"),
            ("_padding", 68, ("u1", (12,))),
            ("pool_address", 80, ADDR),
            ("pool_address_padding", 100, PAD12),
            ("provider_addr", 112, ADDR),
            ("provider_padding", 132, PAD12),
            ("token0_addr", 144, ADDR),
            ("token0_padding", 164, PAD12),
            ("token1_addr", 176, ADDR),
            ("token1_padding", 196, PAD12),
        ],
    ),
    # market_data.rs, PoolTickTLV (size 64)
    14: (
        64,
        [
            ("liquidity_net", 0, "<i8"),
            ("price_sqrt", 8, "<u8"),
            ("timestamp_ns", 16, "<u8"),
            ("tick", 24, "<i4"),
            ("venue", 28, "<u2"),
            ("_padding", 30, ("u1", (2,))),
            ("pool_address", 32, ADDR),
            ("pool_address_padding", 52, PAD12),
        ],
    ),
    # libs/types/src/protocol/tlv/pool_state.rs, PoolStateTLV
    15: (
        192,
        [
            ("reserve0", 0, U128),
            ("reserve1", 16, U128),
            ("sqrt_price_x96", 32, U128),
            ("liquidity", 48, U128),
            ("block_number", 64, "<u8"),
            ("timestamp_ns", 72, "<u8"),
            ("tick", 80, "<i4"),
            ("fee_rate", 84, "<u4"),
            ("venue", 88, "<u2"),
            ("pool_type", 90, "u1"),
            ("token0_decimals", 91, "u1"),
            ("token1_decimals", 92, "u1"),
            ("_padding", 93, ("u1", (3,))),
            ("pool_address", 96, ADDR),
            ("pool_address_padding", 116, PAD12),
            ("token0_addr", 128, ADDR),
            ("token0_padding", 148, PAD12),
            ("token1_addr", 160, ADDR),
            ("token1_padding", 180, PAD12),
        ],
    ),
    # market_data.rs, PoolSyncTLV (size 160)
    16: (
        160,
        [
            ("reserve0", 0, U128),
            ("reserve1", 16, U128),
            ("timestamp_ns", 32, "<u8"),
            ("block_number", 40, "<u8"),
            ("venue", 48, "<u2"),
            ("token0_decimals", 50, "u1"),
            ("token1_decimals", 51, "u1"),
            ("_padding", 52, ("u1", (12,))),
            ("pool_address", 64, ADDR),
            ("pool_address_padding", 84, PAD12),
            ("token0_addr", 96, ADDR),
            ("token0_padding", 116, PAD12),
            ("token1_addr", 128, ADDR),
            ("token1_padding", 148, PAD12),
        ],
    ),
    # libs/types/src/protocol/tlv/gas_price.rs, GasPriceTLV (size 32)
    18: (
        32,
        [
            ("block_number", 0, "<u8"),
            ("timestamp_ns", 8, "<u8"),
            ("gas_price_gwei", 16, "<u4"),
            ("base_fee_gwei", 20, "<u4"),
            ("priority_fee_gwei", 24, "<u4"),
            ("venue", 28, "<u2"),
            ("reserved", 30, "<u2"),
        ],
    ),
    # libs/types/src/protocol/tlv/arbitrage_signal.rs, ArbitrageSignalTLV (#[repr(C, packed)])
    32: (
        170,
        [
            ("strategy_id", 0, "<u2"),
            ("signal_id", 2, "<u8"),
            ("chain_id", 10, "<u4"),
            ("source_pool", 14, ADDR),
            ("target_pool", 34, ADDR),
            ("source_venue", 54, "<u2"),
            ("target_venue", 56, "<u2"),
            ("token_in", 58, ADDR),
            ("token_out", 78, ADDR),
            ("expected_profit_usd_q8", 98, "<i8"),
            ("required_capital_usd_q8", 106, "<i8"),
            ("spread_bps", 114, "<u2"),
            ("dex_fees_usd_q8", 116, "<i8"),
            ("gas_cost_usd_q8", 124, "<i8"),
            ("slippage_usd_q8", 132, "<i8"),
            ("net_profit_usd_q8", 140, "<i8"),
            ("slippage_tolerance_bps", 148, "<u2"),
            ("max_gas_price_gwei", 150, "<u4"),
            ("valid_until", 154, "<u4"),
            ("priority", 158, "<u2"),
            ("reserved", 160, ("u1", (2,))),
            ("timestamp_ns", 162, "<u8"),
        ],
    ),
    # market_data.rs, StateInvalidationTLV (#[repr(C)]; FixedVec<InstrumentId, 16>: 8 + 16 * 12 = 200 bytes)
    106: (
        224,
        [
            ("sequence", 0, "<u8"),
            ("timestamp_ns", 8, "<u8"),
            ("instruments", 16, None),
            ("venue", 216, "<u2"),
            ("reason", 218, "u1"),
            ("_padding", 219, ("u1", (5,))),
        ],
    ),
    # libs/types/src/protocol/tlv/system.rs, SystemHealthTLV
    107: (
        48,
        [
            ("timestamp_ns", 0, "<u8"),
            ("connection_count", 8, "<u4"),
            ("message_rate_per_sec", 12, "<u4"),
            ("last_error_code", 16, "<u4"),
            ("error_rate_per_thousand", 20, "<u2"),
            ("latency_p95_us", 22, "<u2"),
            ("service_type", 24, "u1"),
            ("health_status", 25, "u1"),
            ("cpu_usage_pct", 26, "u1"),
            ("memory_usage_pct", 27, "u1"),
            ("reserved", 28, ("u1", (20,))),
        ],
    ),
    # system.rs, TraceContextTLV
    108: (
        32,
        [
            ("start_timestamp_ns", 0, "<u8"),
            ("current_timestamp_ns", 8, "<u8"),
            ("source_service", 16, "u1"),
            ("span_depth", 17, "u1"),
            ("stage_flags", 18, "u1"),
            ("reserved", 19, "u1"),
            ("_padding", 20, ("u1", (4,))),
            ("trace_id", 24, ("u1", (8,))),
        ],
    ),
    # libs/network/src/recovery/request.rs, RecoveryRequestTLV
    110: (
        24,
        [
            ("last_sequence", 0, "<u8"),
            ("current_sequence", 8, "<u8"),
            ("consumer_id", 16, "<u4"),
            ("request_type", 20, "<u4"),
        ],
    ),
    # libs/types/src/protocol/tlv/pool_cache.rs, PoolInfoTLV
    200: (
        88,
        [
            ("discovered_at", 0, "<u8"),
            ("last_seen", 8, "<u8"),
            ("fee_tier", 16, "<u4"),
            ("venue", 20, "<u2"),
            ("tlv_type", 22, "u1"),
            ("tlv_length", 23, "u1"),
            ("token0_decimals", 24, "u1"),
            ("token1_decimals", 25, "u1"),
            ("pool_type", 26, "u1"),
            ("_padding", 27, "u1"),
            ("pool_address", 28, ADDR),
            ("token0_address", 48, ADDR),
            ("token1_address", 68, ADDR),
        ],
    ),
}
TORQ[13] = TORQ[12]


def test_every_layout_has_a_hand_written_counterpart() -> None:
    assert set(records.LAYOUTS) == set(TORQ)


@pytest.mark.parametrize("tlv_type", sorted(TORQ))
def test_each_dtype_is_torqs_struct(tlv_type: int) -> None:
    size, fields = TORQ[tlv_type]
    kind = records.layout(tlv_type)
    assert kind.dtype.itemsize == size == kind.size
    assert kind.dtype.names == tuple(name for name, _, _ in fields)
    for name, offset, fmt in fields:
        dtype, at = kind.dtype.fields[name][:2]  # type: ignore[index]
        assert at == offset, name
        if fmt is not None:
            assert dtype == np.dtype(fmt), name
    assert kind.extended == (size > 255)


def test_fixed_vecs_are_torqs() -> None:
    levels = records.layout("order_book").dtype.fields["bids"][0]  # type: ignore[index]
    assert levels.itemsize == 8 + 50 * 24
    assert levels.fields["elements"][1] == 8
    level = levels.fields["elements"][0].base
    assert [(n, level.fields[n][1]) for n in level.names] == [
        ("price", 0),
        ("size", 8),
        ("order_count", 16),
        ("reserved", 20),
    ]
    instruments = records.layout("state_invalidation").dtype.fields["instruments"][0]  # type: ignore[index]
    assert instruments.itemsize == 8 + 16 * 12


FIXTURE_VALUES = [
    (1, torq.trade_value(), torq.TRADE),
    (2, torq.quote_value(), torq.QUOTE),
    (32, torq.arbitrage_signal_value(), torq.ARBITRAGE_SIGNAL),
]


@pytest.mark.parametrize(("tlv_type", "value", "layout"), FIXTURE_VALUES, ids=["trade", "quote", "arbitrage"])
def test_torq_built_records_read_back_field_for_field(tlv_type: int, value: bytes, layout: struct.Struct) -> None:
    item = np.frombuffer(value, dtype=records.layout(tlv_type).dtype)[0]
    unpacked = layout.unpack(value)
    names = [n for n in item.dtype.names if not n.startswith("_")]  # the struct formats skip padding (``x``)
    got = [bytes(item[n]) if np.ndim(item[n]) else int(item[n]) for n in names]
    assert got == list(unpacked)


def test_an_order_book_reads_back_level_for_level() -> None:
    book = np.frombuffer(torq.order_book_value(), dtype=records.layout("order_book").dtype)[0]
    assert int(book["precision_factor"]) == 100_000_000
    assert int(book["bids"]["count"]) == 5
    assert int(book["bids"]["elements"][0]["price"]) == 5_734_200_000_000
    assert int(book["asks"]["elements"][4]["order_count"]) == 6
    assert not book["bids"]["elements"][5:].tobytes().strip(b"\0")  # the unused levels are zero


def test_layouts_are_found_by_number_name_and_struct() -> None:
    trade = records.layout(1)
    assert records.layout("trade") is records.layout("Trade") is records.layout("TradeTLV") is trade
    assert records.layout("OrderBook") is records.layout("order_book")
    with pytest.raises(records.UnknownRecord, match=r"TLV type 40 \(order_request\) has no record layout"):
        records.layout(40)
    with pytest.raises(KeyError, match="'fill'"):
        records.layout("fill")


def test_fixed_point_is_exact() -> None:
    assert records.to_decimal(4_512_350_000_000) == Decimal("45123.50000000")
    assert records.format_fixed(12_345_678) == "0.12345678"
    assert records.format_fixed(-1) == "-0.00000001"
    assert records.to_fixed("45123.5") == 4_512_350_000_000
    assert records.to_fixed(Decimal("0.000000015")) == 2  # half to even at the 8th place
    assert records.to_fixed(0.1) == 10_000_000  # a float by its shortest repr, not its binary expansion
    assert records.to_fixed(7) == 700_000_000
    np.testing.assert_array_equal(records.to_float(np.array([150_000_000, -50_000_000])), [1.5, -0.5])
    with pytest.raises(ValueError, match="does not fit"):
        records.to_fixed("1e12")
    with pytest.raises(ValueError, match="not a decimal"):
        records.to_fixed("price")


def test_instruments_are_torqs() -> None:
    assert records.symbol_asset_id("BTC") == torq.symbol_to_u64("BTC") == 0x4254430000000000
    assert records.symbol_asset_id("BTCUSDT-PERP") == records.symbol_asset_id("BTCUSDT-")  # 8 bytes at most
    assert records.asset_symbol(torq.BTC) == "BTC"
    assert records.asset_symbol(12345) is None
    assert records.evm_asset_id("0x2791Bca1f2de4661ED88A30C99A7a9449Aa84174") == 0x2791BCA1F2DE4661
    key = records.instrument_key(101, 51, torq.BTC)
    assert key == (101 << 48) | (51 << 40) | (torq.BTC & 0xFF_FFFF_FFFF)
    assert records.instrument_from_key(key) == (101, 51, torq.BTC & 0xFF_FFFF_FFFF)
    assert records.venue_id("kraken") == 101 and records.venue_id(202) == 202
    assert records.asset_type_id("Coin") == 51
    with pytest.raises(ValueError, match="no venue 'Mars'"):
        records.venue_id("Mars")


def test_u128_words_round_trip() -> None:
    value = (1 << 100) + 12345
    low, high = records.u128_words(value)
    assert records.u128_value(np.array([low, high], dtype=np.uint64)) == value
    with pytest.raises(ValueError):
        records.u128_words(-1)


def test_a_record_built_from_values_is_torqs_bytes() -> None:
    built = build_record(
        "trade",
        asset_id="BTC",
        price=Decimal("57342.1"),
        volume="0.025",
        execution_timestamp_ns=torq.T0 - 350_000,
        venue_id="Kraken",
        asset_type="Coin",
        side="sell",
    )
    assert built.tobytes() == torq.trade_value()
    assert build_record("trade", price=5_734_210_000_000)["price"][0] == 5_734_210_000_000  # an int is the wire's
    with pytest.raises(ValueError, match="no field 'prize'"):
        build_record("trade", prize=1)
    with pytest.raises(ValueError, match="buy or sell"):
        build_record("trade", side="long")


def test_records_as_text_and_json() -> None:
    text = record_text.describe_record(1, torq.trade_value())
    assert text == (
        "trade asset=BTC price=57342.10000000 volume=0.02500000 "
        f"execution_timestamp_ns={torq.T0 - 350_000} venue=Kraken asset_type=Coin side=sell"
    )
    fields = record_text.record_fields(1, torq.trade_value())
    assert fields == {
        "asset_id": torq.BTC,
        "price": 5_734_210_000_000,
        "volume": 2_500_000,
        "execution_timestamp_ns": torq.T0 - 350_000,
        "venue_id": 101,
        "asset_type": 51,
        "reserved": 0,
        "side": 1,
        "_padding": "0x000000",
    }
    book = record_text.record_fields(3, torq.order_book_value())
    assert book is not None and book["bids"]["count"] == 5 and len(book["bids"]["elements"]) == 5
    assert book["bids"]["elements"][0] == {
        "price": 5_734_200_000_000,
        "size": 30_000_000,
        "order_count": 3,
        "reserved": 0,
    }
    swap = np.zeros(1, records.layout("pool_swap").dtype)
    swap["amount_in"] = records.u128_words((1 << 64) + 5)
    swapped = record_text.record_fields(11, swap.tobytes())
    assert swapped is not None and swapped["amount_in"] == (1 << 64) + 5
    assert record_text.describe_record(1, torq.trade_value()[:39]) is None  # not its layout's length
    assert record_text.record_fields(40, torq.order_request_value()) is None  # no layout


def test_each_domain_knows_which_of_its_types_it_can_decode() -> None:
    assert logic_for("market_data").record_types() == (1, 2, 3, 11, 12, 13, 14, 15, 16, 18, 200)
    assert logic_for("signal").record_types() == (32, 200)
    assert logic_for("execution").record_types() == (200,)
    assert logic_for("system").record_types() == (106, 107, 108, 110, 200)
    assert logic_for("market_data", vendor_types=False).record_types() == (1, 2, 3, 11, 12, 13, 14, 15, 16, 18)
