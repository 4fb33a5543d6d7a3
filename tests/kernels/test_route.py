"""Subscriber groups: ``kernels.route`` agrees with the plain-Python selection rule on arbitrary streams.

A message goes to a group when its source is in the group's source set and
one of its record types is in its type set (each set, when present). Run with
the kernel tests, compiled and as Python.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import reference as ref
from support import strategies as gen

from jitrelay import kernels
from jitrelay.core import protocol as p
from jitrelay.core.domains import logic_for

pytestmark = pytest.mark.kernels

FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = tuple(ref.DOMAINS)


def arr(data: bytes) -> np.ndarray:
    return np.frombuffer(bytearray(data), dtype=np.uint8)


@st.composite
def value_set(draw: st.DrawFn, seen: list[int]) -> frozenset[int] | None:
    """None (any), or a set mixing values the stream holds with arbitrary ones; sometimes empty."""
    if draw(st.booleans()):
        return None
    picked = draw(st.lists(st.sampled_from(seen), max_size=4)) if seen else []
    return frozenset(picked + draw(st.lists(st.integers(0, 255), max_size=2)))


@st.composite
def stream_and_filters(draw: st.DrawFn, name: str, max_groups: int) -> tuple[bytes, list[p.Filter]]:
    spec = ref.DOMAINS[name]
    data = draw(gen.stream(spec, spec.max_payload))
    judged, _, _ = ref.reference_scan(data, spec.ident, spec.max_payload, spec.checksum, spec.ranges)
    kept = [data[o : o + n] for o, n, v in judged if v == p.FORWARD]
    types = sorted({t for m in kept for t in ref.record_types(m[ref.HEADER :]) or []})
    sources = sorted({m[6] for m in kept})
    count = draw(st.integers(1, max_groups))
    filters = [(draw(value_set(types)), draw(value_set(sources))) for _ in range(count)]
    return data, filters


def expected_runs(data: bytes, name: str, selection: p.Filter) -> list[tuple[int, int]]:
    spec = ref.DOMAINS[name]
    judged, _, _ = ref.reference_scan(data, spec.ident, spec.max_payload, spec.checksum, spec.ranges)
    chosen = [
        (o, n, p.FORWARD if v == p.FORWARD and ref.selects(selection, data[o : o + n]) else p.WRONG_DOMAIN)
        for o, n, v in judged
    ]
    return ref.reference_runs(chosen)


def check_route(name: str, data: bytes, filters: list[p.Filter]) -> None:
    buf = arr(data)
    result, scanned = kernels.scan(buf, kernels.tables_for(logic_for(name)))
    tables = kernels.group_tables(filters)
    routed = kernels.route(buf, scanned, result.count, tables, kernels.RouteBuffers(len(buf), tables.groups))
    for g, selection in enumerate(filters):
        want = expected_runs(data, name, selection)
        got = routed.group_runs(g).tolist()
        assert got == [bound for run in want for bound in run], f"group {g} {selection}"
        assert routed.counts[g] == len(want)
        assert routed.sizes[g] == sum(b - a for a, b in want)


@pytest.mark.parametrize("name", NAMES)
@FEW
@given(data=st.data())
def test_route_agrees_with_the_selection_rule(name: str, data: st.DataObject) -> None:
    stream, filters = data.draw(stream_and_filters(name, 6))
    check_route(name, stream, filters)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_more_than_64_groups_use_further_words(data: st.DataObject) -> None:
    stream, filters = data.draw(stream_and_filters("market_data", 3))
    many = filters + [(frozenset({t}), None) for t in range(1, 20)] * 4  # 3 + 76 groups: two words
    check_route("market_data", stream, many)
    assert kernels.group_tables(many).type_groups.shape[1] == 2


def trade(source: int, *types: int) -> bytes:
    return ref.message(1, b"".join(ref.standard_record(t, b"v") for t in types), source=source)


def test_empty_sets_select_nothing_and_absent_sets_everything() -> None:
    messages = [trade(0, 1), trade(1, 2), trade(2, 1, 2), trade(3), trade(1)]
    data = b"".join(messages)
    filters = [(frozenset(), None), (None, frozenset()), (None, None), (frozenset({2}), frozenset({1, 2}))]
    buf = arr(data)
    result, scanned = kernels.scan(buf, kernels.tables_for(logic_for("market_data")))
    routed = kernels.route(buf, scanned, result.count, kernels.group_tables(filters), kernels.RouteBuffers(64, 1))
    assert routed.counts[:4].tolist() == [0, 0, 1, 1]
    assert routed.group_runs(2).tolist() == [0, len(data)]
    start = len(messages[0])
    assert routed.group_runs(3).tolist() == [start, start + len(messages[1]) + len(messages[2])]


def test_route_grows_its_runs_when_a_batch_needs_more() -> None:
    messages = [trade(k % 2, 1) for k in range(40)]
    buf = arr(b"".join(messages))
    result, scanned = kernels.scan(buf, kernels.tables_for(logic_for("market_data")))
    tables = kernels.group_tables([(None, frozenset({0})), (None, frozenset({1}))])
    out = kernels.RouteBuffers(len(buf), 2)
    out.runs = np.zeros(4, dtype=np.int64)
    routed = kernels.route(buf, scanned, result.count, tables, out)
    assert routed.counts[:2].tolist() == [20, 20]
    size = len(messages[0])
    assert routed.group_runs(1).tolist() == [b for k in range(1, 40, 2) for b in (k * size, (k + 1) * size)]


def test_compacted_group_runs_hold_exactly_the_selected_messages() -> None:
    messages = [trade(k % 3, 1 + k % 4) for k in range(200)]
    buf = arr(b"".join(messages))
    result, scanned = kernels.scan(buf, kernels.tables_for(logic_for("market_data")))
    selection = (frozenset({2, 3}), frozenset({0, 2}))
    tables = kernels.group_tables([selection])
    routed = kernels.route(buf, scanned, result.count, tables, kernels.RouteBuffers(len(buf), 1))
    packed = kernels.compact(buf, routed.group_runs(0), int(routed.counts[0]))
    assert packed.tobytes() == b"".join(m for m in messages if ref.selects(selection, m))


@pytest.mark.parametrize("name", NAMES)
@FEW
@given(data=st.data())
def test_scan_and_route_is_a_scan_then_a_route_in_one_call(name: str, data: st.DataObject) -> None:
    stream, filters = data.draw(stream_and_filters(name, 6))
    tables = kernels.tables_for(logic_for(name))
    groups = kernels.group_tables(filters)
    separate, scanned = kernels.scan(arr(stream), tables)
    routed = kernels.route(
        arr(stream), scanned, separate.count, groups, kernels.RouteBuffers(len(stream), groups.groups)
    )
    out = kernels.ScanBuffers(len(stream))
    small = kernels.RouteBuffers(len(stream), 1)
    small.runs = np.zeros(2, dtype=np.int64)  # too few: the call must grow it and cut the runs again
    together, fused = kernels.scan_and_route(arr(stream), 0, len(stream), tables, out, groups, small)
    assert together == separate
    assert out.verdicts[: together.count].tolist() == scanned.verdicts[: separate.count].tolist()
    assert out.counts.tolist() == scanned.counts.tolist()
    for g in range(len(filters)):
        assert fused.group_runs(g).tolist() == routed.group_runs(g).tolist()
        assert fused.sizes[g] == routed.sizes[g]


def reference_iovecs(
    scan_runs: list[tuple[int, int]], runs: list[tuple[int, int]], stream_start: int, size: int
) -> list[tuple[int, int]]:
    """Where a group's runs lie in a ring of ``size`` bytes, the batch's runs appended there from ``stream_start``."""
    vecs = []
    for a, b in runs:
        while a < b:
            landed = stream_start
            for s, e in scan_runs:
                if s <= a < e:
                    break
                landed += e - s
            phys = (landed + a - s) % size
            piece = min(min(b, e) - a, size - phys)
            vecs.append((phys, piece))
            a += piece
    return vecs


@pytest.mark.parametrize("name", NAMES)
@FEW
@given(data=st.data())
def test_group_iovecs_point_at_each_groups_bytes_where_the_log_put_them(name: str, data: st.DataObject) -> None:
    stream, filters = data.draw(stream_and_filters(name, 6))
    tables = kernels.tables_for(logic_for(name))
    groups = kernels.group_tables(filters)
    out = kernels.ScanBuffers(len(stream))
    result, routed = kernels.scan_and_route(
        arr(stream), 0, len(stream), tables, out, groups, kernels.RouteBuffers(len(stream), 1)
    )
    scan_runs = [(int(a), int(b)) for a, b in out.runs[: 2 * result.runs].reshape(-1, 2)]
    total = sum(b - a for a, b in scan_runs)
    size = data.draw(st.integers(max(1, total), total + 80))  # a batch never outgrows the ring
    stream_start = data.draw(st.integers(0, 10 * size))
    ring = np.zeros(size, dtype=np.uint8)  # the log: the batch appended at stream_start, wrapping
    at = stream_start
    for a, b in scan_runs:
        for i in range(a, b):
            ring[at % size] = stream[i]
            at += 1
    fan = kernels.FanOut(iovecs=1)
    lead = data.draw(st.integers(0, 3))  # iovecs before the groups' (the whole batch's pieces, in the relay)
    placed = fan.place_groups(out.runs, result.runs, stream_start, routed, len(filters), 0, size, lead)
    k = lead
    for g in range(len(filters)):
        runs = [(int(a), int(b)) for a, b in routed.group_runs(g).reshape(-1, 2)]
        first, count, nbytes = placed[:, g].tolist()
        vecs = [(int(fan.iovecs[2 * j]), int(fan.iovecs[2 * j + 1])) for j in range(first, first + count)]
        assert first == k and vecs == reference_iovecs(scan_runs, runs, stream_start, size)
        assert nbytes == sum(b - a for a, b in runs) == sum(n for _, n in vecs)
        assert b"".join(ring[o : o + n].tobytes() for o, n in vecs) == b"".join(stream[a:b] for a, b in runs)
        k += count
