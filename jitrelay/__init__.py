"""jitrelay: a Protocol V2 message relay whose hot path is Numba-compiled."""

__version__ = "0.1.0"
