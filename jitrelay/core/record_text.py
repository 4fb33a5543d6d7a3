"""A typed record as text for people and as JSON for programs: what ``sub``, ``audit`` and ``tap`` print.

Text is for reading: fixed-point fields with their 8 decimals, an
``asset_id`` that spells a symbol as the symbol, venues, asset types and
sides by name, padding left out. JSON is for programs: every field by Torq's
name with the integer exactly as on the wire (a ``u128`` joined into one
integer, byte arrays as ``0x`` hex, a ``FixedVec`` as its count and its first
``count`` elements). A record whose type has no layout, or whose length is
not its layout's, has neither: callers show it in hex.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jitrelay.core import instruments
from jitrelay.core.fixed_point import format_fixed
from jitrelay.core.records import LAYOUTS, RecordLayout

_VENUE_FIELDS = ("venue_id", "venue", "source_venue", "target_venue")


def _layout_for(tlv_type: int, value: bytes) -> RecordLayout | None:
    kind = LAYOUTS.get(tlv_type)
    return kind if kind is not None and kind.size == len(value) else None


def _shown(name: str) -> bool:
    return not (name.startswith("_") or name == "reserved" or name.endswith("_padding"))


def record_fields(tlv_type: int, value: bytes) -> dict[str, Any] | None:
    """Every field of a record by Torq's name, integers as on the wire; None when it has no layout of its length."""
    kind = _layout_for(tlv_type, value)
    if kind is None:
        return None
    return _json_value(np.frombuffer(value, dtype=kind.dtype)[0], kind.dtype)


def _json_value(item: Any, dtype: np.dtype) -> Any:
    if dtype.fields:
        fields = {name: _json_value(item[name], dtype.fields[name][0]) for name in dtype.names or ()}
        if set(fields) == {"count", "_padding", "elements"}:  # a FixedVec: the elements in use
            return {"count": fields["count"], "elements": fields["elements"][: fields["count"]]}
        return fields
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        if base == np.dtype("<u8") and shape == (2,):  # a Torq u128, low word first
            return int(item[0]) | int(item[1]) << 64
        if base == np.dtype("u1"):
            return "0x" + bytes(item).hex()
        return [_json_value(one, base) for one in item]
    return int(item)


def describe_record(tlv_type: int, value: bytes) -> str | None:
    """One record for people: ``trade asset=BTC price=57342.10000000 volume=0.02500000 side=sell ...``.

    None when the type has no layout of this length.
    """
    kind = _layout_for(tlv_type, value)
    if kind is None:
        return None
    item = np.frombuffer(value, dtype=kind.dtype)[0]
    parts = [kind.name]
    for name in kind.dtype.names or ():
        if _shown(name):
            parts.append(f"{_short(name)}={_text(kind, name, item[name])}")
    return " ".join(parts)


def _short(name: str) -> str:
    return {"asset_id": "asset", "venue_id": "venue"}.get(name, name)


def _text(kind: RecordLayout, name: str, value: Any) -> str:
    dtype = kind.dtype.fields[name][0] if kind.dtype.fields else None
    if dtype is not None and dtype.fields:
        return _levels_text(value) if "elements" in dtype.fields else "{...}"
    if dtype is not None and dtype.subdtype is not None:
        return str(_json_value(value, dtype))
    number = int(value)
    if name in kind.fixed_point:
        return format_fixed(number)
    if name == "asset_id":
        return instruments.asset_symbol(number) or str(number)
    if name in _VENUE_FIELDS:
        return instruments.VENUES.get(number, str(number))
    if name == "asset_type":
        return instruments.ASSET_TYPES.get(number, str(number))
    if name == "side" and kind.name == "trade":
        return instruments.SIDES.get(number, str(number))
    return str(number)


def _levels_text(vec: Any) -> str:
    """A FixedVec of order levels or instruments: how many, and the first (``5@57342.00000000x0.30000000``)."""
    count = int(vec["count"])
    if not count:
        return "0"
    first = vec["elements"][0]
    names = first.dtype.names or ()
    if "price" in names:
        return f"{count}@{format_fixed(int(first['price']))}x{format_fixed(int(first['size']))}"
    return str(count)
