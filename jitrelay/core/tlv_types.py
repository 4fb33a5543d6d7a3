"""Torq's TLV type registry: the name of every TLV type number Torq assigns, and the fixed payload sizes.

Source: the ``TLVType`` enum and ``TLVType::size_constraint`` in ``libs/types/src/protocol/tlv/types.rs``
of dawsh2/Torq (the codec re-exports it unchanged: ``libs/codec/src/tlv_types.rs`` and
``libs/codec/src/protocol/tlv_type.rs``), plus the ``VendorTLVType`` enum in the same file for the vendor
numbers Torq names. Each name is the enum variant's name in snake_case (``L2Snapshot`` -> ``l2_snapshot``,
``MEVBundle`` -> ``mev_bundle``). Numbers Torq leaves unassigned (33-39, 50-59, 73-79, 91-99, 109,
113-199, 205-254) are absent. 255 (``ExtendedTLV``) is absent too: it marks the extended record form
``255, 0, type, len16``, it is not a record type.

Pure data, standard library only, so that anything (the relay, tests, tools) can import it.
"""

from __future__ import annotations

TLV_TYPE_NAMES: dict[int, str] = {
    # Market data, 1-19: libs/types/src/protocol/tlv/types.rs (enum TLVType)
    1: "trade",
    2: "quote",
    3: "order_book",
    4: "instrument_meta",
    5: "l2_snapshot",
    6: "l2_delta",
    7: "l2_reset",
    8: "price_update",
    9: "volume_update",
    10: "pool_liquidity",
    11: "pool_swap",
    12: "pool_mint",
    13: "pool_burn",
    14: "pool_tick",
    15: "pool_state",
    16: "pool_sync",
    17: "quote_update",
    18: "gas_price",
    19: "state_invalidation_reason",
    # Strategy signals, 20-39: libs/types/src/protocol/tlv/types.rs (enum TLVType)
    20: "signal_identity",
    21: "asset_correlation",
    22: "economics",
    23: "execution_addresses",
    24: "venue_metadata",
    25: "state_reference",
    26: "execution_control",
    27: "pool_addresses",
    28: "mev_bundle",
    29: "tertiary_venue",
    30: "risk_parameters",
    31: "performance_metrics",
    32: "arbitrage_signal",
    # Execution, 40-59: libs/types/src/protocol/tlv/types.rs (enum TLVType)
    40: "order_request",
    41: "order_status",
    42: "fill",
    43: "order_cancel",
    44: "order_modify",
    45: "execution_report",
    46: "portfolio",
    47: "position",
    48: "balance",
    49: "trade_confirmation",
    # Portfolio and risk, 60-79 (routed as signal): libs/types/src/protocol/tlv/types.rs (enum TLVType)
    60: "risk_decision",
    61: "position_update",
    62: "risk_alert",
    63: "collateral_update",
    64: "exposure_report",
    65: "portfolio_event",
    66: "risk_threshold",
    67: "flash_loan_result",
    68: "post_trade_analytics",
    69: "position_query",
    70: "risk_metrics",
    71: "circuit_breaker",
    72: "strategy_registration",
    # Compliance and audit, 80-99 (routed as system): libs/types/src/protocol/tlv/types.rs (enum TLVType)
    80: "compliance_check",
    81: "audit_trail",
    82: "regulatory_report",
    83: "trade_breakdown",
    84: "settlement_instruction",
    85: "clearing_report",
    86: "margin_call",
    87: "custody_event",
    88: "venue_connectivity",
    89: "cross_venue_spread",
    90: "arbitrage_execution",
    # System, 100-108, and recovery, 110-112: libs/types/src/protocol/tlv/types.rs (enum TLVType)
    100: "heartbeat",
    101: "snapshot",
    102: "error",
    103: "config_update",
    104: "service_discovery",
    105: "resource_usage",
    106: "state_invalidation",
    107: "system_health",
    108: "trace_context",
    110: "recovery_request",
    111: "recovery_response",
    112: "sequence_sync",
    # Vendor, 200-204: libs/types/src/protocol/tlv/types.rs (enum VendorTLVType)
    200: "pool_info",
    201: "pool_cache_header",
    202: "proprietary_data",
    203: "custom_metrics",
    204: "experimental_signal",
}

TLV_FIXED_SIZES: dict[int, int] = {
    # Every ``TLVSizeConstraint::Fixed(n)`` arm of ``TLVType::size_constraint`` (which
    # ``TLVType::expected_payload_size`` returns) in libs/types/src/protocol/tlv/types.rs.
    1: 40,  # TradeTLV, libs/types/src/protocol/tlv/market_data.rs: 40 in the registry and the struct
    # The registry says Fixed(52) for Quote and QuoteUpdate, but QuoteTLV (market_data.rs, #[repr(C)]:
    # six u64/i64, u16, u8, u8, [u8; 4]) is 56 bytes, and the path every Torq service sends quotes by,
    # ``build_message_direct`` (libs/codec/src/builder.rs), writes ``size_of::<QuoteTLV>()`` = 56 without
    # checking the registry. ``TLVMessageBuilder::add_tlv`` would panic on a real QuoteTLV (56 != 52).
    2: 56,
    17: 56,  # QuoteUpdate: "QuoteTLV size" per the registry comment, so the same 52-vs-56 question
    18: 32,  # GasPrice
    19: 1,  # StateInvalidationReason
    20: 16,  # SignalIdentity
    21: 24,  # AssetCorrelation
    22: 32,  # Economics
    23: 84,  # ExecutionAddresses
    24: 12,  # VenueMetadata
    25: 24,  # StateReference
    26: 16,  # ExecutionControl
    27: 44,  # PoolAddresses
    28: 40,  # MEVBundle
    29: 24,  # TertiaryVenue
    32: 170,  # ArbitrageSignalTLV, libs/types/src/protocol/tlv/arbitrage_signal.rs (#[repr(C, packed)])
    40: 32,  # OrderRequest
    41: 24,  # OrderStatus
    42: 32,  # Fill
    43: 16,  # OrderCancel
    44: 24,  # OrderModify
    45: 48,  # ExecutionReport
    60: 32,  # RiskDecision
    63: 48,  # CollateralUpdate
    66: 40,  # RiskThreshold
    69: 32,  # PositionQuery
    71: 24,  # CircuitBreaker
    86: 48,  # MarginCall
    88: 32,  # VenueConnectivity
    89: 40,  # CrossVenueSpread
    100: 16,  # Heartbeat
    105: 64,  # ResourceUsage
    107: 48,  # SystemHealthTLV, libs/types/src/protocol/tlv/system.rs
    110: 24,  # RecoveryRequestTLV, libs/network/src/recovery/request.rs
}
