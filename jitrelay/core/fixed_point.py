"""Torq's fixed-point numbers: decimals carried as integers scaled by 10**8.

Torq writes prices, sizes and USD amounts as ``i64`` with 8 decimals
(``UsdFixedPoint8``, ``SCALE = 100_000_000`` in
``libs/types/src/common/fixed_point.rs``; "Fixed-point with 8 decimals" on
every price and volume in ``libs/types/src/protocol/tlv/market_data.rs``).
The integer is what travels; these helpers are for display and for building
records from human numbers. ``Decimal`` keeps every digit; floats are for
plotting and arithmetic on whole columns.
"""

from __future__ import annotations

from decimal import Decimal

import numpy as np

DECIMALS = 8
SCALE = 10**DECIMALS
_QUANTUM = Decimal(1).scaleb(-DECIMALS)


def to_decimal(value: int) -> Decimal:
    """The exact decimal a fixed-point integer stands for: ``4512350000000`` -> ``Decimal('45123.50000000')``."""
    return Decimal(int(value)).scaleb(-DECIMALS).quantize(_QUANTUM)


def to_fixed(value: Decimal | float | int | str) -> int:
    """The fixed-point integer for a decimal, rounded half to even at the 8th place as ``Decimal`` does.

    Raises ``ValueError`` for a value outside ``i64`` once scaled, or one that is not a number.
    """
    try:
        scaled = (Decimal(str(value)) if isinstance(value, float) else Decimal(value)).scaleb(DECIMALS)
    except ArithmeticError as error:
        raise ValueError(f"{value!r} is not a decimal number") from error
    result = int(scaled.to_integral_value())
    if not -(1 << 63) <= result < 1 << 63:
        raise ValueError(f"{value} does not fit a fixed-point i64 with {DECIMALS} decimals")
    return result


def to_float(values: np.ndarray) -> np.ndarray:
    """A column of fixed-point integers as float64: for plots and statistics, not for exact sums."""
    return np.asarray(values, dtype=np.int64) / SCALE


def format_fixed(value: int) -> str:
    """A fixed-point integer written with all 8 decimals: ``12345678`` -> ``'0.12345678'``."""
    return f"{to_decimal(value):f}"  # never exponent notation: -1 is "-0.00000001", not "-1E-8"
