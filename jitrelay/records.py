"""Typed records: Torq's trades, quotes, order books and signals as numpy columns.

Everything a service needs to read and write Torq's records, in one place::

    from jitrelay import Subscriber, records

    with Subscriber("market_data") as sub:
        for batch in sub.record_batches("trade"):
            prices = records.to_float(batch.records["price"])

- the layouts: ``layout("trade")``, ``LAYOUTS`` (by TLV type number), each a
  ``RecordLayout`` whose ``dtype`` is Torq's struct byte for byte;
- whole batches in one compiled call: ``decode(batch, "trade")`` and
  ``encode(array, domain=...)``;
- one record from field values: ``build_record("trade", price="45123.5", ...)``;
- Torq's fixed point (``to_decimal``, ``to_fixed``, ``to_float``) and instrument
  helpers (``symbol_asset_id``, ``asset_symbol``, ``VENUES``, ...).

docs/records.md lists the types, their fields and the Torq files they come from.
"""

from __future__ import annotations

from jitrelay.client.records import RecordBatch, build_record
from jitrelay.core.fixed_point import DECIMALS, SCALE, format_fixed, to_decimal, to_fixed, to_float
from jitrelay.core.instruments import (
    ASSET_TYPES,
    SIDES,
    VENUES,
    asset_symbol,
    asset_type_id,
    evm_asset_id,
    instrument_from_key,
    instrument_key,
    symbol_asset_id,
    venue_id,
)
from jitrelay.core.records import LAYOUTS, RecordLayout, UnknownRecord, layout, u128_value, u128_words
from jitrelay.kernels.records import Columns, decode, encode, message_size

__all__ = [
    "ASSET_TYPES",
    "DECIMALS",
    "LAYOUTS",
    "SCALE",
    "SIDES",
    "VENUES",
    "Columns",
    "RecordBatch",
    "RecordLayout",
    "UnknownRecord",
    "asset_symbol",
    "asset_type_id",
    "build_record",
    "decode",
    "encode",
    "evm_asset_id",
    "format_fixed",
    "instrument_from_key",
    "instrument_key",
    "layout",
    "message_size",
    "symbol_asset_id",
    "to_decimal",
    "to_fixed",
    "to_float",
    "u128_value",
    "u128_words",
    "venue_id",
]
