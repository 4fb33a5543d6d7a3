"""The inputs every kernel benchmark reads, built once per process and kept.

asv re-runs a benchmark's ``setup`` before every timed sample, so the builders
here are memoised: the first call builds the buffer (``protocol.build_batch``)
and runs the kernel once so that it is loaded (or built); later calls
cost a dictionary look-up. The pytest-benchmark suite imports the same
builders, so both suites measure the same bytes.
"""

from __future__ import annotations

import functools
import time
import zlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.domains import MarketDataLogic
from jitrelay.core.units import MiB

# Bytes per scan call: within the relay's 4 MiB receive buffer, and large
# enough that the Python call around the kernel is about 1% of the time.
BUFFER_BYTES = 2 * MiB
CRC_BYTES = 1 * MiB
SEED = 20240601


def record_for(size: int, tlv_type: int = 1) -> tuple[int, bytes]:
    """The one record that makes a message exactly ``size`` bytes long (standard up to 255 value bytes)."""
    value = size - protocol.HEADER_SIZE - 2
    if value > protocol.MAX_STANDARD_VALUE:
        value = size - protocol.HEADER_SIZE - 5
    if not 0 <= value <= protocol.MAX_EXTENDED_VALUE:
        raise ValueError(f"no single record makes a message of {size} bytes")
    return tlv_type, b"\x5a" * value


