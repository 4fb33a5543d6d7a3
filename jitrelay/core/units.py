"""Byte units, the one place they are written: ``4 * MiB`` reads as what it is."""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
