"""A log-linear histogram of durations, cheap enough to update once per read.

The relay records how long each batch takes from the moment its bytes reach
the engine to the last subscriber write issued. Recording is one
``bit_length`` and one list increment; percentiles are read rarely (on a
signal, on exit, by the stats tools). Buckets split each power of two into
``SUB_BUCKETS`` equal parts, so a reported percentile is within 1/16 (6%) of
the true value, from 1 ns to about 18 minutes.
"""

from __future__ import annotations

SUB_BITS = 4
SUB_BUCKETS = 1 << SUB_BITS
_OCTAVES = 40


def bucket_of(value: int) -> int:
    """The bucket holding ``value`` (a non-negative integer)."""
    if value < SUB_BUCKETS:
        return value
    shift = value.bit_length() - SUB_BITS - 1
    return ((shift + 1) << SUB_BITS) + (value >> shift) - SUB_BUCKETS


def bucket_floor(bucket: int) -> int:
    """The smallest value in ``bucket``."""
    if bucket < SUB_BUCKETS:
        return bucket
    shift = (bucket >> SUB_BITS) - 1
    return (SUB_BUCKETS + (bucket & (SUB_BUCKETS - 1))) << shift


class Histogram:
    """Counts of non-negative integer samples (nanoseconds here) in log-linear buckets."""

    def __init__(self) -> None:
        self.counts = [0] * ((_OCTAVES + 1) << SUB_BITS)
        self.count = 0
        self.total = 0
        self.max = 0

    def record(self, value: int) -> None:
        """Count one value in its bucket; values past the last bound go to the overflow bucket."""
        self.counts[min(bucket_of(value), len(self.counts) - 1)] += 1
        self.count += 1
        self.total += value
        if value > self.max:
            self.max = value

    def percentile(self, q: float) -> int:
        """The floor of the bucket holding the ``q``-th percentile (0 < q <= 100); 0 when empty."""
        if not self.count:
            return 0
        rank = max(1, -(-self.count * q // 100))
        seen = 0
        for bucket, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(bucket_floor(bucket), self.max)
        return self.max  # pragma: no cover - the loop always reaches rank

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0