def records_filling(size: int, n: int) -> list[tuple[int, bytes]]:
    """``n`` standard records of equal length (types 1..n) that fill a message of ``size`` bytes."""
    payload = size - protocol.HEADER_SIZE
    if payload % n or not 2 <= payload // n <= 2 + protocol.MAX_STANDARD_VALUE:
        raise ValueError(f"{n} equal records cannot fill {payload} payload bytes")
    return [(1 + k % 19, b"\x5a" * (payload // n - 2)) for k in range(n)]


def market_batch(size: int, total: int = BUFFER_BYTES, records: int = 1) -> np.ndarray:
    """As many ``size``-byte market_data messages as fit in ``total`` bytes, checksums filled."""
    recs = [record_for(size)] if records == 1 else records_filling(size, records)
    return protocol.build_batch(protocol.MARKET_DATA, total // size, recs, timestamp_ns=1)


def mixed_batch(size: int, reject_share: float, total: int = BUFFER_BYTES) -> np.ndarray:
    """market_data messages with ``reject_share`` of them rejected, spread at random (fixed seed).

    Half the rejects come from the wrong domain (a signal message: rejected on
    its header) and half carry a signal TLV type (rejected after the TLV walk),
    so the mix costs what a realistic stream of strays would.
    """
    count = total // size
    good = protocol.build_batch(protocol.MARKET_DATA, count, [record_for(size)], timestamp_ns=1)
    wrong_domain = protocol.build_batch(protocol.SIGNAL, count, [record_for(size, 20)], timestamp_ns=1)
    out_of_range = protocol.build_batch(protocol.MARKET_DATA, count, [record_for(size, 20)], timestamp_ns=1)
    rows = good.reshape(count, size)
    rejected = np.random.default_rng(SEED).permutation(count)[: round(reject_share * count)]
    half = len(rejected) // 2
    rows[rejected[:half]] = wrong_domain.reshape(count, size)[rejected[:half]]
    rows[rejected[half:]] = out_of_range.reshape(count, size)[rejected[half:]]
    return rows.reshape(-1)


def quartered_batch(size: int, total: int = BUFFER_BYTES) -> np.ndarray:
    """market_data messages whose single record cycles through types 1..4: each filter on one type takes a quarter."""
    sets = [[record_for(size, tlv_type)] for tlv_type in (1, 2, 3, 4)]
    return protocol.build_cycled_batch(protocol.MARKET_DATA, total // size, sets, timestamp_ns=1)


class RouteFixture(NamedTuple):
    scan: ScanFixture
    tables: kernels.GroupTables
    out: kernels.RouteBuffers

    def route(self) -> kernels.RouteBuffers:
        f = self.scan
        return kernels.route(f.buf, f.out, f.result.count, self.tables, self.out)


@functools.lru_cache(maxsize=8)
def route_fixture(groups: int, size: int = 71) -> RouteFixture:
    """``groups`` subscriber groups over a stream of four TLV types; group ``g`` wants type ``1 + g % 4``.

    With more than four groups the later ones also narrow by source, so every
    group has its own filter, as subscribers with distinct subscriptions would.
    """
    scanned = _scan_fixture(quartered_batch(size), False)
    filters = [(frozenset({1 + g % 4}), None if g < 4 else frozenset({0, g})) for g in range(groups)]
    tables_ = kernels.group_tables(filters)
    fixture = RouteFixture(scanned, tables_, kernels.RouteBuffers(len(scanned.buf), groups))
    fixture.route()  # warm-up: the kernels load here, and the buffers reach their size
    return fixture


def tables(crc: bool) -> kernels.KernelTables:
    """market_data's kernel tables; with ``crc`` the same domain verifying checksums."""
    return kernels.tables_for(MarketDataLogic(checksum="required" if crc else "off"))


class ScanFixture(NamedTuple):
    buf: np.ndarray
    tables: kernels.KernelTables
    out: kernels.ScanBuffers
    result: kernels.ScanResult  # of the warm-up scan: what every timed scan finds too

    def scan(self) -> kernels.ScanResult:
        return kernels.scan_into(self.buf, 0, len(self.buf), self.tables, self.out)


def _scan_fixture(buf: np.ndarray, crc: bool) -> ScanFixture:
    t = tables(crc)
    out = kernels.ScanBuffers(len(buf))
    result = kernels.scan_into(buf, 0, len(buf), t, out)  # warm-up: the kernels load here
    if result.consumed != len(buf):
        raise RuntimeError(f"scan stopped at {result.consumed} of {len(buf)} bytes (fault {result.fault})")
    return ScanFixture(buf, t, out, result)


@functools.lru_cache(maxsize=8)
def scan_by_size(size: int, crc: bool) -> ScanFixture:
    return _scan_fixture(market_batch(size), crc)


@functools.lru_cache(maxsize=8)
def scan_by_rejects(reject_share: float, crc: bool, size: int = 71) -> ScanFixture:
    return _scan_fixture(mixed_batch(size, reject_share), crc)


@functools.lru_cache(maxsize=8)
def scan_by_records(records: int, crc: bool, size: int = 256) -> ScanFixture:
    return _scan_fixture(market_batch(size, records=records), crc)


class CompactFixture(NamedTuple):
    buf: np.ndarray
    runs: np.ndarray
    n_runs: int
    out: np.ndarray
    nbytes: int  # bytes the compaction writes


@functools.lru_cache(maxsize=8)
def compact_fixture(reject_share: float, size: int = 71) -> CompactFixture:
    scanned = scan_by_rejects(reject_share, False, size)
    runs = scanned.out.runs[: 2 * scanned.result.runs].copy()
    out = np.ones(len(scanned.buf), dtype=np.uint8)  # written once here, so no page faults while timed
    kept = kernels.compact(scanned.buf, runs, scanned.result.runs, out)  # warm-up
    return CompactFixture(scanned.buf, runs, scanned.result.runs, out, len(kept))


@functools.lru_cache(maxsize=1)
def crc_data(nbytes: int = CRC_BYTES) -> np.ndarray:
    """Random bytes; the kernel is checked against zlib on them once, which also warms it up."""
    data = np.random.default_rng(SEED).integers(0, 256, nbytes, dtype=np.uint8)
    if kernels.crc32(data) != zlib.crc32(data):
        raise RuntimeError("kernels.crc32 disagrees with zlib.crc32")
    return data


@functools.lru_cache(maxsize=1)
def frame_fixture(size: int = 71) -> np.ndarray:
    buf = market_batch(size)
    kernels.frame(buf)  # warm-up
    return buf


def load_kernels() -> None:
    """Call each kernel once on a few messages, so that they are loaded (or built) now.

    The asv suite calls this when it is imported: its forkserver imports the
    suite once and forks a process per benchmark, and every fork then starts
    with the kernels loaded instead of loading them again.
    """
    buf = protocol.build_batch(protocol.MARKET_DATA, 4, [record_for(71)], timestamp_ns=1)
    for crc in (False, True):
        result, out = kernels.scan(buf, tables(crc))
        kernels.compact(buf, out.runs, result.runs)
    kernels.frame(buf)
    kernels.crc32(buf)


def best_time(fn: Callable[[], object], rounds: int = 15, number: int = 3, min_seconds: float = 0.2) -> float:
    """Seconds per call: the best of at least ``rounds`` rounds of ``number`` calls, and of ``min_seconds``.

    The minimum, because on a shared machine every disturbance only adds
    time; ``min_seconds`` lets it outlast a short burst of someone else's work.
    """
    best = float("inf")
    deadline = time.perf_counter() + min_seconds
    done = 0
    while done < rounds or time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
        done += 1
    return best


def speed_ratio(
    fn: Callable[[], object],
    baseline: Callable[[], object],
    rounds: int = 15,
    number: int = 3,
    min_seconds: float = 0.4,
) -> float:
    """How many times faster ``fn`` is than ``baseline`` (baseline time / fn time), the two timed in alternation."""
    best_fn = best_base = float("inf")
    deadline = time.perf_counter() + min_seconds
    done = 0
    while done < rounds or time.perf_counter() < deadline:
        best_fn = min(best_fn, best_time(fn, 1, number, 0.0))
        best_base = min(best_base, best_time(baseline, 1, number, 0.0))
        done += 1
    return best_base / best_fn


class TradeFixture(NamedTuple):
    """A 1 MiB batch of Torq trade messages, its bytes, and the same trades as an array and as tuples."""

    batch: np.ndarray
    data: bytes  # the batch as bytes, the struct baseline's input
    trades: np.ndarray  # the batch's records, in the trade layout's dtype
    rows: list[tuple]  # the same as tuples of their fields, the struct baseline's input
    out: np.ndarray  # room for encoding them
    packed: bytearray  # room for the struct baseline's encoding


@functools.lru_cache(maxsize=1)
def trade_fixture() -> TradeFixture:
    """The records bench workload's batch (``jitrelay bench --workloads records``): the same bytes in every suite.

    Decodes and encodes it once each, checked against the struct loops, so the
    record kernels are loaded here. The record modules are imported here, not
    at the top: the other benchmarks still run on commits that predate them.
    """
    from jitrelay import records
    from jitrelay.tools.bench import records as workload

    batch = workload.trade_batch()
    trades = records.decode(batch, "trade", copy=True).records
    rows = trades[[name for name in trades.dtype.names if not name.startswith("_")]].tolist()
    out = np.empty(len(batch), dtype=np.uint8)
    packed = bytearray(len(batch))
    fixture = TradeFixture(batch, batch.tobytes(), trades, rows, out, packed)
    if len(struct_decode_trades(fixture)) != len(trades):
        raise RuntimeError("records.decode and the struct loop found different trades")
    if encode_trades(fixture).tobytes() != bytes(packed[: struct_encode_trades(fixture)]):
        raise RuntimeError("records.encode and the struct loop wrote different bytes")
    return fixture


def decode_trades(f: TradeFixture, copy: bool = False) -> object:
    """``records.decode`` of the fixture's batch: the strided view, or with ``copy`` a contiguous copy."""
    from jitrelay import records

    return records.decode(f.batch, "trade", copy=copy)


def struct_decode_trades(f: TradeFixture) -> list[tuple]:
    """The decode baseline on the fixture: ``struct.unpack_from`` per message in Python, the tuples collected."""
    from jitrelay.tools.bench import records as workload

    return workload.struct_decode(f.data)


def encode_trades(f: TradeFixture) -> np.ndarray:
    """``records.encode`` of the fixture's trades into its buffer, as ``Publisher.publish_records`` does."""
    from jitrelay import records

    return records.encode(f.trades, domain=protocol.MARKET_DATA, timestamp_ns=1, out=f.out)


def struct_encode_trades(f: TradeFixture) -> int:
    """The encode baseline on the fixture: one ``struct.pack_into`` per message; the bytes written."""
    from jitrelay.tools.bench import records as workload

    return workload.struct_encode(f.rows, f.packed, 0, 1)
