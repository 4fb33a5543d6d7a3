"""The forwarding-time histogram against exact percentiles of the same samples."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from jitrelay.core.histogram import SUB_BUCKETS, Histogram, bucket_floor, bucket_of


@given(st.integers(min_value=0, max_value=1 << 40))
def test_every_value_lies_in_its_bucket(value: int) -> None:
    bucket = bucket_of(value)
    assert bucket_floor(bucket) <= value < bucket_floor(bucket + 1)
    width = bucket_floor(bucket + 1) - bucket_floor(bucket)
    assert width == 1 or width * SUB_BUCKETS <= value


def test_buckets_are_contiguous() -> None:
    assert [bucket_floor(b) for b in range(40)] == [*range(32), *range(32, 64, 2)][:40]
    for bucket in range(1, 600):
        assert bucket_floor(bucket) > bucket_floor(bucket - 1)
        assert bucket_of(bucket_floor(bucket)) == bucket


@given(
    st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=400),
    st.sampled_from([1, 25, 50, 90, 99, 99.9, 100]),
)
def test_percentile_is_the_floor_of_the_exact_ranks_bucket(samples: list[int], q: float) -> None:
    histogram = Histogram()
    for value in samples:
        histogram.record(value)
    exact = sorted(samples)[max(1, math.ceil(len(samples) * q / 100)) - 1]
    got = histogram.percentile(q)
    assert got == min(bucket_floor(bucket_of(exact)), max(samples))
    assert got <= exact and exact - got <= max(exact // SUB_BUCKETS, 0) + (exact < SUB_BUCKETS)
    assert histogram.count == len(samples)
    assert histogram.total == sum(samples)
    assert histogram.max == max(samples)
    assert histogram.mean == sum(samples) / len(samples)


def test_empty_histogram_reports_zero() -> None:
    histogram = Histogram()
    assert histogram.percentile(50) == 0 and histogram.mean == 0.0


def test_huge_values_land_in_the_last_bucket() -> None:
    histogram = Histogram()
    histogram.record(1 << 60)
    assert histogram.counts[-1] == 1 and histogram.percentile(100) <= 1 << 60
